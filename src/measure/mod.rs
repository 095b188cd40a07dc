//! The variance measure of Quiroga et al. (docs/measure.md): how much each unit of a network
//! varies under rotation, relative to how much it varies across samples.
//!
//! For one unit a, samples x_1..x_n and rotations t_1..t_m, A[i][j] = a(t_j(x_i)):
//! * V_t = mean over i of the standard deviation over j of A[i][·];
//! * V_x = mean over j of the standard deviation over i of A[·][j];
//! * V = V_t / V_x, with V = 1 when V_t = V_x = 0 and V = +inf when V_x = 0 < V_t.
//!
//! Standard deviations are unbiased (n − 1), 0 for a single observation. Despite its name,
//! V is a ratio of *standard deviations*, not of variances; rotvar keeps the published name
//! and computes what the definition says. *Stratified* V is V computed on each class's samples
//! separately, then averaged over the classes that have samples; *all* is V over every sample.
//!
//! The pieces: `stream` runs a model over a rotated dataset and feeds the backend's running
//! state (`Backend::variance_update`), [`finalize`] turns the state's moments into V, `output`
//! writes results, and `reference` computes the same numbers from a materialized A for tests.

pub mod fed;
pub mod job;
pub mod output;
pub mod reference;
pub mod shard;
pub mod stream;

pub use stream::{measure, measure_moments, rotation_angles, LayerMoments, MeasureConfig, Per};

use crate::backend::variance::std_from_m2;
use crate::backend::{MapReduce, VarianceMoments};
use anyhow::{bail, Result};

/// V_t, V_x and V of every unit for one set of samples, each [units].
#[derive(Debug, Clone, PartialEq)]
pub struct VarianceStats {
    pub vt: Vec<f64>,
    pub vx: Vec<f64>,
    pub v: Vec<f64>,
}

impl VarianceStats {
    /// Every value NaN: the stats of a class without samples.
    fn undefined(units: usize) -> Self {
        VarianceStats { vt: vec![f64::NAN; units], vx: vec![f64::NAN; units], v: vec![f64::NAN; units] }
    }
    fn from_parts(vt: Vec<f64>, vx: Vec<f64>) -> Self {
        let v = vt.iter().zip(&vx).map(|(&t, &x)| normalized(t, x)).collect();
        VarianceStats { vt, vx, v }
    }
}

/// The measure for every unit of one layer (one named intermediate of a model).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerVariance {
    pub name: String,
    /// Shape of one sample's units: [C, H, W] per element, [C] per feature map, [F] for a dense
    /// layer. Every array below is this shape, flattened in row-major order.
    pub unit_shape: Vec<usize>,
    /// Activation values reduced into one unit (H·W per feature map; 1 per element).
    pub map_size: usize,
    /// How they were reduced; `None` when `map_size == 1`.
    pub reduce: Option<MapReduce>,
    pub rotations: usize,
    /// Samples per class.
    pub class_counts: Vec<u64>,
    /// Per class k: V over that class's samples (all NaN for a class without samples).
    pub classes: Vec<VarianceStats>,
    /// V over every sample (non-stratified).
    pub all: VarianceStats,
    /// Per unit, the mean of the per-class V over the classes that have samples (an infinite
    /// class V makes it infinite).
    pub stratified: Vec<f64>,
}

impl LayerVariance {
    pub fn units(&self) -> usize {
        self.unit_shape.iter().product()
    }
    pub fn samples(&self) -> u64 {
        self.class_counts.iter().sum()
    }
    /// Mean of the finite non-stratified V values (`None` if there is none).
    pub fn mean_v_all(&self) -> Option<f64> {
        finite_mean(&self.all.v).0
    }
    /// Mean of the finite stratified V values (`None` if there is none).
    pub fn mean_v_stratified(&self) -> Option<f64> {
        finite_mean(&self.stratified).0
    }
}

/// V from V_t and V_x: the ratio when V_x > 0, 1 when both are 0, +inf when only V_x is 0, NaN
/// when either is NaN.
pub fn normalized(vt: f64, vx: f64) -> f64 {
    if vt.is_nan() || vx.is_nan() {
        f64::NAN
    } else if vx > 0.0 {
        vt / vx
    } else if vt == 0.0 {
        1.0
    } else {
        f64::INFINITY
    }
}

/// The mean of the finite values of `v` (`None` if there is none) and how many were not finite.
pub fn finite_mean(v: &[f64]) -> (Option<f64>, usize) {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for &x in v.iter().filter(|x| x.is_finite()) {
        sum += x;
        count += 1;
    }
    ((count > 0).then(|| sum / count as f64), v.len() - count)
}

/// The global mean over layers: the mean of the per-layer means, skipping layers without one.
/// Each layer weighs the same whatever its number of units, so a wide early layer does not
/// drown the rest (and this is the per-layer curve's average, which is what the published
/// tables report).
pub fn global_mean(layer_means: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let means: Vec<f64> = layer_means.into_iter().flatten().collect();
    (!means.is_empty()).then(|| means.iter().sum::<f64>() / means.len() as f64)
}

