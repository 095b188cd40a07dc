//! Pooling on the CPU, parallel over (image, channel) planes.
//!
//! `forward_generic`/`backward_generic` are the reference for any window, stride and padding. The
//! 2×2 stride-2 max pool that every model here uses has its own loops (a tenth of a SimpleConv
//! training step went to the generic window arithmetic); they compare and break ties in the same
//! order as the generic code, so their results are bit-identical to it (tested below).

use super::isa::{self, vectorized, Isa};
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

/// Input columns per vector step: eight 2×2 windows side by side.
const STEP: usize = 16;

/// `N` values of `s` from `at`, zeros past its end (only the last row of the last plane gets
/// there; what lies past a row is never stored).
#[inline(always)]
fn load<const N: usize>(s: &[f32], at: usize) -> [f32; N] {
    match s.get(at..at + N) {
        Some(v) => v.try_into().unwrap(),
        None => std::array::from_fn(|k| s.get(at + k).copied().unwrap_or(0.0)),
    }
}

/// The vector set the pooling loops are compiled for: the GEMM path's, as for the convolutions.
fn isa() -> Isa {
    isa::active().unwrap_or_else(Isa::best)
}

pub fn forward(kind: PoolKind, x: &[f32], y: &mut [f32], g: &PoolGeom) {
    forward_on(isa(), kind, x, y, g)
}

fn forward_on(isa: Isa, kind: PoolKind, x: &[f32], y: &mut [f32], g: &PoolGeom) {
    if !is_max_2x2(kind, g) {
        return forward_generic(kind, x, y, g);
    }
    let (ip, op) = (g.h * g.w, g.oh * g.ow);
    y.par_chunks_mut(op * PLANES_PER_TASK).enumerate().for_each(|(t, ys)| {
        vectorized(
            isa,
            #[inline(always)]
            || {
                for (i, yp) in ys.chunks_mut(op).enumerate() {
                    let at = (t * PLANES_PER_TASK + i) * ip;
                    for (oy, yr) in yp.chunks_mut(g.ow).enumerate() {
                        let (top, bot) = (at + 2 * oy * g.w, at + (2 * oy + 1) * g.w);
                        for (j, out) in (0..2 * g.ow).step_by(STEP).zip(yr.chunks_mut(STEP / 2)) {
                            let (r0, r1): ([f32; STEP], [f32; STEP]) = (load(x, top + j), load(x, bot + j));
                            let m: [f32; STEP / 2] = std::array::from_fn(|k| {
                                f32::NEG_INFINITY.max(r0[2 * k]).max(r0[2 * k + 1]).max(r1[2 * k]).max(r1[2 * k + 1])
                            });
                            out.copy_from_slice(&m[..out.len()]);
                        }
                    }
                }
            },
        )
    });
}

/// The gradient of the 2×2 max pool without branches: every input column works out its
/// window's winner (the first maximum in window order, as in the generic code: a NaN in the
/// first place wins, elsewhere it never does) and takes the window's gradient if it is the
/// winner, zero if not; each input is written once. The scalar loop's data-dependent branch
/// mispredicted on about every other window (7% of a LeNet step went to it).
pub fn backward(kind: PoolKind, x: &[f32], dy: &[f32], dx: &mut [f32], g: &PoolGeom) {
    backward_on(isa(), kind, x, dy, dx, g)
}

/// [`backward`] into the output `x` of a ReLU, that ReLU's backward (`relu_grad`) and the sum of
/// the result per channel (`db`, as `conv::relu_and_bias_grad` sums it: per plane in f64, then
/// over images): the same bits, each plane finished while it is in cache.
pub fn backward_relu_bias(kind: PoolKind, x: &[f32], dy: &[f32], dz: &mut [f32], db: &mut [f32], g: &PoolGeom) {
    let ip = g.h * g.w;
    assert!(x.len() == g.n * g.c * ip && dz.len() == x.len() && db.len() == g.c);
    let mut sums = vec![0.0f64; g.n * g.c];
    let relu = |xp: &[f32], dzp: &mut [f32]| -> f64 {
        dzp.iter_mut().zip(xp).for_each(|(d, &y)| *d = super::relu_grad(y, *d));
        super::conv::row_sum(dzp)
    };
    if is_max_2x2(kind, g) {
        max_2x2_backward(isa(), x, dy, dz, g, &mut sums, relu);
    } else {
        backward_generic(kind, x, dy, dz, g);
        dz.par_chunks_mut(ip).zip(sums.par_iter_mut()).enumerate().for_each(|(plane, (dzp, s))| {
            *s = relu(&x[plane * ip..(plane + 1) * ip], dzp);
        });
    }
    for (c, d) in db.iter_mut().enumerate() {
        *d = (0..g.n).fold(0.0f64, |s, n| s + sums[n * g.c + c]) as f32;
    }
}

