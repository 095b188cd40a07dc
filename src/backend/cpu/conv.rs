//! Convolution on the CPU: im2col + GEMM, parallel over images.
//!
//! Forward and backward-data are independent per image. Backward-weight sums over images, so it
//! is split into chunks of a fixed number of images whose partial sums are added in chunk order:
//! the result is bit-identical whatever the thread count.

use super::gemm::{sgemm, Mat};
use crate::backend::{Activation, ConvGeom};
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

thread_local! {
    /// Per-thread copy of one input plane with its zero border, for im2col and col2im.
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Spare values after a padded plane, so 8-wide row copies may read past its end.
const SLACK: usize = 8;

/// Run `f` with this thread's zeroed padded-plane buffer (rows of `g.w + 2·pad`).
fn with_padded<R>(g: &ConvGeom, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let len = (g.h + 2 * g.pad) * (g.w + 2 * g.pad) + SLACK;
    PADDED.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        b.resize(len, 0.0);
        f(&mut b)
    })
}

/// col[(ci, ky, kx), (oy, ox)] = x[ci, oy*s - p + ky, ox*s - p + kx] (0 outside the image).
///
/// Each input plane is first copied inside a zero border, so every output row becomes a plain
/// copy with no bounds logic (the window always lies inside the padded plane). Rows shorter than
/// 16 values (7×7 and 14×14 outputs) go in whole 8-value chunks that may spill into the next
/// row of the same block, which is written right after: a call to memcpy per 7-value row cost
/// more than the copy.
///
/// Row `r` of the matrix is `col[r*ld .. r*ld + oh*ow]`; `ld > oh*ow` lays several images'
/// matrices side by side.
pub fn im2col(x: &[f32], g: &ConvGeom, col: &mut [f32], ld: usize) {
    let p = g.oh * g.ow;
    let wp = g.w + 2 * g.pad;
    let chunks = g.ow.div_ceil(8);
    // Rows whose chunked copy stays inside the block; the rest are copied exactly.
    let chunked_rows =
        if g.stride == 1 && g.ow < 16 { (p + 1).saturating_sub(8 * chunks).div_ceil(g.ow).min(g.oh) } else { 0 };
    with_padded(g, |padded| {
        for ci in 0..g.c_in {
            let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            for (y, src) in plane.chunks_exact(g.w).enumerate() {
                let at = (y + g.pad) * wp + g.pad;
                padded[at..at + g.w].copy_from_slice(src);
            }
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = (ci * g.kh + ky) * g.kw + kx;
                    let dst = &mut col[row * ld..row * ld + p];
                    for oy in 0..chunked_rows {
                        let (s0, d0) = ((oy + ky) * wp + kx, oy * g.ow);
                        for c in 0..chunks {
                            let s: &[f32; 8] = padded[s0 + 8 * c..s0 + 8 * c + 8].try_into().unwrap();
                            let d: &mut [f32; 8] = (&mut dst[d0 + 8 * c..d0 + 8 * c + 8]).try_into().unwrap();
                            *d = *s;
                        }
                    }
                    for oy in chunked_rows..g.oh {
                        let src = &padded[(oy * g.stride + ky) * wp + kx..];
                        let drow = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                        if g.stride == 1 {
                            drow.iter_mut().zip(src).for_each(|(d, s)| *d = *s);
                        } else {
                            drow.iter_mut().zip(src.iter().step_by(g.stride)).for_each(|(d, s)| *d = *s);
                        }
                    }
                }
            }
        }
    })
}

/// The adjoint of im2col: dx[ci, iy, ix] += dcol[...] for every place it was copied from.
///
/// Sums into a padded plane (in the same order as a direct scatter would, so the result is the
/// same to the bit) and keeps its interior.
pub fn col2im(col: &[f32], g: &ConvGeom, dx: &mut [f32], ld: usize) {
    let p = g.oh * g.ow;
    let wp = g.w + 2 * g.pad;
    with_padded(g, |padded| {
        for ci in 0..g.c_in {
            if ci > 0 {
                padded.fill(0.0);
            }
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = (ci * g.kh + ky) * g.kw + kx;
                    let src = &col[row * ld..row * ld + p];
                    for (oy, srow) in src.chunks_exact(g.ow).enumerate() {
                        let drow = &mut padded[(oy * g.stride + ky) * wp + kx..];
                        if g.stride == 1 {
                            drow.iter_mut().zip(srow).for_each(|(d, s)| *d += s);
                        } else {
                            drow.iter_mut().step_by(g.stride).zip(srow).for_each(|(d, s)| *d += s);
                        }
                    }
                }
            }
            let plane = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            for (y, drow) in plane.chunks_exact_mut(g.w).enumerate() {
                let at = (y + g.pad) * wp + g.pad;
                drow.copy_from_slice(&padded[at..at + g.w]);
            }
        }
    })
}