/// Add the moments of `b` (other samples of the same layer, geometry and rotations) into `a`:
/// counts and Σ std add; each (class, rotation, unit) mean and M2 combine with Chan et al.'s
/// pairwise formula, the same one [`finalize`] uses across classes. A side without samples of a
/// class leaves the other's moments as they are, bit for bit.
pub fn merge_moments(a: &mut VarianceMoments, b: &VarianceMoments) -> Result<()> {
    let (ga, gb) = (&a.geom, &b.geom);
    if (ga.units, ga.hw, ga.reduce, ga.classes, ga.rotations) != (gb.units, gb.hw, gb.reduce, gb.classes, gb.rotations)
        || a.vx_mean.len() != b.vx_mean.len()
        || a.vt_sum_std.len() != b.vt_sum_std.len()
    {
        bail!("cannot merge moments of different layouts ({ga:?} and {gb:?})");
    }
    let (units, m) = (ga.units, ga.rotations);
    for k in 0..ga.classes {
        let (na, nb) = (a.class_counts[k] as f64, b.class_counts[k] as f64);
        if nb == 0.0 {
            continue;
        }
        let span = k * m * units..(k + 1) * m * units;
        if na == 0.0 {
            a.vx_mean[span.clone()].copy_from_slice(&b.vx_mean[span.clone()]);
            a.vx_m2[span.clone()].copy_from_slice(&b.vx_m2[span]);
        } else {
            let nab = na + nb;
            for i in span {
                let d = b.vx_mean[i] - a.vx_mean[i];
                a.vx_mean[i] += d * nb / nab;
                a.vx_m2[i] += b.vx_m2[i] + d * d * na * nb / nab;
            }
        }
        for u in 0..units {
            a.vt_sum_std[k * units + u] += b.vt_sum_std[k * units + u];
        }
        a.class_counts[k] += b.class_counts[k];
    }
    Ok(())
}

/// V_t, V_x and V of one layer from the moments its running state accumulated.
///
/// Per class k with n_k samples: V_x = mean over j of sqrt(M2[k][j] / (n_k − 1)) (0 when
/// n_k ≤ 1), V_t = sum_std[k] / n_k. Over all samples, the class moments of each (j, u) are
/// merged in class order with Chan et al.'s pairwise formula (n = n_a + n_b, δ = mean_b − mean_a,
/// mean = mean_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n), and V_t = Σ_k sum_std[k] / n.
pub fn finalize(name: &str, unit_shape: &[usize], mom: &VarianceMoments) -> Result<LayerVariance> {
    let g = &mom.geom;
    let (units, k, m) = (g.units, g.classes, g.rotations);
    if unit_shape.iter().product::<usize>() != units {
        bail!("finalize {name}: unit shape {unit_shape:?} does not hold {units} units");
    }
    if mom.class_counts.len() != k
        || mom.vx_mean.len() != g.vx_len()
        || mom.vx_m2.len() != g.vx_len()
        || mom.vt_sum_std.len() != g.sum_len()
    {
        bail!("finalize {name}: moment arrays do not match the geometry {g:?}");
    }
    let at = |kk: usize, j: usize, u: usize| (kk * m + j) * units + u;
    let classes: Vec<VarianceStats> = (0..k)
        .map(|kk| {
            let nk = mom.class_counts[kk] as f64;
            if nk == 0.0 {
                return VarianceStats::undefined(units);
            }
            let vt = (0..units).map(|u| mom.vt_sum_std[kk * units + u] / nk).collect();
            let vx = (0..units)
                .map(|u| (0..m).map(|j| std_from_m2(mom.vx_m2[at(kk, j, u)], nk)).sum::<f64>() / m as f64)
                .collect();
            VarianceStats::from_parts(vt, vx)
        })
        .collect();

    let present: Vec<usize> = (0..k).filter(|&kk| mom.class_counts[kk] > 0).collect();
    let n: f64 = present.iter().map(|&kk| mom.class_counts[kk] as f64).sum();
    let all = if present.is_empty() {
        VarianceStats::undefined(units)
    } else {
        let vt =
            (0..units).map(|u| present.iter().map(|&kk| mom.vt_sum_std[kk * units + u]).sum::<f64>() / n).collect();
        let vx = (0..units)
            .map(|u| {
                let mut s = 0.0;
                for j in 0..m {
                    let (mut na, mut mean, mut m2) = (0.0f64, 0.0f64, 0.0f64);
                    for &kk in &present {
                        let (nb, mb, m2b) =
                            (mom.class_counts[kk] as f64, mom.vx_mean[at(kk, j, u)], mom.vx_m2[at(kk, j, u)]);
                        if na == 0.0 {
                            (na, mean, m2) = (nb, mb, m2b);
                            continue;
                        }
                        let nab = na + nb;
                        let d = mb - mean;
                        mean += d * nb / nab;
                        m2 += m2b + d * d * na * nb / nab;
                        na = nab;
                    }
                    s += std_from_m2(m2, na);
                }
                s / m as f64
            })
            .collect();
        VarianceStats::from_parts(vt, vx)
    };

    let stratified = (0..units)
        .map(|u| {
            if present.is_empty() {
                f64::NAN
            } else {
                present.iter().map(|&kk| classes[kk].v[u]).sum::<f64>() / present.len() as f64
            }
        })
        .collect();

    Ok(LayerVariance {
        name: name.to_string(),
        unit_shape: unit_shape.to_vec(),
        map_size: g.hw,
        reduce: (g.hw > 1).then_some(g.reduce),
        rotations: m,
        class_counts: mom.class_counts.clone(),
        classes,
        all,
        stratified,
    })
}
