//! The measure over a whole dataset, streamed: each batch of samples is rotated by each angle in
//! turn and run through the model in eval mode; every named intermediate output feeds its
//! layer's running state on the device. Nothing grows with n × m: memory is the model's
//! activations for one batch plus, per layer, moments of size classes × rotations × units.

use super::fed::MeasureFeed;
use super::{finalize, LayerVariance};
use crate::backend::{class_ranks, BackendRef, Interp, MapReduce, VarianceGeom, VarianceMoments, VarianceState};
use crate::models::Model;
use crate::nn::Forward;
use crate::ops;
use crate::tensor::Tensor;
use crate::train::DeviceDataset;
use crate::transform::TransformSet;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What one unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// Every position of every feature map is a unit.
    Element,
    /// Each feature map is one unit: its H×W values reduced by [`MapReduce`].
    Map,
}

/// Settings of one measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasureConfig {
    /// The transformations t_1..t_m (by default the rotations of [`rotation_angles`]), applied
    /// with bilinear sampling.
    pub transforms: TransformSet,
    /// Per-channel value outside the rotated image: for normalized data, the normalized value of
    /// raw black (−mean/std), as docs/transformations.md explains.
    pub fill: Vec<f32>,
    pub per: Per,
    /// Reduction of a feature map's H×W values when `per == Map`.
    pub reduce: MapReduce,
    /// Samples per forward pass.
    pub batch: usize,
}

/// m rotations evenly spaced over 360°, starting at −180°: −180 + 360·j/m for j = 0..m
/// (16 gives the reference's −180° by 22.5°). Computed in f64, rounded once.
pub fn rotation_angles(m: usize) -> Vec<f32> {
    (0..m).map(|j| (-180.0 + 360.0 * j as f64 / m as f64) as f32).collect()
}

/// One layer being measured.
struct Layer {
    name: String,
    /// The intermediate's shape without the batch dimension, to catch a model that changes it.
    sample_shape: Vec<usize>,
    unit_shape: Vec<usize>,
    state: VarianceState,
}

/// The layers of a measurement, in the order the model reports its intermediates.
struct Layers<G: Fn(usize, usize) -> VarianceGeom> {
    list: Vec<Layer>,
    /// The geometry of a layer of `units` units of `hw` values each.
    geom: G,
    per: Per,
}

impl<G: Fn(usize, usize) -> VarianceGeom> Layers<G> {
    /// The layer that intermediate `pos` of a pass (`name`, of shape `shape` with the batch
    /// first) feeds: the `first` pass creates the layers, every later pass must report the same
    /// intermediates in the same order.
    fn at(&mut self, be: &BackendRef, first: bool, pos: usize, name: &str, shape: &[usize]) -> Result<&mut Layer> {
        let sample_shape = &shape[1..];
        if first {
            let (unit_shape, hw) = layout(name, sample_shape, self.per)?;
            let g = (self.geom)(unit_shape.iter().product(), hw);
            let state = be.variance_init(&g).with_context(|| format!("measure: layer {name}"))?;
            self.list.push(Layer { name: name.to_string(), sample_shape: sample_shape.to_vec(), unit_shape, state });
        }
        match self.list.get_mut(pos) {
            Some(layer) if layer.name == name && layer.sample_shape == sample_shape => Ok(layer),
            other => bail!(
                "measure: intermediate {pos} is {name} {sample_shape:?}; the first forward pass reported {}",
                other.map_or("nothing there".into(), |l| format!("{} {:?}", l.name, l.sample_shape))
            ),
        }
    }

    /// After a pass that reported `count` intermediates.
    fn check_count(&self, count: usize) -> Result<()> {
        if count != self.list.len() {
            bail!("measure: a forward pass reported {count} intermediates, the first reported {}", self.list.len());
        }
        Ok(())
    }
}

/// Units and values per unit of an intermediate of per-sample shape `s`.
fn layout(name: &str, s: &[usize], per: Per) -> Result<(Vec<usize>, usize)> {
    match (s, per) {
        ([c, h, w], Per::Element) => Ok((vec![*c, *h, *w], 1)),
        ([c, h, w], Per::Map) => Ok((vec![*c], h * w)),
        ([f], _) => Ok((vec![*f], 1)),
        _ => bail!(
            "measure: layer {name} outputs samples of shape {s:?}; the variance measure handles [N, C, H, W] \
             and [N, F] outputs"
        ),
    }
}