fn backward_on(isa: Isa, kind: PoolKind, x: &[f32], dy: &[f32], dx: &mut [f32], g: &PoolGeom) {
    if !is_max_2x2(kind, g) {
        return backward_generic(kind, x, dy, dx, g);
    }
    let mut unused = vec![0.0; g.n * g.c];
    max_2x2_backward(isa, x, dy, dx, g, &mut unused, |_, _| 0.0);
}

/// The 2×2 max pool's backward, plane by plane, each plane handed to `then` with its input as
/// soon as it is written; what `then` returns goes to the plane's place in `out`.
fn max_2x2_backward(
    isa: Isa,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    g: &PoolGeom,
    out: &mut [f64],
    then: impl Fn(&[f32], &mut [f32]) -> f64 + Sync,
) {
    let (ip, op, cols) = (g.h * g.w, g.oh * g.ow, 2 * g.ow);
    let rows: RowPair = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() => |t, b, d, ot, ob| unsafe { rows_avx512(t, b, d, ot, ob) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => |t, b, d, ot, ob| unsafe { rows_avx2(t, b, d, ot, ob) },
        _ => rows_plain,
    };
    let tasks = dx.par_chunks_mut(ip * PLANES_PER_TASK).zip(out.par_chunks_mut(PLANES_PER_TASK));
    tasks.enumerate().for_each(|(t, (dxs, outs))| {
        // `then` (a ReLU's backward and a plane sum) at the vector width too.
        vectorized(
            isa,
            #[inline(always)]
            || {
                for (i, (dxp, o)) in dxs.chunks_mut(ip).zip(outs).enumerate() {
                    let plane = t * PLANES_PER_TASK + i;
                    let (xp, dyp) = (&x[plane * ip..(plane + 1) * ip], &dy[plane * op..(plane + 1) * op]);
                    for (oy, d) in dyp.chunks_exact(g.ow).enumerate() {
                        let (top, bot) = (2 * oy * g.w, (2 * oy + 1) * g.w);
                        let (upper, lower) = dxp[top..bot + g.w].split_at_mut(g.w);
                        rows(&xp[top..top + cols], &xp[bot..bot + cols], d, &mut upper[..cols], &mut lower[..cols]);
                        // A last column no window reaches (odd widths).
                        upper[cols..].fill(0.0);
                        lower[cols..].fill(0.0);
                    }
                    // A last row no window reaches (odd heights).
                    dxp[2 * g.oh * g.w..].fill(0.0);
                    *o = then(xp, dxp);
                }
            },
        )
    });
}

/// One row of windows: the inputs' upper and lower rows (2·ow values each), the windows'
/// gradients (ow), and the two rows of the input gradient.
type RowPair = fn(&[f32], &[f32], &[f32], &mut [f32], &mut [f32]);

/// Which of a window's four inputs (a, b on top, c, d below, in window order) is its first
/// maximum: (b beat a, c beat the best before it, d beat the best before it); the winner is the
/// last input that beat its predecessors, a if none did.
#[inline(always)]
fn beats(a: f32, b: f32, c: f32, d: f32) -> (bool, bool, bool) {
    let after_b = b > a;
    let best = if after_b { b } else { a };
    let after_c = c > best;
    (after_b, after_c, d > if after_c { c } else { best })
}

/// The readable oracle of the vector versions (the portable path's).
fn rows_plain(top: &[f32], bot: &[f32], dy: &[f32], out_top: &mut [f32], out_bot: &mut [f32]) {
    for (i, &d) in dy.iter().enumerate() {
        let j = 2 * i;
        let (after_b, after_c, after_d) = beats(top[j], top[j + 1], bot[j], bot[j + 1]);
        // 0 + d, as the generic code's `+=` onto zero gives (−0 becomes +0).
        let (g, z) = (0.0 + d, 0.0);
        let upper = !after_c && !after_d;
        out_top[j] = if upper && !after_b { g } else { z };
        out_top[j + 1] = if upper && after_b { g } else { z };
        out_bot[j] = if after_c && !after_d { g } else { z };
        out_bot[j + 1] = if after_d { g } else { z };
    }
}

