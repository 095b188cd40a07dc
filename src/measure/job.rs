//! `rotvar measure` and `rotvar measure-pair`: load a checkpoint and its test set, run the
//! streaming measure, write `variance.safetensors` and `variance.json`.

use super::output::{self, Summary};
use super::{measure, rotation_angles, LayerVariance, MeasureConfig, Per};
use crate::backend::{BackendRef, MapReduce};
use crate::checkpoint::{self, CheckpointMeta};
use crate::data::{self, Split};
use crate::limits;
use crate::models::Model;
use crate::progress;
use crate::train::DeviceDataset;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct MeasureOptions {
    pub rotations: usize,
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

/// Measure V for every intermediate of the checkpoint's model and write the results into `out`.
pub fn measure_checkpoint(b: &BackendRef, ckpt: &Path, o: &MeasureOptions, out: &Path) -> Result<Measured> {
    limits::ROTATIONS.check_usize(o.rotations)?;
    limits::EVAL_BATCH.check_usize(o.batch)?;
    let (model, meta) = checkpoint::load(ckpt, b)?;
    let data = checkpoint_test_data(&meta, ckpt, o.dataset.as_deref(), o.data_dir.as_deref(), o.limit, b)?;
    let cfg = MeasureConfig {
        angles: rotation_angles(o.rotations),
        fill: data.fill.clone(),
        per: o.per,
        reduce: o.reduce,
        batch: o.batch,
    };
    let start = Instant::now();
    let passes = data.len().div_ceil(o.batch.max(1)) * o.rotations;
    let pb = (!o.quiet).then(|| progress::bar(passes as u64, &format!("measuring {} ({})", meta.arch, meta.augment)));
    let layers = measure(&model, &data, &cfg, &mut |done, _| {
        if let Some(pb) = &pb {
            pb.set_position(done as u64);
        }
    })?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let seconds = start.elapsed().as_secs_f64();
    let summary = output::summarize(&layers, Some(&cfg));
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    output::write(&out.join(TENSORS), &out.join(SUMMARY), &layers, &summary)?;
    Ok(Measured { model, meta, layers, summary, seconds })
}
