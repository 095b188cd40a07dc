//! Pooling on the CPU, parallel over (image, channel) planes.
//!
//! `forward_generic`/`backward_generic` are the reference for any window, stride and padding. The
//! 2×2 stride-2 max pool that every model here uses has its own loops (a tenth of a SimpleConv
//! training step went to the generic window arithmetic); they compare and break ties in the same
//! order as the generic code, so their results are bit-identical to it (tested below).

use crate::backend::{PoolGeom, PoolKind};
use rayon::prelude::*;

/// The valid input rows (or columns) of output index `o`'s window: padding is skipped.
fn window(o: usize, g: &PoolGeom, size: usize) -> std::ops::Range<usize> {
    let start = (o * g.stride) as isize - g.pad as isize;
    let lo = start.max(0) as usize;
    let hi = ((start + g.k as isize).max(0) as usize).min(size);
    lo..hi
}

/// Planes per parallel task: a plane is small, so give each task several.
const PLANES_PER_TASK: usize = 16;

fn is_max_2x2(kind: PoolKind, g: &PoolGeom) -> bool {
    kind == PoolKind::Max && g.k == 2 && g.stride == 2 && g.pad == 0
}

pub fn forward(kind: PoolKind, x: &[f32], y: &mut [f32], g: &PoolGeom) {
    if !is_max_2x2(kind, g) {
        return forward_generic(kind, x, y, g);
    }
    let (ip, op) = (g.h * g.w, g.oh * g.ow);
    y.par_chunks_mut(op * PLANES_PER_TASK).enumerate().for_each(|(t, ys)| {
        for (i, yp) in ys.chunks_mut(op).enumerate() {
            let plane = t * PLANES_PER_TASK + i;
            let xp = &x[plane * ip..(plane + 1) * ip];
            for (oy, yr) in yp.chunks_mut(g.ow).enumerate() {
                let r0 = &xp[2 * oy * g.w..(2 * oy + 1) * g.w];
                let r1 = &xp[(2 * oy + 1) * g.w..(2 * oy + 2) * g.w];
                for (ox, v) in yr.iter_mut().enumerate() {
                    let j = 2 * ox;
                    *v = f32::NEG_INFINITY.max(r0[j]).max(r0[j + 1]).max(r1[j]).max(r1[j + 1]);
                }
            }
        }
    });
}

pub fn backward(kind: PoolKind, x: &[f32], dy: &[f32], dx: &mut [f32], g: &PoolGeom) {
    if !is_max_2x2(kind, g) {
        return backward_generic(kind, x, dy, dx, g);
    }
    let (ip, op) = (g.h * g.w, g.oh * g.ow);
    dx.par_chunks_mut(ip * PLANES_PER_TASK).enumerate().for_each(|(t, dxs)| {
        dxs.fill(0.0);
        for (i, dxp) in dxs.chunks_mut(ip).enumerate() {
            let plane = t * PLANES_PER_TASK + i;
            let xp = &x[plane * ip..(plane + 1) * ip];
            let dyp = &dy[plane * op..(plane + 1) * op];
            for oy in 0..g.oh {
                let (i0, i1) = (2 * oy * g.w, (2 * oy + 1) * g.w);
                for ox in 0..g.ow {
                    let j = 2 * ox;
                    // The first maximum in window order wins, as in the generic code.
                    let mut best = (xp[i0 + j], i0 + j);
                    for at in [i0 + j + 1, i1 + j, i1 + j + 1] {
                        if xp[at] > best.0 {
                            best = (xp[at], at);
                        }
                    }
                    dxp[best.1] += dyp[oy * g.ow + ox];
                }
            }
        }
    });
}

pub fn forward_generic(kind: PoolKind, x: &[f32], y: &mut [f32], g: &PoolGeom) {
    let (ip, op) = (g.h * g.w, g.oh * g.ow);
    let area = (g.k * g.k) as f32;
    y.par_chunks_mut(op).enumerate().for_each(|(plane, yp)| {
        let xp = &x[plane * ip..(plane + 1) * ip];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let (rows, cols) = (window(oy, g, g.h), window(ox, g, g.w));
                yp[oy * g.ow + ox] = match kind {
                    PoolKind::Max => {
                        let mut m = f32::NEG_INFINITY;
                        for iy in rows {
                            for ix in cols.clone() {
                                m = m.max(xp[iy * g.w + ix]);
                            }
                        }
                        m
                    }
                    PoolKind::Avg => {
                        let mut s = 0.0f32;
                        for iy in rows {
                            for ix in cols.clone() {
                                s += xp[iy * g.w + ix];
                            }
                        }
                        s / area
                    }
                };
            }
        }
    });
}

pub fn backward_generic(kind: PoolKind, x: &[f32], dy: &[f32], dx: &mut [f32], g: &PoolGeom) {
    let (ip, op) = (g.h * g.w, g.oh * g.ow);
    let area = (g.k * g.k) as f32;
    dx.par_chunks_mut(ip).enumerate().for_each(|(plane, dxp)| {
        let xp = &x[plane * ip..(plane + 1) * ip];
        let dyp = &dy[plane * op..(plane + 1) * op];
        dxp.fill(0.0);
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let (rows, cols) = (window(oy, g, g.h), window(ox, g, g.w));
                let d = dyp[oy * g.ow + ox];
                match kind {
                    PoolKind::Max => {
                        let mut best = (f32::NEG_INFINITY, usize::MAX);
                        for iy in rows {
                            for ix in cols.clone() {
                                let v = xp[iy * g.w + ix];
                                // strict '>' keeps the first maximum, as the forward would
                                if v > best.0 || best.1 == usize::MAX {
                                    best = (v, iy * g.w + ix);
                                }
                            }
                        }
                        if best.1 != usize::MAX {
                            dxp[best.1] += d;
                        }
                    }
                    PoolKind::Avg => {
                        for iy in rows {
                            for ix in cols.clone() {
                                dxp[iy * g.w + ix] += d / area;
                            }
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The 2×2 fast path against the generic loops: odd sizes (a row and a column the windows
    /// never reach), ties (values drawn from a handful of levels) and NaN, bit for bit.
    #[test]
    fn max_2x2_fast_path_matches_generic() {
        let mut rng = Rng::new(7);
        for &(n, c, h, w) in &[(2, 3, 8, 8), (3, 5, 7, 9), (1, 17, 28, 28), (2, 2, 3, 2)] {
            let g = PoolGeom::new(n, c, h, w, 2, 2, 0).unwrap();
            let mut x: Vec<f32> = (0..n * c * h * w).map(|_| (rng.below(5) as f32) - 2.0).collect();
            x[3] = f32::NAN;
            x[n * c * h * w / 2] = f32::NAN;
            let dy: Vec<f32> = (0..n * c * g.oh * g.ow).map(|_| rng.normal()).collect();
            let (mut y_fast, mut y_ref) = (vec![f32::NAN; dy.len()], vec![-7.0; dy.len()]);
            forward(PoolKind::Max, &x, &mut y_fast, &g);
            forward_generic(PoolKind::Max, &x, &mut y_ref, &g);
            assert_eq!(
                y_fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y_ref.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let (mut dx_fast, mut dx_ref) = (vec![f32::NAN; x.len()], vec![-7.0; x.len()]);
            backward(PoolKind::Max, &x, &dy, &mut dx_fast, &g);
            backward_generic(PoolKind::Max, &x, &dy, &mut dx_ref, &g);
            assert_eq!(
                dx_fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                dx_ref.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