/// [`rows_plain`] 8 windows at a time: each column and its neighbour in the window (swapped in
/// by an in-lane permute) see the same four values, so both reach the same verdict, and each
/// keeps the gradient if it is the winner. The row's end goes through masked loads and stores.
///
/// # Safety
/// AVX-512F present; the slices as in [`RowPair`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(top: &[f32], bot: &[f32], dy: &[f32], out_top: &mut [f32], out_bot: &mut [f32]) {
    use std::arch::x86_64::*;
    let cols = top.len();
    assert!(bot.len() == cols && dy.len() * 2 == cols && out_top.len() == cols && out_bot.len() == cols);
    const EVEN: __mmask16 = 0x5555;
    // Gradient i to columns 2i and 2i + 1.
    let spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    for j in (0..cols).step_by(16) {
        let n = (cols - j).min(16);
        let (m, md) = (((1u32 << n) - 1) as __mmask16, ((1u32 << (n / 2)) - 1) as __mmask16);
        let t = _mm512_maskz_loadu_ps(m, top.as_ptr().add(j));
        let b = _mm512_maskz_loadu_ps(m, bot.as_ptr().add(j));
        let (ts, bs) = (_mm512_permute_ps::<0xb1>(t), _mm512_permute_ps::<0xb1>(b));
        // In window order, seen from either column.
        let wa = _mm512_mask_blend_ps(EVEN, ts, t);
        let wb = _mm512_mask_blend_ps(EVEN, t, ts);
        let wc = _mm512_mask_blend_ps(EVEN, bs, b);
        let wd = _mm512_mask_blend_ps(EVEN, b, bs);
        let after_b = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(wb, wa);
        let best = _mm512_mask_blend_ps(after_b, wa, wb);
        let after_c = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(wc, best);
        let best = _mm512_mask_blend_ps(after_c, best, wc);
        let after_d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(wd, best);
        // An even column is a (upper) or c (lower), an odd one b or d.
        let upper = !after_c & !after_d & (after_b ^ EVEN);
        let lower = (EVEN & after_c & !after_d) | (!EVEN & after_d);
        let d = _mm512_maskz_loadu_ps(md, dy.as_ptr().add(j / 2));
        let g = _mm512_add_ps(_mm512_setzero_ps(), _mm512_permutexvar_ps(spread, d));
        _mm512_mask_storeu_ps(out_top.as_mut_ptr().add(j), m, _mm512_maskz_mov_ps(upper, g));
        _mm512_mask_storeu_ps(out_bot.as_mut_ptr().add(j), m, _mm512_maskz_mov_ps(lower, g));
    }
}

