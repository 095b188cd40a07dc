//! The measure across machines: `measure --shard K/N` accumulates the moments of the K-th of N
//! equal slices of the test set and writes them (f64, exactly as accumulated) to a shard file;
//! `measure-merge` adds any complete set of shards with the pairwise update of
//! [`super::merge_moments`] and finalizes V as a single run would. The merged result equals
//! the unsharded one to rounding (the tests hold it to 1e-12 relative).
//!
//! A shard records what it was measured from (the checkpoint's sha256, the dataset, the test
//! images, the measure's settings); shards that disagree on any of it are refused by name.

use super::{merge_moments, LayerMoments, MeasureConfig};
use crate::backend::{MapReduce, VarianceGeom, VarianceMoments};
use crate::fsio::write_atomic;
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `K/N`: the K-th (1-based, as `sbatch --array=1-N` numbers tasks) of N slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

/// Most shards one measure may be split into.
pub const MAX_SHARDS: usize = 100_000;

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("--shard '{s}': expected K/N with 1 ≤ K ≤ N ≤ {MAX_SHARDS}, e.g. 3/8");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if k == 0 || k > n || n > MAX_SHARDS {
            return Err(bad());
        }
        Ok(Shard { k, n })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

impl Shard {
    /// The samples of this slice of `total`, in whole batches of `batch` counted from the first
    /// test image: with B batches, batches [⌊(K−1)·B/N⌋, ⌊K·B/N⌋). Each shard then runs exactly
    /// the forward passes of the whole run (a CPU GEMM's rounding depends on how many images
    /// share it), so the merge differs from one run only by the pairwise update's rounding.
    pub fn range(&self, total: usize, batch: usize) -> std::ops::Range<usize> {
        let batches = total.div_ceil(batch.max(1));
        let at = |i: usize| ((i as u128 * batches as u128 / self.n as u128) as usize * batch).min(total);
        at(self.k - 1)..at(self.k)
    }

    pub fn file_name(&self) -> String {
        format!("variance.shard-{}-of-{}.safetensors", self.k, self.n)
    }
}

/// What every shard of one measurement must agree on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardSource {
    pub checkpoint_sha256: String,
    pub arch: String,
    pub augment: String,
    pub dataset: String,
    pub class_names: Vec<String>,
    /// Test images the N slices divide, and the batch they are divided in.
    pub total_samples: usize,
    pub batch: usize,
    pub transforms: crate::transform::TransformSet,
    pub fill: Vec<f32>,
    pub per: super::Per,
    pub reduce: MapReduce,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardHeader {
    kind: String,
    source: ShardSource,
    shard: Shard,
    samples: [usize; 2],
    layers: Vec<ShardLayer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardLayer {
    name: String,
    unit_shape: Vec<usize>,
    units: usize,
    hw: usize,
    classes: usize,
    rotations: usize,
}

const KIND: &str = "rotvar-measure-shard";
const META_KEY: &str = "rotvar_shard";

/// Write the moments of one shard.
pub fn write(path: &Path, source: &ShardSource, shard: Shard, layers: &[LayerMoments]) -> Result<()> {
    let range = shard.range(source.total_samples, source.batch);
    let header = ShardHeader {
        kind: KIND.into(),
        source: source.clone(),
        shard,
        samples: [range.start, range.end],
        layers: layers
            .iter()
            .map(|l| {
                let g = &l.moments.geom;
                ShardLayer {
                    name: l.name.clone(),
                    unit_shape: l.unit_shape.clone(),
                    units: g.units,
                    hw: g.hw,
                    classes: g.classes,
                    rotations: g.rotations,
                }
            })
            .collect(),
    };
    let mut blobs: Vec<(String, Dtype, usize, Vec<u8>)> = Vec::new();
    for l in layers {
        let m = &l.moments;
        let counts: Vec<i64> = m.class_counts.iter().map(|&c| c as i64).collect();
        blobs.push((
            format!("{}/class_counts", l.name),
            Dtype::I64,
            counts.len(),
            bytemuck::cast_slice(&counts).to_vec(),
        ));
        for (q, v) in [("vx_mean", &m.vx_mean), ("vx_m2", &m.vx_m2), ("vt_sum_std", &m.vt_sum_std)] {
            blobs.push((format!("{}/{q}", l.name), Dtype::F64, v.len(), bytemuck::cast_slice(v).to_vec()));
        }
    }
    let views: Vec<(String, TensorView)> = blobs
        .iter()
        .map(|(n, d, len, b)| Ok((n.clone(), TensorView::new(*d, vec![*len], b)?)))
        .collect::<Result<_>>()?;
    let mut info = HashMap::new();
    info.insert(META_KEY.to_string(), serde_json::to_string(&header)?);
    write_atomic(path, &safetensors::tensor::serialize(views, Some(info))?)
}

struct ShardFile {
    path: PathBuf,
    header: ShardHeader,
    layers: Vec<LayerMoments>,
}

fn read(path: &Path) -> Result<ShardFile> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read shard {}", path.display()))?;
    let bad = |what: String| anyhow::anyhow!("{} is not a usable measure shard: {what}", path.display());
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("{e}")))?;
    let text = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| bad("no shard header (was it written by `rotvar measure --shard`?)".into()))?;
    let header: ShardHeader =
        serde_json::from_str(text).map_err(|e| bad(format!("its header does not parse ({e})")))?;
    if header.kind != KIND {
        bail!(bad(format!("kind '{}'", header.kind)));
    }
    let mut layers = Vec::new();
    for l in &header.layers {
        let geom = VarianceGeom {
            batch: 1,
            units: l.units,
            hw: l.hw,
            reduce: header.source.reduce,
            classes: l.classes,
            rotations: l.rotations,
        };
        geom.check().map_err(|e| bad(format!("layer {}: {e}", l.name)))?;
        if l.unit_shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(l.units) {
            bail!(bad(format!("layer {}: unit shape {:?} does not hold {} units", l.name, l.unit_shape, l.units)));
        }
        let tensor = |q: &str, dtype: Dtype, len: usize| -> Result<Vec<u8>> {
            let name = format!("{}/{q}", l.name);
            let v = st.tensor(&name).map_err(|_| bad(format!("tensor '{name}' is missing")))?;
            if v.dtype() != dtype || v.shape() != [len] {
                bail!(bad(format!("tensor '{name}' is {:?} {:?}, expected {dtype:?} [{len}]", v.dtype(), v.shape())));
            }
            Ok(v.data().to_vec())
        };
        let f64s = |b: Vec<u8>| -> Vec<f64> {
            b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
        };
        let counts: Vec<i64> = tensor("class_counts", Dtype::I64, l.classes)?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if let Some(c) = counts.iter().find(|&&c| c < 0) {
            bail!(bad(format!("layer {}: negative class count {c}", l.name)));
        }
        let moments = VarianceMoments {
            geom,
            class_counts: counts.iter().map(|&c| c as u64).collect(),
            vx_mean: f64s(tensor("vx_mean", Dtype::F64, geom.vx_len())?),
            vx_m2: f64s(tensor("vx_m2", Dtype::F64, geom.vx_len())?),
            vt_sum_std: f64s(tensor("vt_sum_std", Dtype::F64, geom.sum_len())?),
        };
        layers.push(LayerMoments { name: l.name.clone(), unit_shape: l.unit_shape.clone(), moments });
    }
    Ok(ShardFile { path: path.to_path_buf(), header, layers })
}

