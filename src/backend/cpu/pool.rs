//! Pooling on the CPU, parallel over (image, channel) planes.

use crate::backend::{PoolGeom, PoolKind};
use rayon::prelude::*;

/// The valid input rows (or columns) of output index `o`'s window: padding is skipped.
fn window(o: usize, g: &PoolGeom, size: usize) -> std::ops::Range<usize> {
    let start = (o * g.stride) as isize - g.pad as isize;
    let lo = start.max(0) as usize;
    let hi = ((start + g.k as isize).max(0) as usize).min(size);
    lo..hi
}

pub fn forward(kind: PoolKind, x: &[f32], y: &mut [f32], g: &PoolGeom) {
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

pub fn backward(kind: PoolKind, x: &[f32], dy: &[f32], dx: &mut [f32], g: &PoolGeom) {
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
