//! `rotvar measure` and `rotvar measure-pair`: load a checkpoint and its test set, run the
//! streaming measure, write `variance.safetensors` and `variance.json`.

use super::output::{self, Summary};
use super::shard::{self, Shard, ShardSource};
use super::{finalize, measure_moments, rotation_angles, LayerMoments, LayerVariance, MeasureConfig, Per};
use crate::backend::{BackendRef, MapReduce};
use crate::checkpoint::{self, CheckpointMeta};
use crate::data::{self, Split};
use crate::limits;
use crate::models::Model;
use crate::progress;
use crate::run::{EpochProbe, LayerMeans, VarianceSnapshot};
use crate::train::DeviceDataset;
use crate::transform::TransformSet;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct MeasureOptions {
    pub rotations: usize,
    /// Measure over these transformations instead of `rotations` rotations.
    pub transforms: Option<TransformSet>,
    pub per: Per,
    pub reduce: MapReduce,
    pub batch: usize,
    /// Dataset (None: the checkpoint's) and its directory.
    pub dataset: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// Measure on the first N test images only.
    pub limit: Option<usize>,
    pub quiet: bool,
}

impl MeasureOptions {
    /// The measure's settings for data whose uncovered pixels read `fill`.
    fn config(&self, fill: &[f32]) -> MeasureConfig {
        MeasureConfig {
            transforms: self
                .transforms
                .clone()
                .unwrap_or_else(|| TransformSet::rotations(&rotation_angles(self.rotations))),
            fill: fill.to_vec(),
            per: self.per,
            reduce: self.reduce,
            batch: self.batch,
        }
    }
}

pub struct Measured {
    pub model: Model,
    pub meta: CheckpointMeta,
    pub layers: Vec<LayerVariance>,
    pub summary: Summary,
    pub seconds: f64,
}

pub const TENSORS: &str = "variance.safetensors";
pub const SUMMARY: &str = "variance.json";

/// The test set of a checkpoint, normalized with its training statistics, on `b`.
pub fn checkpoint_test_data(
    meta: &CheckpointMeta,
    ckpt: &Path,
    dataset: Option<&str>,
    data_dir: Option<&Path>,
    limit: Option<usize>,
    b: &BackendRef,
) -> Result<DeviceDataset> {
    let name = dataset.unwrap_or(&meta.dataset);
    let mut ds = data::load(name, Split::Test, &data::resolve_data_dir(data_dir))?;
    if let Some(n) = limit {
        ds = ds.take(n);
    }
    meta.check_dataset(&ds, ckpt)?;
    DeviceDataset::upload(&ds, &meta.normalization, b)
}

/// The checkpoint's model, its test set and the measure's settings, all checked.
fn prepare(
    b: &BackendRef,
    ckpt: &Path,
    o: &MeasureOptions,
) -> Result<(Model, CheckpointMeta, DeviceDataset, MeasureConfig)> {
    limits::ROTATIONS.check_usize(o.rotations)?;
    limits::EVAL_BATCH.check_usize(o.batch)?;
    let (model, meta) = checkpoint::load(ckpt, b)?;
    let data = checkpoint_test_data(&meta, ckpt, o.dataset.as_deref(), o.data_dir.as_deref(), o.limit, b)?;
    let cfg = o.config(&data.fill);
    Ok((model, meta, data, cfg))
}

/// `train --measure-every N`: after every N-th epoch (and the last), V per layer on the first
/// `o.limit` test images (all of them when `None`) with `measure`'s settings, so each snapshot
/// equals what `measure --limit` reports for the checkpoint of that epoch.
pub fn epoch_probe(every: usize, o: &MeasureOptions) -> Result<EpochProbe<'static>> {
    limits::ROTATIONS.check_usize(o.rotations)?;
    limits::EVAL_BATCH.check_usize(o.batch)?;
    if every == 0 {
        anyhow::bail!("--measure-every must be at least 1 (epochs between measurements)");
    }
    let o = o.clone();
    Ok(EpochProbe {
        every,
        measure: Box::new(move |model, test, epoch| {
            let n = o.limit.unwrap_or(test.len()).min(test.len());
            let cfg = o.config(&test.fill);
            let label = format!("measuring V after epoch {epoch}");
            let layers = moments_with_bar(model, test, 0..n, &cfg, o.quiet, &label)?
                .iter()
                .map(|l| finalize(&l.name, &l.unit_shape, &l.moments))
                .collect::<Result<Vec<_>>>()?;
            let summary = output::summarize(&layers, None);
            Ok(VarianceSnapshot {
                epoch,
                samples: n,
                transforms: cfg.transforms.len(),
                layers: summary
                    .layers
                    .iter()
                    .map(|l| LayerMeans {
                        name: l.name.clone(),
                        mean_v_all: l.mean_v_all,
                        mean_v_stratified: l.mean_v_stratified,
                    })
                    .collect(),
                global_mean_v_all: summary.global_mean_v_all,
                global_mean_v_stratified: summary.global_mean_v_stratified,
            })
        }),
    })
}

