//! Batch normalization on the CPU, parallel over channels.
//!
//! Statistics are two-pass in f64 (mean first, then the mean of squared deviations), never
//! E[x²] − E[x]², which cancels catastrophically when the mean is large against the spread.

use crate::backend::{Activation, NormGeom};
use rayon::prelude::*;

/// Channel `c`'s values, sample by sample, as slices of the NCHW buffer.
fn channel<'a>(x: &'a [f32], g: &NormGeom, c: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
    let (cs, hw) = (g.c * g.hw, g.hw);
    (0..g.n).map(move |n| &x[n * cs + c * hw..n * cs + (c + 1) * hw])
}

/// Writes into disjoint channel positions of one output from many threads.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    /// SAFETY: callers write each index from exactly one thread.
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// (mean, biased variance) of each channel.
pub fn stats(x: &[f32], g: &NormGeom) -> Vec<(f64, f64)> {
    let count = g.count() as f64;
    (0..g.c)
        .into_par_iter()
        .map(|c| {
            let mean = channel(x, g, c).flat_map(|s| s.iter()).map(|&v| v as f64).sum::<f64>() / count;
            let var = channel(x, g, c).flat_map(|s| s.iter()).map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / count;
            (mean, var)
        })
        .collect()
}

/// y = act((x - mean[c]) · scale[c] + shift[c]) for per-channel mean, scale (γ/σ) and shift (β).
pub fn normalize(x: &[f32], mean: &[f32], scale: &[f32], shift: &[f32], act: Activation, y: &mut [f32], g: &NormGeom) {
    let (cs, hw) = (g.c * g.hw, g.hw);
    let out = SharedOut(y.as_mut_ptr());
    (0..g.c).into_par_iter().for_each(|c| {
        for n in 0..g.n {
            let base = n * cs + c * hw;
            for i in base..base + hw {
                // SAFETY: channel c's positions are written by this task only.
                unsafe { out.write(i, act.apply((x[i] - mean[c]) * scale[c] + shift[c])) };
            }
        }
    });
}

/// Backward of training-mode batch norm.
///
/// With x̂ = (x − μ)·σ⁻¹: dβ = Σ dy, dγ = Σ dy·x̂, dx = γσ⁻¹ (dy − dβ/N − x̂·dγ/N).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    g: &NormGeom,
) {
    let count = g.count() as f64;
    let sums: Vec<(f64, f64)> = (0..g.c)
        .into_par_iter()
        .map(|c| {
            let (mut sdy, mut sdyx) = (0.0f64, 0.0f64);
            for (xs, dys) in channel(x, g, c).zip(channel(dy, g, c)) {
                for (&xv, &d) in xs.iter().zip(dys) {
                    sdy += d as f64;
                    sdyx += d as f64 * ((xv - mean[c]) * invstd[c]) as f64;
                }
            }
            (sdy, sdyx)
        })
        .collect();
    for c in 0..g.c {
        dbeta[c] = sums[c].0 as f32;
        dgamma[c] = sums[c].1 as f32;
    }
    let (cs, hw) = (g.c * g.hw, g.hw);
    let out = SharedOut(dx.as_mut_ptr());
    (0..g.c).into_par_iter().for_each(|c| {
        let k = gamma[c] * invstd[c];
        let (mdy, mdyx) = ((sums[c].0 / count) as f32, (sums[c].1 / count) as f32);
        for n in 0..g.n {
            let base = n * cs + c * hw;
            for i in base..base + hw {
                let xhat = (x[i] - mean[c]) * invstd[c];
                // SAFETY: channel c's positions are written by this task only.
                unsafe { out.write(i, k * (dy[i] - mdy - xhat * mdyx)) };
            }
        }
    });
}
