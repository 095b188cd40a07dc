//! The image as the columns of a GEMM: the im2col matrix written out (`im2col`, and `col2im`
//! back), or read in place by the GEMM's packing (`ImageCols`, the implicit im2col). The
//! explicit route is the implicit one's oracle; `conv.rs` chooses between them.

use super::gemm::PackRhs;
use crate::backend::ConvGeom;
use std::cell::RefCell;

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
pub(super) fn im2col(x: &[f32], g: &ConvGeom, col: &mut [f32], ld: usize) {
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
pub(super) fn col2im(col: &[f32], g: &ConvGeom, dx: &mut [f32], ld: usize) {
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

thread_local! {
    /// Per-thread padded copies of a group of images, for the implicit im2col.
    static PADDED_IMAGES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The im2col matrix of consecutive images, read in place by the GEMM's packing instead of being
/// written out first: `[k × imgs·p]` (forward), or its transpose (the weight gradient). Element
/// ((ci, ky, kx), (i, oy, ox)) is `x[i][ci][oy·s + ky][ox·s + kx]` of the padded images.
pub(super) struct ImageCols<'a> {
    pub(super) x: &'a [f32],
    pub(super) g: &'a ConvGeom,
    /// Padded plane height and width.
    pub(super) hp: usize,
    pub(super) wp: usize,
    pub(super) transposed: bool,
}

impl ImageCols<'_> {
    /// Offset of tap `kk` = (ci, ky, kx) within an image.
    fn tap(&self, kk: usize) -> usize {
        let (taps, g) = (self.g.kh * self.g.kw, self.g);
        let (ci, r) = (kk / taps, kk % taps);
        ci * self.hp * self.wp + (r / g.kw) * self.wp + r % g.kw
    }

    /// The output pixels `pp..pp+count` (of the images side by side) as stretches within output
    /// rows: `(start in x, len)`, pixel j of a stretch at `start + j·s`. Computed once per strip
    /// and reused for every tap, so the packing loops do no division.
    fn runs(&self, pp: usize, count: usize, out: &mut Vec<(usize, usize)>) {
        let g = self.g;
        let (p, img) = (g.oh * g.ow, g.c_in * self.hp * self.wp);
        out.clear();
        let (mut q, mut left) = (pp, count);
        while left > 0 {
            let (i, r) = (q / p, q % p);
            let (oy, ox) = (r / g.ow, r % g.ow);
            let len = (g.ow - ox).min(left);
            out.push((i * img + oy * g.stride * self.wp + ox * g.stride, len));
            q += len;
            left -= len;
        }
    }
}

impl PackRhs for ImageCols<'_> {
    fn pack(&self, pc: usize, kc: usize, jc: usize, n: usize, nr: usize, dst: &mut [f32]) {
        let s = self.g.stride;
        let mut runs = Vec::with_capacity(16);
        if self.transposed {
            // Rows are pixels (the same ones for every strip), columns taps.
            self.runs(pc, kc, &mut runs);
        }
        for (t, strip) in dst.chunks_exact_mut(nr * kc).take(n.div_ceil(nr)).enumerate() {
            let cols = nr.min(n - t * nr);
            if !self.transposed {
                // Rows are taps, columns pixels: each strip row is a few stretches of image rows.
                self.runs(jc + t * nr, cols, &mut runs);
                for (p, d) in strip.chunks_exact_mut(nr).enumerate() {
                    let tap = self.tap(pc + p);
                    let mut j = 0;
                    for &(at, len) in &runs {
                        let src = &self.x[tap + at..];
                        if s == 1 {
                            d[j..j + len].copy_from_slice(&src[..len]);
                        } else {
                            d[j..j + len].iter_mut().zip(src.iter().step_by(s)).for_each(|(o, v)| *o = *v);
                        }
                        j += len;
                    }
                    d[cols..].fill(0.0);
                }
            } else {
                // Eight taps at a time, so each pixel writes 32 contiguous bytes of the strip
                // while eight streams read along image rows.
                if cols < nr {
                    strip.fill(0.0);
                }
                for j0 in (0..cols).step_by(8) {
                    let w = 8.min(cols - j0);
                    let taps: [usize; 8] = std::array::from_fn(|j| self.tap(jc + t * nr + j0 + j.min(w - 1)));
                    let last_tap = taps[w - 1].max(taps[0]);
                    let mut p = 0;
                    for &(at, len) in &runs {
                        // One bounds check per stretch instead of one per value.
                        assert!(last_tap + at + (len - 1) * s < self.x.len() && (p + len) * nr <= strip.len());
                        for e in 0..len {
                            let src = at + e * s;
                            let row = (p + e) * nr + j0;
                            for (j, tap) in taps.iter().enumerate().take(w) {
                                // SAFETY: taps ascend within a strip (so the last is the
                                // largest) and the assert above bounds this stretch.
                                unsafe { *strip.get_unchecked_mut(row + j) = *self.x.get_unchecked(tap + src) };
                            }
                        }
                        p += len;
                    }
                }
            }
        }
    }
}

/// Run `f` with `imgs` images of `x` inside their zero borders (or `x` itself without padding),
/// and the padded plane's height and width.
pub(super) fn with_padded_images<R>(
    x: &[f32],
    imgs: usize,
    g: &ConvGeom,
    f: impl FnOnce(&[f32], usize, usize) -> R,
) -> R {
    let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
    if g.pad == 0 {
        return f(&x[..imgs * g.c_in * g.h * g.w], hp, wp);
    }
    PADDED_IMAGES.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        b.resize(imgs * g.c_in * hp * wp, 0.0);
        for (plane, dst) in x.chunks_exact(g.h * g.w).take(imgs * g.c_in).zip(b.chunks_exact_mut(hp * wp)) {
            for (y, src) in plane.chunks_exact(g.w).enumerate() {
                let at = (y + g.pad) * wp + g.pad;
                dst[at..at + g.w].copy_from_slice(src);
            }
        }
        f(&b, hp, wp)
    })
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