/// Images whose im2col matrices share one GEMM. A 7×7 output gives the GEMM only 49 columns,
/// too few for its micro-kernels to run at speed; eight images side by side give 392 (forward
/// and backward-data then run about a quarter faster; backward-weight, whose reduction runs over
/// the pixels, gains most on 4×4 maps). Larger outputs gain nothing. Fixed by the geometry
/// alone, so results never depend on the thread count. Equal to `WGRAD_CHUNK` where it is not 1,
/// so backward-weight's chunks are exactly its groups.
fn images_per_gemm(g: &ConvGeom) -> usize {
    if is_pointwise(g) || g.oh * g.ow >= 100 {
        1
    } else {
        8
    }
}

pub fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, act: Activation, y: &mut [f32], g: &ConvGeom) {
    let (in_img, out_img, p, k) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow, g.oh * g.ow, g.k());
    let group = images_per_gemm(g);
    y.par_chunks_mut(out_img * group).enumerate().for_each(|(t, ys)| {
        let imgs = ys.len() / out_img;
        let xs = &x[t * group * in_img..(t * group + imgs) * in_img];
        if is_pointwise(g) {
            sgemm(g.c_out, p, k, w, Mat::rows(k), xs, Mat::rows(p), ys, Mat::rows(p), false);
        } else if group == 1 {
            with_scratch(k * p, |col| {
                im2col(xs, g, col, p);
                sgemm(g.c_out, p, k, w, Mat::rows(k), col, Mat::rows(p), ys, Mat::rows(p), false);
            });
        } else {
            // out[c_out, imgs·p] = w · col[k, imgs·p], then each image's planes to NCHW.
            let ld = imgs * p;
            with_scratch((k + g.c_out) * ld, |buf| {
                let (col, out) = buf.split_at_mut(k * ld);
                for (i, xn) in xs.chunks_exact(in_img).enumerate() {
                    im2col(xn, g, &mut col[i * p..], ld);
                }
                sgemm(g.c_out, ld, k, w, Mat::rows(k), col, Mat::rows(ld), out, Mat::rows(ld), false);
                for (i, yn) in ys.chunks_exact_mut(out_img).enumerate() {
                    for (co, plane) in yn.chunks_exact_mut(p).enumerate() {
                        plane.copy_from_slice(&out[co * ld + i * p..co * ld + (i + 1) * p]);
                    }
                }
            });
        }
        // The epilogue while the chunk is still in cache.
        for (plane, row) in ys.chunks_mut(p).enumerate() {
            match b {
                Some(b) => row.iter_mut().for_each(|v| *v = act.apply(*v + b[plane % g.c_out])),
                None if act != Activation::Identity => row.iter_mut().for_each(|v| *v = act.apply(*v)),
                None => {}
            }
        }
    });
}

