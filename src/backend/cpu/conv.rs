//! Convolution on the CPU: im2col + GEMM, parallel over images.
//!
//! Forward and backward-data are independent per image. Backward-weight sums over images, so it
//! is split into chunks of a fixed number of images whose partial sums are added in chunk order:
//! the result is bit-identical whatever the thread count.

use super::gemm::{sgemm, Mat};
use crate::backend::ConvGeom;
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    /// Per-thread im2col scratch, kept across calls so its pages are faulted in only once.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's scratch buffer of at least `len` values.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// Images per partial sum in backward-weight. Fixed (never derived from the thread count) so the
/// summation order, and therefore every bit of the result, is the same on any machine.
const WGRAD_CHUNK: usize = 8;

fn is_pointwise(g: &ConvGeom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0
}

/// The output columns `ox` whose input column `ox*stride - pad + kx` lies inside the image.
fn valid_cols(g: &ConvGeom, kx: usize) -> (usize, usize) {
    let s = g.stride;
    // smallest ox with ox*s + kx >= pad, and first ox with ox*s + kx >= pad + w
    let lo = g.pad.saturating_sub(kx).div_ceil(s);
    let hi = (g.pad + g.w).saturating_sub(kx).div_ceil(s).min(g.ow);
    (lo.min(hi), hi)
}

/// col[(ci, ky, kx), (oy, ox)] = x[ci, oy*s - p + ky, ox*s - p + kx] (0 outside the image).
///
/// Each output row splits into a zero prefix, a run of valid columns (a plain copy when the
/// stride is 1) and a zero suffix, so the inner loops carry no bounds checks per element.
pub fn im2col(x: &[f32], g: &ConvGeom, col: &mut [f32]) {
    let p = g.oh * g.ow;
    for ci in 0..g.c_in {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = (ci * g.kh + ky) * g.kw + kx;
                let dst = &mut col[row * p..(row + 1) * p];
                let (lo, hi) = valid_cols(g, kx);
                for oy in 0..g.oh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    let drow = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                    if iy < 0 || iy >= g.h as isize {
                        drow.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    drow[..lo].fill(0.0);
                    drow[hi..].fill(0.0);
                    // A kernel column that sees only padding (kernel wider than the padded
                    // image reaches) has no valid run.
                    if lo == hi {
                        continue;
                    }
                    let first = lo * g.stride + kx - g.pad;
                    if g.stride == 1 {
                        drow[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                    } else {
                        for (j, d) in drow[lo..hi].iter_mut().enumerate() {
                            *d = src[first + j * g.stride];
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of im2col: dx[ci, iy, ix] += dcol[...] for every place it was copied from.
pub fn col2im(col: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    let p = g.oh * g.ow;
    dx.fill(0.0);
    for ci in 0..g.c_in {
        let plane = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = (ci * g.kh + ky) * g.kw + kx;
                let src = &col[row * p..(row + 1) * p];
                let (lo, hi) = valid_cols(g, kx);
                for oy in 0..g.oh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    if lo == hi {
                        continue;
                    }
                    let drow = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let srow = &src[oy * g.ow + lo..oy * g.ow + hi];
                    let first = lo * g.stride + kx - g.pad;
                    if g.stride == 1 {
                        drow[first..first + (hi - lo)].iter_mut().zip(srow).for_each(|(d, s)| *d += s);
                    } else {
                        for (j, s) in srow.iter().enumerate() {
                            drow[first + j * g.stride] += s;
                        }
                    }
                }
            }
        }
    }
}

pub fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32], g: &ConvGeom) {
    let (in_img, out_img, p, k) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow, g.oh * g.ow, g.k());
    y.par_chunks_mut(out_img).enumerate().for_each(|(n, yn)| {
        let xn = &x[n * in_img..(n + 1) * in_img];
        if is_pointwise(g) {
            sgemm(g.c_out, p, k, w, Mat::rows(k), xn, Mat::rows(p), yn, Mat::rows(p), false);
        } else {
            with_scratch(k * p, |col| {
                im2col(xn, g, col);
                sgemm(g.c_out, p, k, w, Mat::rows(k), col, Mat::rows(p), yn, Mat::rows(p), false);
            });
        }
        if let Some(b) = b {
            for (co, row) in yn.chunks_mut(p).enumerate() {
                row.iter_mut().for_each(|v| *v += b[co]);
            }
        }
    });
}

pub fn backward_data(dy: &[f32], w: &[f32], dx: &mut [f32], g: &ConvGeom) {
    let (in_img, out_img, p, k) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow, g.oh * g.ow, g.k());
    dx.par_chunks_mut(in_img).enumerate().for_each(|(n, dxn)| {
        let dyn_ = &dy[n * out_img..(n + 1) * out_img];
        // dcol[k, p] = wᵀ[k, c_out] · dy[c_out, p]
        if is_pointwise(g) {
            sgemm(k, p, g.c_out, w, Mat::transposed(k), dyn_, Mat::rows(p), dxn, Mat::rows(p), false);
        } else {
            with_scratch(k * p, |dcol| {
                sgemm(k, p, g.c_out, w, Mat::transposed(k), dyn_, Mat::rows(p), dcol, Mat::rows(p), false);
                col2im(dcol, g, dxn);
            });
        }
    });
}

/// The sum of one output plane, in eight f32 lanes (which vectorize) gathered in f64: a plane
/// holds at most a few thousand values, so the f32 lanes lose nothing that matters.
fn row_sum(row: &[f32]) -> f64 {
    let mut lanes = [0.0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().map(|&v| v as f64).sum::<f64>() + tail
}

pub fn backward_weight(x: &[f32], dy: &[f32], dw: &mut [f32], db: Option<&mut [f32]>, g: &ConvGeom) {
    let (in_img, out_img, p, k) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow, g.oh * g.ow, g.k());
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(WGRAD_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0.0f32; g.c_out * k];
            for n in c * WGRAD_CHUNK..((c + 1) * WGRAD_CHUNK).min(g.n) {
                let xn = &x[n * in_img..(n + 1) * in_img];
                let dyn_ = &dy[n * out_img..(n + 1) * out_img];
                // dw[c_out, k] += dy[c_out, p] · colᵀ[p, k]
                if is_pointwise(g) {
                    sgemm(g.c_out, k, p, dyn_, Mat::rows(p), xn, Mat::transposed(p), &mut acc, Mat::rows(k), true);
                } else {
                    with_scratch(k * p, |col| {
                        im2col(xn, g, col);
                        sgemm(g.c_out, k, p, dyn_, Mat::rows(p), col, Mat::transposed(p), &mut acc, Mat::rows(k), true);
                    });
                }
            }
            acc
        })
        .collect();
    dw.fill(0.0);
    for part in &partials {
        dw.iter_mut().zip(part).for_each(|(d, v)| *d += v);
    }
    if let Some(db) = db {
        db.par_iter_mut().enumerate().for_each(|(co, d)| {
            let mut s = 0.0f64;
            for n in 0..g.n {
                s += row_sum(&dy[n * out_img + co * p..n * out_img + (co + 1) * p]);
            }
            *d = s as f32;
        });
    }
}
