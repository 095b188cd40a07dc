//! Convolution on the CPU: im2col + GEMM, parallel over images.
//!
//! Forward and backward-data are independent per image. Backward-weight sums over images, so it
//! is split into chunks of a fixed number of images whose partial sums are added in chunk order:
//! the result is bit-identical whatever the thread count.

use super::gemm::{sgemm, Mat};
use crate::backend::ConvGeom;
use rayon::prelude::*;

/// Images per partial sum in backward-weight. Fixed (never derived from the thread count) so the
/// summation order, and therefore every bit of the result, is the same on any machine.
const WGRAD_CHUNK: usize = 8;

fn is_pointwise(g: &ConvGeom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0
}

/// col[(ci, ky, kx), (oy, ox)] = x[ci, oy*s - p + ky, ox*s - p + kx] (0 outside the image).
pub fn im2col(x: &[f32], g: &ConvGeom, col: &mut [f32]) {
    let p = g.oh * g.ow;
    for ci in 0..g.c_in {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = (ci * g.kh + ky) * g.kw + kx;
                let dst = &mut col[row * p..(row + 1) * p];
                for oy in 0..g.oh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    let drow = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                    if iy < 0 || iy >= g.h as isize {
                        drow.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    for (ox, d) in drow.iter_mut().enumerate() {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        *d = if ix < 0 || ix >= g.w as isize {
                            0.0
                        } else {
                            src[ix as usize]
                        };
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
                for oy in 0..g.oh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let drow = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    for ox in 0..g.ow {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if ix >= 0 && ix < g.w as isize {
                            drow[ix as usize] += src[oy * g.ow + ox];
                        }
                    }
                }
            }
        }
    }
}

pub fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32], g: &ConvGeom) {
    let (in_img, out_img, p, k) = (
        g.c_in * g.h * g.w,
        g.c_out * g.oh * g.ow,
        g.oh * g.ow,
        g.k(),
    );
    y.par_chunks_mut(out_img)
        .enumerate()
        .for_each_init(Vec::new, |col, (n, yn)| {
            let xn = &x[n * in_img..(n + 1) * in_img];
            let cols: &[f32] = if is_pointwise(g) {
                xn
            } else {
                col.resize(k * p, 0.0);
                im2col(xn, g, col);
                col
            };
            sgemm(
                g.c_out,
                p,
                k,
                w,
                Mat::rows(k),
                cols,
                Mat::rows(p),
                yn,
                Mat::rows(p),
                false,
            );
            if let Some(b) = b {
                for (co, row) in yn.chunks_mut(p).enumerate() {
                    row.iter_mut().for_each(|v| *v += b[co]);
                }
            }
        });
}

pub fn backward_data(dy: &[f32], w: &[f32], dx: &mut [f32], g: &ConvGeom) {
    let (in_img, out_img, p, k) = (
        g.c_in * g.h * g.w,
        g.c_out * g.oh * g.ow,
        g.oh * g.ow,
        g.k(),
    );
    dx.par_chunks_mut(in_img)
        .enumerate()
        .for_each_init(Vec::new, |dcol, (n, dxn)| {
            let dyn_ = &dy[n * out_img..(n + 1) * out_img];
            // dcol[k, p] = wᵀ[k, c_out] · dy[c_out, p]
            if is_pointwise(g) {
                sgemm(
                    k,
                    p,
                    g.c_out,
                    w,
                    Mat::transposed(k),
                    dyn_,
                    Mat::rows(p),
                    dxn,
                    Mat::rows(p),
                    false,
                );
            } else {
                dcol.resize(k * p, 0.0);
                sgemm(
                    k,
                    p,
                    g.c_out,
                    w,
                    Mat::transposed(k),
                    dyn_,
                    Mat::rows(p),
                    dcol,
                    Mat::rows(p),
                    false,
                );
                col2im(dcol, g, dxn);
            }
        });
}

pub fn backward_weight(
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    g: &ConvGeom,
) {
    let (in_img, out_img, p, k) = (
        g.c_in * g.h * g.w,
        g.c_out * g.oh * g.ow,
        g.oh * g.ow,
        g.k(),
    );
    let chunks = g.n.div_ceil(WGRAD_CHUNK);
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0.0f32; g.c_out * k];
            let mut col = Vec::new();
            for n in c * WGRAD_CHUNK..((c + 1) * WGRAD_CHUNK).min(g.n) {
                let xn = &x[n * in_img..(n + 1) * in_img];
                let dyn_ = &dy[n * out_img..(n + 1) * out_img];
                let cols: &[f32] = if is_pointwise(g) {
                    xn
                } else {
                    col.resize(k * p, 0.0);
                    im2col(xn, g, &mut col);
                    &col
                };
                // dw[c_out, k] += dy[c_out, p] · colᵀ[p, k]
                sgemm(
                    g.c_out,
                    k,
                    p,
                    dyn_,
                    Mat::rows(p),
                    cols,
                    Mat::transposed(p),
                    &mut acc,
                    Mat::rows(k),
                    true,
                );
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
                let row = &dy[n * out_img + co * p..n * out_img + (co + 1) * p];
                s += row.iter().map(|&v| v as f64).sum::<f64>();
            }
            *d = s as f32;
        });
    }
}