/// [`rows_avx512`] on 256-bit vectors, 4 windows at a time, with the verdicts as lane masks.
///
/// # Safety
/// AVX2 present; the slices as in [`RowPair`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(top: &[f32], bot: &[f32], dy: &[f32], out_top: &mut [f32], out_bot: &mut [f32]) {
    use std::arch::x86_64::*;
    let cols = top.len();
    assert!(bot.len() == cols && dy.len() * 2 == cols && out_top.len() == cols && out_bot.len() == cols);
    let even = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
    let spread = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for j in (0..cols).step_by(8) {
        let n = (cols - j).min(8) as i32;
        // Lane k is loaded and stored if k < n (inputs) or k < n / 2 (gradients).
        let m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes);
        let md = _mm256_cmpgt_epi32(_mm256_set1_epi32(n / 2), lanes);
        let t = _mm256_maskload_ps(top.as_ptr().add(j), m);
        let b = _mm256_maskload_ps(bot.as_ptr().add(j), m);
        let (ts, bs) = (_mm256_permute_ps::<0xb1>(t), _mm256_permute_ps::<0xb1>(b));
        let wa = _mm256_blend_ps::<0xaa>(t, ts);
        let wb = _mm256_blend_ps::<0xaa>(ts, t);
        let wc = _mm256_blend_ps::<0xaa>(b, bs);
        let wd = _mm256_blend_ps::<0xaa>(bs, b);
        let after_b = _mm256_cmp_ps::<_CMP_GT_OQ>(wb, wa);
        let best = _mm256_blendv_ps(wa, wb, after_b);
        let after_c = _mm256_cmp_ps::<_CMP_GT_OQ>(wc, best);
        let best = _mm256_blendv_ps(best, wc, after_c);
        let after_d = _mm256_cmp_ps::<_CMP_GT_OQ>(wd, best);
        let upper = _mm256_andnot_ps(_mm256_or_ps(after_c, after_d), _mm256_xor_ps(after_b, even));
        let lower =
            _mm256_or_ps(_mm256_and_ps(even, _mm256_andnot_ps(after_d, after_c)), _mm256_andnot_ps(even, after_d));
        let d = _mm256_maskload_ps(dy.as_ptr().add(j / 2), md);
        let g = _mm256_add_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(d, spread));
        _mm256_maskstore_ps(out_top.as_mut_ptr().add(j), m, _mm256_and_ps(upper, g));
        _mm256_maskstore_ps(out_bot.as_mut_ptr().add(j), m, _mm256_and_ps(lower, g));
    }
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

    /// The 2×2 fast path, on every vector width this CPU runs, against the generic loops: odd
    /// sizes (a row and a column the windows never reach), rows longer than one vector step,
    /// ties (values drawn from a handful of levels), NaN and −0 gradients, bit for bit; outputs
    /// poisoned first.
    #[test]
    fn max_2x2_fast_path_matches_generic() {
        let mut rng = Rng::new(7);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for &(n, c, h, w) in &[(2, 3, 8, 8), (3, 5, 7, 9), (1, 17, 28, 28), (2, 2, 3, 2), (2, 3, 6, 35), (1, 2, 5, 50)]
        {
            let g = PoolGeom::new(n, c, h, w, 2, 2, 0).unwrap();
            let mut x: Vec<f32> = (0..n * c * h * w).map(|_| (rng.below(5) as f32) - 2.0).collect();
            x[3] = f32::NAN;
            x[n * c * h * w / 2] = f32::NAN;
            let mut dy: Vec<f32> = (0..n * c * g.oh * g.ow).map(|_| rng.normal()).collect();
            dy[1] = -0.0;
            let mut y_ref = vec![-7.0; dy.len()];
            forward_generic(PoolKind::Max, &x, &mut y_ref, &g);
            let mut dx_ref = vec![-7.0; x.len()];
            backward_generic(PoolKind::Max, &x, &dy, &mut dx_ref, &g);
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let mut y_fast = vec![f32::NAN; dy.len()];
                forward_on(isa, PoolKind::Max, &x, &mut y_fast, &g);
                assert_eq!(bits(&y_fast), bits(&y_ref), "{isa} forward {n}x{c}x{h}x{w}");
                let mut dx_fast = vec![f32::NAN; x.len()];
                backward_on(isa, PoolKind::Max, &x, &dy, &mut dx_fast, &g);
                assert_eq!(bits(&dx_fast), bits(&dx_ref), "{isa} backward {n}x{c}x{h}x{w}");
            }
        }
    }

    /// The pool's backward fused with a ReLU's and the bias gradient against the three passes:
    /// the 2×2 fast path and the generic loops (3×3 windows, stride 2, padding 1; average
    /// pooling), inputs a ReLU could give (zeros and positives, ties among them), bit for bit,
    /// outputs poisoned first.
    #[test]
    fn fused_pool_relu_and_bias_grad_match_the_three_passes() {
        let mut rng = Rng::new(9);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for &(n, c, h, w, k, stride, pad, kind) in &[
            (3, 6, 28, 28, 2, 2, 0, PoolKind::Max),
            (2, 5, 7, 9, 2, 2, 0, PoolKind::Max),
            (17, 16, 14, 14, 2, 2, 0, PoolKind::Max),
            (2, 4, 9, 8, 3, 2, 1, PoolKind::Max),
            (3, 3, 8, 8, 2, 2, 0, PoolKind::Avg),
        ] {
            let g = PoolGeom::new(n, c, h, w, k, stride, pad).unwrap();
            let cg = crate::backend::ConvGeom::new(n, 1, h, w, c, (1, 1), 1, 0).unwrap();
            let y: Vec<f32> = (0..n * c * h * w).map(|_| (rng.below(4) as f32 - 1.0).max(0.0) * 0.5).collect();
            let mut dp: Vec<f32> = (0..n * c * g.oh * g.ow).map(|_| rng.normal()).collect();
            dp[1] = -0.0;
            let mut dy = vec![f32::NAN; y.len()];
            backward(kind, &y, &dp, &mut dy, &g);
            let (mut dz_want, mut db_want) = (vec![f32::NAN; y.len()], vec![f32::NAN; c]);
            super::super::conv::relu_and_bias_grad(&y, &dy, &mut dz_want, &mut db_want, &cg);
            let (mut dz, mut db) = (vec![f32::NAN; y.len()], vec![f32::NAN; c]);
            backward_relu_bias(kind, &y, &dp, &mut dz, &mut db, &g);
            assert_eq!(bits(&dz), bits(&dz_want), "dz {n}x{c}x{h}x{w} k{k} {kind:?}");
            assert_eq!(bits(&db), bits(&db_want), "db {n}x{c}x{h}x{w} k{k} {kind:?}");
            assert!(db.iter().all(|v| v.abs() > 0.0), "{db:?}");
            assert!(dz.contains(&0.0) && dz.iter().any(|v| *v != 0.0));
        }
    }
}
