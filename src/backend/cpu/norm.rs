//! Batch normalization on the CPU: the sums parallel over channels, the elementwise passes over
//! planes in memory order.
//!
//! Statistics are two-pass in f64 (mean first, then the mean of squared deviations), never
//! E[x²] − E[x]², which cancels catastrophically when the mean is large against the spread.

use super::isa::{self, vectorized, Isa};
use crate::backend::{Activation, NormGeom};
use rayon::prelude::*;

/// The vector set the passes are compiled for: the GEMM path's (so a forced AVX2 holds here
/// too). Their arithmetic is lane by lane in a fixed order, so its width cannot show in the
/// bits; left at the build's baseline (SSE2), the f64 sums of a ResNet-20 step's batch norms
/// ran 4 values at a time.
fn isa() -> Isa {
    isa::active().unwrap_or_else(Isa::best)
}

/// Channel `c`'s values, sample by sample, as slices of the NCHW buffer.
fn channel<'a>(x: &'a [f32], g: &NormGeom, c: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
    let (cs, hw) = (g.c * g.hw, g.hw);
    (0..g.n).map(move |n| &x[n * cs + c * hw..n * cs + (c + 1) * hw])
}

/// Σ term(v) over channel `c`'s values in f64, in eight interleaved lanes added in a fixed order
/// at the end: one long chain of f64 adds waits on each add's latency (4 cycles a value; batch
/// norm's loops were a sixth of a ResNet-20 step); eight independent lanes vectorize.
#[inline(always)]
fn lane_sum<'a>(slices: impl Iterator<Item = (&'a [f32], &'a [f32])>, term: impl Fn(f32, f32) -> f64) -> f64 {
    let (mut lanes, mut tail) = ([0.0f64; 8], 0.0f64);
    for (a, b) in slices {
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
            tail += term(x, y);
        }
        for (xa, xb) in ca.zip(cb) {
            for l in 0..8 {
                lanes[l] += term(xa[l], xb[l]);
            }
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// (mean, biased variance) of each channel.
pub fn stats(x: &[f32], g: &NormGeom) -> Vec<(f64, f64)> {
    let count = g.count() as f64;
    (0..g.c)
        .into_par_iter()
        .map(|c| {
            vectorized(
                isa(),
                #[inline(always)]
                || {
                    let pairs = || channel(x, g, c).map(|s| (s, s));
                    let mean = lane_sum(pairs(), |v, _| v as f64) / count;
                    let var = lane_sum(pairs(), |v, _| (v as f64 - mean).powi(2)) / count;
                    (mean, var)
                },
            )
        })
        .collect()
}

/// y = act((x - mean[c]) · scale[c] + shift[c]) for per-channel mean, scale (γ/σ) and shift (β).
pub fn normalize(x: &[f32], mean: &[f32], scale: &[f32], shift: &[f32], act: Activation, y: &mut [f32], g: &NormGeom) {
    // Plane by plane in memory order, each reading its channel's constants.
    let hw = g.hw.max(1);
    let isa = isa();
    y.par_chunks_mut(hw * IMAGE_PLANES).enumerate().for_each(|(t, ys)| {
        vectorized(
            isa,
            #[inline(always)]
            || normalize_planes(x, mean, scale, shift, act, (t, ys), g),
        )
    });
}

#[inline(always)]
fn normalize_planes(
    x: &[f32],
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
    act: Activation,
    (t, ys): (usize, &mut [f32]),
    g: &NormGeom,
) {
    let hw = g.hw.max(1);
    for (i, dst) in ys.chunks_mut(hw).enumerate() {
        let plane = t * IMAGE_PLANES + i;
        let c = plane % g.c;
        let (m, k, b) = (mean[c], scale[c], shift[c]);
        let pairs = dst.iter_mut().zip(&x[plane * hw..(plane + 1) * hw]);
        // One loop per activation, so that each vectorizes.
        match act {
            Activation::Identity => pairs.for_each(|(o, v)| *o = (v - m) * k + b),
            Activation::Relu => pairs.for_each(|(o, v)| *o = Activation::Relu.apply((v - m) * k + b)),
        }
    }
}

/// Planes (one channel of one image) per task in the elementwise passes.
const IMAGE_PLANES: usize = 16;

/// Σ dy and Σ dy·x̂ over channel `c` in one pass, each summed as [`lane_sum`] sums it (eight
/// lanes, the tails apart), so the same bits as two passes; `dy` through the ReLU's mask where
/// `relu_y` (the fused ReLU's output) is given.
fn grad_sums(x: &[f32], relu_y: Option<&[f32]>, dy: &[f32], g: &NormGeom, c: usize, ms: (f32, f32)) -> (f64, f64) {
    let mut acc = ([[0.0f64; 8]; 2], [0.0f64; 2]);
    let (cs, hw) = (g.c * g.hw, g.hw);
    for n in 0..g.n {
        let at = n * cs + c * hw..n * cs + (c + 1) * hw;
        let (xs, ds) = (&x[at.clone()], &dy[at.clone()]);
        match relu_y {
            Some(y) => sample_sums::<true>(xs, &y[at], ds, ms, &mut acc),
            None => sample_sums::<false>(xs, ds, ds, ms, &mut acc),
        }
    }
    let (lanes, tails) = acc;
    (lanes[0].iter().sum::<f64>() + tails[0], lanes[1].iter().sum::<f64>() + tails[1])
}

/// One sample's share of [`grad_sums`], dy through the ReLU's mask (`ys`) if `RELU` (compiled
/// once each way, so that neither loop tests for it per value).
#[inline(always)]
fn sample_sums<const RELU: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    (m, s): (f32, f32),
    (lanes, tails): &mut ([[f64; 8]; 2], [f64; 2]),
) {
    let d_of = |y: f32, d: f32| if RELU { super::relu_grad(y, d) } else { d };
    let (xc, yc, dc) = (xs.chunks_exact(8), ys.chunks_exact(8), ds.chunks_exact(8));
    for ((&xv, &y), &d) in xc.remainder().iter().zip(yc.remainder()).zip(dc.remainder()) {
        let d = d_of(y, d);
        tails[0] += d as f64;
        tails[1] += d as f64 * ((xv - m) * s) as f64;
    }
    for ((xv, yv), dv) in xc.zip(yc).zip(dc) {
        for l in 0..8 {
            let d = d_of(yv[l], dv[l]);
            lanes[0][l] += d as f64;
            lanes[1][l] += d as f64 * ((xv[l] - m) * s) as f64;
        }
    }
}

