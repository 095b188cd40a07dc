//! Image rotation (and zoom, flips and translation: any affine sampling matrix) on the CPU, parallel over
//! (image, channel) planes. The arithmetic is spelled out operation by operation and matches
//! kernels/rotate.cu exactly (see `Backend::warp`).

use crate::backend::{Affine, Interp, RotateGeom};
use rayon::prelude::*;

/// (1−t)·a + t·b, or `a` itself when t is exactly 0.
#[inline]
fn lerp(a: f32, b: impl FnOnce() -> f32, t: f32) -> f32 {
    if t == 0.0 {
        a
    } else {
        (1.0 - t) * a + t * b()
    }
}

pub fn warp(x: &[f32], mats: &[Affine], interp: Interp, fill: &[f32], y: &mut [f32], g: &RotateGeom) {
    let (h, w) = (g.h, g.w);
    let hw = h * w;
    if hw == 0 {
        return;
    }
    let cx = 0.5f32 * (w - 1) as f32;
    let cy = 0.5f32 * (h - 1) as f32;
    y.par_chunks_mut(hw).enumerate().for_each(|(plane, yp)| {
        let (img, ch) = (plane / g.c, plane % g.c);
        let [m0, m1, m2, m3, tx, ty] = mats[img];
        let fv = fill[ch];
        let xp = &x[plane * hw..(plane + 1) * hw];
        let tap = |ix: f32, iy: f32| -> f32 {
            if ix >= 0.0 && iy >= 0.0 && ix < w as f32 && iy < h as f32 {
                xp[iy as usize * w + ix as usize]
            } else {
                fv
            }
        };
        for oy in 0..h {
            let fy = (oy as f32 - cy) - ty;
            for ox in 0..w {
                let fx = (ox as f32 - cx) - tx;
                let sx = (m0 * fx + m1 * fy) + cx;
                let sy = (m2 * fx + m3 * fy) + cy;
                yp[oy * w + ox] = match interp {
                    Interp::Nearest => tap(sx.round_ties_even(), sy.round_ties_even()),
                    Interp::Bilinear => {
                        let (x0, y0) = (sx.floor(), sy.floor());
                        let (wx, wy) = (sx - x0, sy - y0);
                        let top = lerp(tap(x0, y0), || tap(x0 + 1.0, y0), wx);
                        lerp(top, || lerp(tap(x0, y0 + 1.0), || tap(x0 + 1.0, y0 + 1.0), wx), wy)
                    }
                };
            }
        }
    });
}