/// `shards`, sorted by K, are each of 1/N … N/N exactly once; the errors name the files and
/// the `rotvar COMMAND --shard` runs still to do.
pub fn check_complete(shards: &[(Shard, &Path)], command: &str) -> Result<()> {
    let Some(&(first, first_path)) = shards.first() else {
        bail!("no shard files given");
    };
    let n = first.n;
    if let Some((s, p)) = shards.iter().find(|(s, _)| s.n != n) {
        bail!("{} and {} come from different splits: {} shards, not {n}", first_path.display(), p.display(), s.n);
    }
    for w in shards.windows(2) {
        if w[0].0.k == w[1].0.k {
            bail!("{} and {} are the same shard {}", w[0].1.display(), w[1].1.display(), w[0].0);
        }
    }
    let have: Vec<usize> = shards.iter().map(|(s, _)| s.k).collect();
    let missing: Vec<String> = (1..=n).filter(|k| !have.contains(k)).map(|k| format!("{k}/{n}")).collect();
    if !missing.is_empty() {
        bail!(
            "shard(s) {} of this {command} are missing; run `rotvar {command} --shard K/{n}` for them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// A merged measurement: the source every shard shared and each layer's total moments.
pub struct Merged {
    pub source: ShardSource,
    pub config: MeasureConfig,
    pub layers: Vec<LayerMoments>,
}

/// Read and add a complete set of shards (any order). Shards of another measurement, a shard
/// given twice and a missing shard are refused, naming the files.
pub fn merge(paths: &[PathBuf]) -> Result<Merged> {
    if paths.is_empty() {
        bail!("measure-merge: no shard files given");
    }
    let mut files = paths.iter().map(|p| read(p)).collect::<Result<Vec<_>>>()?;
    files.sort_by_key(|f| f.header.shard.k);
    let first = &files[0];
    for f in &files[1..] {
        if f.header.source != first.header.source {
            let what = if f.header.source.checkpoint_sha256 != first.header.source.checkpoint_sha256 {
                "another checkpoint"
            } else {
                "other measure settings (dataset, images, --batch-size, rotations, --per or --reduce)"
            };
            bail!("{} and {} come from different measurements: {what}", first.path.display(), f.path.display());
        }
    }
    let set: Vec<(Shard, &Path)> = files.iter().map(|f| (f.header.shard, f.path.as_path())).collect();
    check_complete(&set, "measure")?;
    let mut layers = files[0].layers.clone();
    for f in &files[1..] {
        if f.layers.len() != layers.len() {
            bail!(
                "{} has {} layers, {} has {}",
                f.path.display(),
                f.layers.len(),
                files[0].path.display(),
                layers.len()
            );
        }
        for (a, b) in layers.iter_mut().zip(&f.layers) {
            if a.name != b.name || a.unit_shape != b.unit_shape {
                bail!("{}: layer {} where {} has {}", f.path.display(), b.name, files[0].path.display(), a.name);
            }
            merge_moments(&mut a.moments, &b.moments)
                .with_context(|| format!("{}: layer {}", f.path.display(), a.name))?;
        }
    }
    let s = first.header.source.clone();
    let config = MeasureConfig {
        transforms: s.transforms.clone(),
        fill: s.fill.clone(),
        per: s.per,
        reduce: s.reduce,
        batch: s.batch,
    };
    Ok(Merged { source: s, config, layers })
}