/// Backward of training-mode batch norm, through the fused ReLU's mask first where `relu_y` (its
/// output) is given: the same bits as applying `relu_grad` to dy beforehand, without the pass.
///
/// With x̂ = (x − μ)·σ⁻¹: dβ = Σ dy, dγ = Σ dy·x̂, dx = γσ⁻¹ (dy − dβ/N − x̂·dγ/N).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    relu_y: Option<&[f32]>,
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    g: &NormGeom,
) {
    let sums: Vec<(f64, f64)> = (0..g.c)
        .into_par_iter()
        .map(|c| {
            vectorized(
                isa(),
                #[inline(always)]
                || grad_sums(x, relu_y, dy, g, c, (mean[c], invstd[c])),
            )
        })
        .collect();
    for c in 0..g.c {
        dbeta[c] = sums[c].0 as f32;
        dgamma[c] = sums[c].1 as f32;
    }
    let hw = g.hw.max(1);
    // In memory order, as in `normalize`.
    let isa = isa();
    dx.par_chunks_mut(hw * IMAGE_PLANES).enumerate().for_each(|(t, dxs)| {
        vectorized(
            isa,
            #[inline(always)]
            || input_grads(x, gamma, mean, invstd, relu_y, dy, &sums, (t, dxs), g),
        )
    });
}

/// dx for the planes of one task (`t`), from the channel sums.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn input_grads(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    relu_y: Option<&[f32]>,
    dy: &[f32],
    sums: &[(f64, f64)],
    (t, dxs): (usize, &mut [f32]),
    g: &NormGeom,
) {
    let (hw, count) = (g.hw.max(1), g.count() as f64);
    for (i, dst) in dxs.chunks_mut(hw).enumerate() {
        let (plane, c) = (t * IMAGE_PLANES + i, (t * IMAGE_PLANES + i) % g.c);
        let k = gamma[c] * invstd[c];
        let (mdy, mdyx) = ((sums[c].0 / count) as f32, (sums[c].1 / count) as f32);
        let (m, s) = (mean[c], invstd[c]);
        let at = plane * hw..(plane + 1) * hw;
        let (xs, ds) = (&x[at.clone()], &dy[at.clone()]);
        // One loop each, so that each vectorizes.
        match relu_y {
            Some(y) => {
                for (((o, xv), d), yv) in dst.iter_mut().zip(xs).zip(ds).zip(&y[at]) {
                    let (xhat, d) = ((xv - m) * s, super::relu_grad(*yv, *d));
                    *o = k * (d - mdy - xhat * mdyx);
                }
            }
            None => {
                for ((o, xv), d) in dst.iter_mut().zip(xs).zip(ds) {
                    let xhat = (xv - m) * s;
                    *o = k * (d - mdy - xhat * mdyx);
                }
            }
        }
    }
}