/// [`measure_moments`] over `range` with a progress bar (unless `quiet`).
fn moments_with_bar(
    model: &Model,
    data: &DeviceDataset,
    range: std::ops::Range<usize>,
    cfg: &MeasureConfig,
    quiet: bool,
    label: &str,
) -> Result<Vec<LayerMoments>> {
    let passes = range.len().div_ceil(cfg.batch.max(1)) * cfg.transforms.len();
    let pb = (!quiet).then(|| progress::bar(passes as u64, label));
    let layers = measure_moments(model, data, range, cfg, &mut |done, _| {
        if let Some(pb) = &pb {
            pb.set_position(done as u64);
        }
    })?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(layers)
}

/// Measure V for every intermediate of the checkpoint's model and write the results into `out`.
pub fn measure_checkpoint(b: &BackendRef, ckpt: &Path, o: &MeasureOptions, out: &Path) -> Result<Measured> {
    let (model, meta, data, cfg) = prepare(b, ckpt, o)?;
    let start = Instant::now();
    let label = format!("measuring {} ({})", meta.arch, meta.augment);
    let layers = moments_with_bar(&model, &data, 0..data.len(), &cfg, o.quiet, &label)?
        .iter()
        .map(|l| finalize(&l.name, &l.unit_shape, &l.moments))
        .collect::<Result<Vec<_>>>()?;
    let seconds = start.elapsed().as_secs_f64();
    let summary = output::summarize(&layers, Some(&cfg));
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    output::write(&out.join(TENSORS), &out.join(SUMMARY), &layers, &summary)?;
    Ok(Measured { model, meta, layers, summary, seconds })
}

/// `measure --shard K/N`: the moments of the K-th slice of the test set, written to
/// `out/variance.shard-K-of-N.safetensors` for `measure-merge`.
pub fn measure_shard(b: &BackendRef, ckpt: &Path, o: &MeasureOptions, which: Shard, out: &Path) -> Result<PathBuf> {
    let (model, meta, data, cfg) = prepare(b, ckpt, o)?;
    let range = which.range(data.len(), o.batch);
    if range.is_empty() {
        anyhow::bail!(
            "shard {which} is empty: {} test images make {} batches of {}, fewer than {} shards; \
             use fewer shards or a smaller --batch-size",
            data.len(),
            data.len().div_ceil(o.batch),
            o.batch,
            which.n
        );
    }
    let label = format!("measuring shard {which} of {}", meta.arch);
    let layers = moments_with_bar(&model, &data, range, &cfg, o.quiet, &label)?;
    let source = ShardSource {
        checkpoint_sha256: data::fetch::sha256_hex(&data::read_file(ckpt)?),
        arch: meta.arch.clone(),
        augment: meta.augment.to_string(),
        dataset: o.dataset.clone().unwrap_or_else(|| meta.dataset.clone()),
        class_names: meta.class_names.clone(),
        total_samples: data.len(),
        batch: o.batch,
        transforms: cfg.transforms.clone(),
        fill: cfg.fill.clone(),
        per: cfg.per,
        reduce: cfg.reduce,
    };
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let path = out.join(which.file_name());
    shard::write(&path, &source, which, &layers)?;
    Ok(path)
}

/// `measure-merge`: V from a complete set of shards, written into `out` as `measure` writes it.
pub fn merge_shards(shards: &[PathBuf], out: &Path) -> Result<(Vec<LayerVariance>, output::Summary, ShardSource)> {
    let merged = shard::merge(shards)?;
    let layers =
        merged.layers.iter().map(|l| finalize(&l.name, &l.unit_shape, &l.moments)).collect::<Result<Vec<_>>>()?;
    let summary = output::summarize(&layers, Some(&merged.config));
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    output::write(&out.join(TENSORS), &out.join(SUMMARY), &layers, &summary)?;
    Ok((layers, summary, merged.source))
}