/// Measure every named intermediate of `model` (in its order) over every sample of `data`,
/// stratified by the dataset's labels. `progress(done, total)` is called after each forward
/// pass (one batch at one rotation; total = batches × rotations).
///
/// For each batch (samples in dataset order, `cfg.batch` at a time) and each rotation j in
/// order: the batch is transformed by point j of `cfg.transforms` ([`ops::warp`], bilinear, `cfg.fill`),
/// the model runs in eval mode with an observer, and each intermediate updates its layer's
/// state (`Backend::variance_update`). Results do not depend on `cfg.batch`.
pub fn measure(
    model: &Model,
    data: &DeviceDataset,
    cfg: &MeasureConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerVariance>> {
    measure_moments(model, data, 0..data.len(), cfg, progress)?
        .iter()
        .map(|l| finalize(&l.name, &l.unit_shape, &l.moments))
        .collect()
}

/// One layer's accumulated moments, before they become V: what a shard stores and a merge adds.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerMoments {
    pub name: String,
    pub unit_shape: Vec<usize>,
    pub moments: VarianceMoments,
}

/// The moments of [`measure`] over the samples `range` of `data` only (a shard of the test set).
pub fn measure_moments(
    model: &Model,
    data: &DeviceDataset,
    range: std::ops::Range<usize>,
    cfg: &MeasureConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerMoments>> {
    if range.end > data.len() || range.start > range.end {
        bail!("measure: samples {range:?} are outside the {} of the dataset", data.len());
    }
    let n = range.len();
    let classes = data.num_classes;
    if n == 0 {
        bail!("measure: the dataset is empty");
    }
    if cfg.batch == 0 {
        bail!("measure: the batch size must be at least 1");
    }
    if cfg.transforms.len() < 2 {
        bail!(
            "measure: {} transformation(s) given; V_t needs at least two (the variation over one is zero)",
            cfg.transforms.len()
        );
    }
    let mats = cfg.transforms.matrices();
    if let Some(m) = mats.iter().find(|m| m.iter().any(|v| !v.is_finite())) {
        bail!("measure: sampling matrix {m:?} is not finite");
    }
    if cfg.fill.len() != data.item_shape[0] {
        bail!("measure: {} fill values for {}-channel images (one per channel)", cfg.fill.len(), data.item_shape[0]);
    }
    if let Some((i, &l)) = data.labels_host.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
        bail!("measure: sample {i} has label {l}, but the dataset has {classes} classes");
    }
    let be = data.images.backend().clone();
    let m = mats.len();
    let batch = cfg.batch.min(n);
    let order: Vec<u32> = (range.start as u32..range.end as u32).collect();
    let total = n.div_ceil(batch) * m;
    let mut seen = vec![0u32; classes];
    let geom = |units, hw| VarianceGeom { batch, units, hw, reduce: cfg.reduce, classes, rotations: m };
    let mut layers = Layers { list: Vec::new(), geom, per: cfg.per };
    // Full batches replay their passes as one graph where the backend has graphs.
    let mut feed = MeasureFeed::new(data, batch, &mats, &cfg.fill)?;
    let mut passes = 0;
    for idx in order.chunks(batch) {
        let class: Vec<u32> = idx.iter().map(|&i| data.labels_host[i as usize] as u32).collect();
        let rank = class_ranks(&mut seen, &class);
        if let Some(f) = feed.as_mut().filter(|_| idx.len() == batch) {
            f.load(data, idx)?;
            for l in &mut layers.list {
                be.variance_begin_fed(&mut l.state, &class, &rank)
                    .with_context(|| format!("measure: layer {}", l.name))?;
            }
            for _ in 0..m {
                let first = passes == 0;
                let reported = f.pass(model, &mut |pos, name, t, counter| {
                    let layer = layers.at(&be, first, pos, name, t.shape())?;
                    if first {
                        be.variance_begin_fed(&mut layer.state, &class, &rank)?;
                    }
                    be.variance_update_fed(&mut layer.state, &t.storage(), &counter.storage())
                        .with_context(|| format!("measure: layer {name}"))
                })?;
                if let Some(count) = reported {
                    layers.check_count(count)?;
                }
                passes += 1;
                progress(passes, total);
            }
            for l in &mut layers.list {
                be.variance_end_fed(&mut l.state).with_context(|| format!("measure: layer {}", l.name))?;
            }
            continue;
        }
        let (x, _) = data.batch(idx)?;
        for (j, mat) in mats.iter().enumerate() {
            let xr = ops::warp(&x, &vec![*mat; idx.len()], Interp::Bilinear, &cfg.fill)?;
            let (first, mut pos) = (passes == 0, 0usize);
            let mut observe = |name: &str, t: &Tensor| -> Result<()> {
                let layer = layers.at(&be, first, pos, name, t.shape())?;
                be.variance_update(&mut layer.state, &t.storage(), idx.len(), &class, &rank, j)
                    .with_context(|| format!("measure: layer {name}"))?;
                pos += 1;
                Ok(())
            };
            model.forward(&xr, &mut Forward::observe(&mut observe))?;
            layers.check_count(pos)?;
            passes += 1;
            progress(passes, total);
        }
    }
    let layers = layers.list;
    layers
        .into_iter()
        .map(|l| {
            let moments = be.variance_read(&l.state).with_context(|| format!("measure: layer {}", l.name))?;
            Ok(LayerMoments { name: l.name, unit_shape: l.unit_shape, moments })
        })
        .collect()
}
