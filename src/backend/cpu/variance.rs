//! The variance measure's accumulators on the CPU: the reference twin of kernels/variance.cu.
//!
//! Accumulators are stored unit-major ([unit][class][rotation], [unit][slot], [unit][class]) so
//! that rayon can hand each task a contiguous block of whole units; `read` transposes them into
//! the class-major layout of [`VarianceMoments`]. Each unit's samples are processed in order by
//! one task, so the bits never depend on the number of threads.

use crate::backend::variance::{reduce_unit, std_from_m2, welford_step};
use crate::backend::{VarianceGeom, VarianceMoments};
use rayon::prelude::*;

/// Units per rayon task: enough work to amortize scheduling.
const UNIT_CHUNK: usize = 64;
/// Rows (sample, unit) per task when reducing activations.
const ROW_CHUNK: usize = 1024;

pub struct CpuVariance {
    /// [unit][class][rotation]
    vx_mean: Vec<f64>,
    vx_m2: Vec<f64>,
    /// [unit][slot]
    vt_mean: Vec<f64>,
    vt_m2: Vec<f64>,
    /// [unit][class]
    sum_std: Vec<f64>,
    /// Scratch: the current batch's unit values, [slot][unit].
    vals: Vec<f64>,
}

impl CpuVariance {
    pub fn zeros(g: &VarianceGeom) -> Self {
        CpuVariance {
            vx_mean: vec![0.0; g.vx_len()],
            vx_m2: vec![0.0; g.vx_len()],
            vt_mean: vec![0.0; g.vt_len()],
            vt_m2: vec![0.0; g.vt_len()],
            sum_std: vec![0.0; g.sum_len()],
            vals: vec![0.0; g.vt_len()],
        }
    }

    /// One update; the caller (`VarianceState::check_update`) has checked every argument.
    pub fn update(&mut self, g: &VarianceGeom, act: &[f32], n: usize, class: &[u32], rank: &[u32], j: usize) {
        let (units, hw, reduce) = (g.units, g.hw, g.reduce);
        let vals = &mut self.vals[..n * units];
        vals.par_chunks_mut(ROW_CHUNK).enumerate().for_each(|(c, out)| {
            for (i, v) in out.iter_mut().enumerate() {
                let row = c * ROW_CHUNK + i;
                *v = reduce_unit(&act[row * hw..(row + 1) * hw], reduce);
            }
        });
        let vals = &self.vals;
        let (km, m, slots, k) = (g.classes * g.rotations, g.rotations, g.batch, g.classes);
        self.vx_mean
            .par_chunks_mut(UNIT_CHUNK * km)
            .zip(self.vx_m2.par_chunks_mut(UNIT_CHUNK * km))
            .zip(self.vt_mean.par_chunks_mut(UNIT_CHUNK * slots))
            .zip(self.vt_m2.par_chunks_mut(UNIT_CHUNK * slots))
            .zip(self.sum_std.par_chunks_mut(UNIT_CHUNK * k))
            .enumerate()
            .for_each(|(c, ((((xm, x2), tm), t2), ss))| {
                for du in 0..xm.len() / km {
                    let u = c * UNIT_CHUNK + du;
                    let (xm, x2) = (&mut xm[du * km..(du + 1) * km], &mut x2[du * km..(du + 1) * km]);
                    let (tm, t2) = (&mut tm[du * slots..(du + 1) * slots], &mut t2[du * slots..(du + 1) * slots]);
                    let ss = &mut ss[du * k..(du + 1) * k];
                    for b in 0..n {
                        let v = vals[b * units + u];
                        let cls = class[b] as usize;
                        let xi = cls * m + j;
                        welford_step(&mut xm[xi], &mut x2[xi], v, rank[b] as f64);
                        if j == 0 {
                            tm[b] = v;
                            t2[b] = 0.0;
                        } else {
                            welford_step(&mut tm[b], &mut t2[b], v, (j + 1) as f64);
                        }
                        if j + 1 == m {
                            ss[cls] += std_from_m2(t2[b], m as f64);
                        }
                    }
                }
            });
    }

    /// The accumulators in the class-major layout of [`VarianceMoments`].
    pub fn read(&self, g: &VarianceGeom, class_counts: Vec<u64>) -> VarianceMoments {
        let (units, km) = (g.units, g.classes * g.rotations);
        let transpose = |src: &[f64], inner: usize| -> Vec<f64> {
            let mut out = vec![0.0; src.len()];
            for u in 0..units {
                for i in 0..inner {
                    out[i * units + u] = src[u * inner + i];
                }
            }
            out
        };
        VarianceMoments {
            geom: *g,
            class_counts,
            vx_mean: transpose(&self.vx_mean, km),
            vx_m2: transpose(&self.vx_m2, km),
            vt_sum_std: transpose(&self.sum_std, g.classes),
        }
    }
}
