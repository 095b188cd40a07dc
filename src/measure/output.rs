//! Results of a measurement on disk: every per-unit array in a safetensors file, a JSON summary,
//! and a short text table for the terminal.
//!
//! Tensor names are `<layer>/<set>/<quantity>`: set `all`, `stratified` or `class<k>`, quantity
//! `v`, `vt` or `vx` (`stratified` has `v` only), each f64 of the layer's unit shape, plus
//! `<layer>/class_counts` (i64 [classes]). Non-finite values are kept as they are (+inf where
//! V_x = 0 < V_t, NaN for a class without samples). The summary is also stored in the
//! safetensors header under the key `rotvar_measure`.

use super::{finite_mean, global_mean, LayerVariance, MeasureConfig};
use crate::backend::MapReduce;
use crate::fsio::{write_atomic, write_json};
use anyhow::Result;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

/// Header key of the summary in the safetensors file.
pub const META_KEY: &str = "rotvar_measure";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSummary {
    pub name: String,
    pub unit_shape: Vec<usize>,
    pub units: usize,
    pub map_size: usize,
    pub reduce: Option<MapReduce>,
    /// Means of the finite values (`None` when no value is finite).
    pub mean_v_all: Option<f64>,
    pub mean_v_stratified: Option<f64>,
    pub mean_vt_all: Option<f64>,
    pub mean_vx_all: Option<f64>,
    /// Units whose V is infinite or NaN, left out of the means above.
    pub non_finite_v_all: usize,
    pub non_finite_v_stratified: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// What V means here, for a reader of the file alone.
    pub definition: String,
    pub config: Option<MeasureConfig>,
    pub samples: u64,
    pub class_counts: Vec<u64>,
    pub rotations: usize,
    pub layers: Vec<LayerSummary>,
    /// Mean over layers of the per-layer means (each layer weighs the same; see
    /// [`super::global_mean`]).
    pub global_mean_v_all: Option<f64>,
    pub global_mean_v_stratified: Option<f64>,
}

const DEFINITION: &str = "V = V_t / V_x per unit (Quiroga et al.): V_t = mean over samples of the standard \
    deviation over rotations, V_x = mean over rotations of the standard deviation over samples; unbiased \
    standard deviations (a ratio of standard deviations, not variances); V = 1 when both are 0, +inf when only \
    V_x is 0. 'all' uses every sample; 'stratified' averages the per-class V over classes with samples.";

pub fn summarize(layers: &[LayerVariance], config: Option<&MeasureConfig>) -> Summary {
    let summaries: Vec<LayerSummary> = layers
        .iter()
        .map(|l| {
            let (mean_v_all, non_finite_v_all) = finite_mean(&l.all.v);
            let (mean_v_stratified, non_finite_v_stratified) = finite_mean(&l.stratified);
            LayerSummary {
                name: l.name.clone(),
                unit_shape: l.unit_shape.clone(),
                units: l.units(),
                map_size: l.map_size,
                reduce: l.reduce,
                mean_v_all,
                mean_v_stratified,
                mean_vt_all: finite_mean(&l.all.vt).0,
                mean_vx_all: finite_mean(&l.all.vx).0,
                non_finite_v_all,
                non_finite_v_stratified,
            }
        })
        .collect();
    Summary {
        definition: DEFINITION.to_string(),
        config: config.cloned(),
        samples: layers.first().map_or(0, |l| l.samples()),
        class_counts: layers.first().map_or_else(Vec::new, |l| l.class_counts.clone()),
        rotations: layers.first().map_or(0, |l| l.rotations),
        global_mean_v_all: global_mean(summaries.iter().map(|s| s.mean_v_all)),
        global_mean_v_stratified: global_mean(summaries.iter().map(|s| s.mean_v_stratified)),
        layers: summaries,
    }
}