pub fn backward_data(dy: &[f32], w: &[f32], dx: &mut [f32], g: &ConvGeom) {
    let (in_img, out_img, p, k) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow, g.oh * g.ow, g.k());
    let group = images_per_gemm(g);
    dx.par_chunks_mut(in_img * group).enumerate().for_each(|(t, dxs)| {
        let imgs = dxs.len() / in_img;
        let dys = &dy[t * group * out_img..(t * group + imgs) * out_img];
        // dcol[k, p] = wᵀ[k, c_out] · dy[c_out, p]
        if is_pointwise(g) {
            sgemm(k, p, g.c_out, w, Mat::transposed(k), dys, Mat::rows(p), dxs, Mat::rows(p), false);
        } else if group == 1 {
            with_scratch(k * p, |dcol| {
                sgemm(k, p, g.c_out, w, Mat::transposed(k), dys, Mat::rows(p), dcol, Mat::rows(p), false);
                col2im(dcol, g, dxs, p);
            });
        } else {
            let ld = imgs * p;
            with_scratch((g.c_out + k) * ld, |buf| {
                let (dyb, dcol) = buf.split_at_mut(g.c_out * ld);
                for (i, dyn_) in dys.chunks_exact(out_img).enumerate() {
                    for (co, plane) in dyn_.chunks_exact(p).enumerate() {
                        dyb[co * ld + i * p..co * ld + (i + 1) * p].copy_from_slice(plane);
                    }
                }
                sgemm(k, ld, g.c_out, w, Mat::transposed(k), dyb, Mat::rows(ld), dcol, Mat::rows(ld), false);
                for (i, dxn) in dxs.chunks_exact_mut(in_img).enumerate() {
                    col2im(&dcol[i * p..], g, dxn, ld);
                }
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
            let images = c * WGRAD_CHUNK..((c + 1) * WGRAD_CHUNK).min(g.n);
            if images_per_gemm(g) > 1 {
                // Small outputs: the chunk's images side by side, one GEMM with a reduction of
                // imgs·p instead of imgs GEMMs reducing over p (16 values for a 4×4 map).
                let ld = images.len() * p;
                with_scratch((g.c_out + k) * ld, |buf| {
                    let (dyb, col) = buf.split_at_mut(g.c_out * ld);
                    for (i, n) in images.enumerate() {
                        for co in 0..g.c_out {
                            let plane = &dy[n * out_img + co * p..n * out_img + (co + 1) * p];
                            dyb[co * ld + i * p..co * ld + (i + 1) * p].copy_from_slice(plane);
                        }
                        im2col(&x[n * in_img..(n + 1) * in_img], g, &mut col[i * p..], ld);
                    }
                    sgemm(g.c_out, k, ld, dyb, Mat::rows(ld), col, Mat::transposed(ld), &mut acc, Mat::rows(k), false);
                });
                return acc;
            }
            for n in images {
                let xn = &x[n * in_img..(n + 1) * in_img];
                let dyn_ = &dy[n * out_img..(n + 1) * out_img];
                // dw[c_out, k] += dy[c_out, p] · colᵀ[p, k]
                if is_pointwise(g) {
                    sgemm(g.c_out, k, p, dyn_, Mat::rows(p), xn, Mat::transposed(p), &mut acc, Mat::rows(k), true);
                } else {
                    with_scratch(k * p, |col| {
                        im2col(xn, g, col, p);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// im2col and col2im against their definitions, bit for bit, on row widths on both sides of
    /// the chunked-copy limit, strides 1–3 and paddings up to the kernel size.
    #[test]
    fn im2col_and_col2im_match_their_definitions() {
        let mut rng = Rng::new(11);
        let mut cases = 0;
        for &(c, h, w) in &[(2, 7, 7), (1, 5, 9), (3, 14, 13), (1, 28, 28), (2, 3, 20), (1, 1, 6)] {
            for &(kh, kw) in &[(1, 1), (3, 3), (5, 5), (2, 3)] {
                for stride in 1..=3 {
                    for pad in 0..=kh.max(kw) {
                        let Ok(g) = ConvGeom::new(1, c, h, w, 2, (kh, kw), stride, pad) else { continue };
                        cases += 1;
                        let x: Vec<f32> = (0..c * h * w).map(|_| rng.normal()).collect();
                        let (k, p) = (g.k(), g.oh * g.ow);
                        let mut col = vec![f32::NAN; k * p];
                        im2col(&x, &g, &mut col, p);
                        let dcol: Vec<f32> = (0..k * p).map(|_| rng.normal()).collect();
                        let mut want_dx = vec![0.0f32; c * h * w];
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let r = (ci * kh + ky) * kw + kx;
                                    for oy in 0..g.oh {
                                        for ox in 0..g.ow {
                                            let iy = (oy * stride + ky) as isize - pad as isize;
                                            let ix = (ox * stride + kx) as isize - pad as isize;
                                            let inside = iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                                            let at = ci * h * w + (iy.max(0) as usize) * w + ix.max(0) as usize;
                                            let want = if inside { x[at] } else { 0.0 };
                                            assert_eq!(
                                                col[r * p + oy * g.ow + ox].to_bits(),
                                                want.to_bits(),
                                                "{g:?} row {r} ({oy},{ox})"
                                            );
                                            if inside {
                                                want_dx[at] += dcol[r * p + oy * g.ow + ox];
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        let mut dx = vec![f32::NAN; c * h * w];
                        col2im(&dcol, &g, &mut dx, p);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&dx), bits(&want_dx), "{g:?}");
                        // The same as the middle image of three laid side by side (row stride 3p).
                        let ld = 3 * p;
                        let mut wide = vec![f32::NAN; k * ld];
                        im2col(&x, &g, &mut wide[p..], ld);
                        let mut wide_dcol = vec![f32::NAN; k * ld];
                        for r in 0..k {
                            assert_eq!(
                                bits(&wide[r * ld + p..r * ld + 2 * p]),
                                bits(&col[r * p..(r + 1) * p]),
                                "{g:?}"
                            );
                            wide_dcol[r * ld + p..r * ld + 2 * p].copy_from_slice(&dcol[r * p..(r + 1) * p]);
                        }
                        let mut wide_dx = vec![f32::NAN; c * h * w];
                        col2im(&wide_dcol[p..], &g, &mut wide_dx, ld);
                        assert_eq!(bits(&wide_dx), bits(&want_dx), "{g:?}");
                    }
                }
            }
        }
        assert!(cases > 200, "only {cases} geometries were valid");
    }
}