/// Every array of every layer under its file name, in a fixed order: (name, shape, values).
pub fn arrays(layers: &[LayerVariance]) -> Vec<(String, Vec<usize>, &[f64])> {
    let mut out = Vec::new();
    for l in layers {
        let shape = l.unit_shape.clone();
        let name = &l.name;
        for (q, v) in [("v", &l.all.v), ("vt", &l.all.vt), ("vx", &l.all.vx)] {
            out.push((format!("{name}/all/{q}"), shape.clone(), v.as_slice()));
        }
        out.push((format!("{name}/stratified/v"), shape.clone(), l.stratified.as_slice()));
        for (k, c) in l.classes.iter().enumerate() {
            for (q, v) in [("v", &c.v), ("vt", &c.vt), ("vx", &c.vx)] {
                out.push((format!("{name}/class{k}/{q}"), shape.clone(), v.as_slice()));
            }
        }
    }
    out
}

/// Write the arrays (safetensors, with the summary in its header) and the summary (pretty
/// JSON), each atomically.
pub fn write(tensors_path: &Path, summary_path: &Path, layers: &[LayerVariance], summary: &Summary) -> Result<()> {
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = arrays(layers)
        .into_iter()
        .map(|(name, shape, v)| (name, Dtype::F64, shape, bytemuck::cast_slice(v).to_vec()))
        .collect();
    for l in layers {
        let counts: Vec<i64> = l.class_counts.iter().map(|&c| c as i64).collect();
        blobs.push((
            format!("{}/class_counts", l.name),
            Dtype::I64,
            vec![counts.len()],
            bytemuck::cast_slice(&counts).to_vec(),
        ));
    }
    let views: Vec<(String, TensorView)> =
        blobs.iter().map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?))).collect::<Result<_>>()?;
    let mut info = HashMap::new();
    info.insert(META_KEY.to_string(), serde_json::to_string(summary)?);
    let bytes = safetensors::tensor::serialize(views, Some(info))?;
    write_atomic(tensors_path, &bytes)?;
    write_json(summary_path, summary)
}

/// A short table: layer, units, mean V over all samples, mean stratified V, non-finite counts,
/// and the global means.
pub fn table(summary: &Summary) -> String {
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    let width = summary.layers.iter().map(|l| l.name.len()).max().unwrap_or(0).max("global".len());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<width$}  {:>8}  {:>10}  {:>12}  {:>10}",
        "layer", "units", "V all", "V stratified", "non-finite"
    );
    for l in &summary.layers {
        let _ = writeln!(
            s,
            "{:<width$}  {:>8}  {:>10}  {:>12}  {:>10}",
            l.name,
            l.units,
            fmt(l.mean_v_all),
            fmt(l.mean_v_stratified),
            format!("{}/{}", l.non_finite_v_all, l.non_finite_v_stratified)
        );
    }
    let _ = writeln!(
        s,
        "{:<width$}  {:>8}  {:>10}  {:>12}",
        "global",
        "",
        fmt(summary.global_mean_v_all),
        fmt(summary.global_mean_v_stratified)
    );
    s
}

/// Per layer, the unrotated and rotated model's mean V side by side (all and stratified), and
/// the global means: the comparison the pair exists for.
pub fn pair_table(unrotated: &Summary, rotated: &Summary) -> String {
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    let width = unrotated.layers.iter().map(|l| l.name.len()).max().unwrap_or(0).max("global".len());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<width$}  {:>12} {:>12}  {:>12} {:>12}",
        "mean V", "unrot. all", "rot. all", "unrot. strat", "rot. strat"
    );
    for (u, r) in unrotated.layers.iter().zip(&rotated.layers) {
        let _ = writeln!(
            s,
            "{:<width$}  {:>12} {:>12}  {:>12} {:>12}",
            u.name,
            fmt(u.mean_v_all),
            fmt(r.mean_v_all),
            fmt(u.mean_v_stratified),
            fmt(r.mean_v_stratified)
        );
    }
    let _ = writeln!(
        s,
        "{:<width$}  {:>12} {:>12}  {:>12} {:>12}",
        "global",
        fmt(unrotated.global_mean_v_all),
        fmt(rotated.global_mean_v_all),
        fmt(unrotated.global_mean_v_stratified),
        fmt(rotated.global_mean_v_stratified)
    );
    s
}
