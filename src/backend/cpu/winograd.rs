//! Winograd convolutions for 3×3, stride 1, padding 1 (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016): F(2×2, 3×3) and F(4×4, 3×3).
//!
//! A convolution of an m×m output tile with a 3×3 filter is computed in the transformed domain
//! with α² = (m+2)² products instead of 9·m²: 2.25× fewer multiplications for m = 2, 4× for m = 4.
//! Over channels the products become α² independent GEMMs, which run on the same GEMM as the
//! im2col route:
//!
//! - forward: `U = G·w·Gᵀ` per filter, `V = Bᵀ·d·B` per input tile, `M[e] = U[e]·V[e]` for each
//!   of the α² points `e`, `y = Aᵀ·M·A` per output tile;
//! - backward-data: the forward pass of the flipped, channel-transposed filter over `dy` (for
//!   3×3 stride 1 pad 1 that is exactly the adjoint);
//! - weight gradient: differentiating the forward formula in `w` gives
//!   `dw = Gᵀ·(Σ_tiles (A·dy·Aᵀ) ⊙ (Bᵀ·d·B))·G`, the sum over tiles being α² GEMMs that reduce
//!   over the tiles of every image.
//!
//! The transforms run on 16 images at once (one f32 lane per image), so every tile transform is a
//! handful of vector adds; a group of 16 images is also the unit of parallel work, and a batch
//! that does not fill the last group leaves its lanes at zero. The transforms use plain multiply
//! and add, never fused, so their bits do not depend on the vector width.
//!
//! Winograd is not bit-identical to the direct convolution: its rounding differs, more so for
//! m = 4 (the transforms scale values by up to 8 and 1/24). The im2col route in `conv.rs` is its
//! oracle; tests hold forward, backward-data and weight gradient to 1e-3 of the output's scale
//! (measured errors are in the tests' comments). Results are still deterministic: each group's
//! work is fixed, and the weight gradient adds the groups' partial sums in group order.

use super::gemm::{sgemm_on, Mat};
use super::isa::Isa;
use crate::backend::{Activation, ConvGeom};
use rayon::prelude::*;
use std::cell::RefCell;

/// Images per group: the transforms' vector lanes.
pub const LANES: usize = 16;
type Lane = [f32; LANES];

/// The output tile size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// F(2×2, 3×3): α = 4.
    F2,
    /// F(4×4, 3×3): α = 6.
    F4,
}

impl Tile {
    pub fn name(self) -> &'static str {
        match self {
            Tile::F2 => "winograd-f2",
            Tile::F4 => "winograd-f4",
        }
    }
}

/// Whether Winograd computes this convolution: 3×3 filters, stride 1, padding 1 (the shape of
/// SimpleConv, VGG and ResNet's inner layers).
pub fn applies(g: &ConvGeom) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1
}

/// The three transforms of F(m×m, 3×3), α = m + 2.
struct Transform<const M: usize, const A: usize> {
    /// Output: y = Aᵀ·M·A.
    at: [[f32; A]; M],
    /// Output gradient, for the weight gradient: A·dy·Aᵀ.
    a: [[f32; M]; A],
    /// Filter: U = G·w·Gᵀ.
    g: [[f32; 3]; A],
    /// Filter gradient: dw = Gᵀ·dU·G.
    gt: [[f32; A]; 3],
    /// Input: V = Bᵀ·d·B.
    bt: [[f32; A]; A],
}

const fn transpose<const R: usize, const C: usize>(m: [[f32; C]; R]) -> [[f32; R]; C] {
    let mut t = [[0.0; R]; C];
    let mut r = 0;
    while r < R {
        let mut c = 0;
        while c < C {
            t[c][r] = m[r][c];
            c += 1;
        }
        r += 1;
    }
    t
}

const F2_AT: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];
const F2_G: [[f32; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
const F2: Transform<2, 4> = Transform {
    at: F2_AT,
    a: transpose(F2_AT),
    g: F2_G,
    gt: transpose(F2_G),
    bt: [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]],
};

// Interpolation points 0, ±1, ±2 and ∞.
const F4_AT: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];
const F4_G: [[f32; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
const F4: Transform<4, 6> = Transform {
    at: F4_AT,
    a: transpose(F4_AT),
    g: F4_G,
    gt: transpose(F4_G),
    bt: [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ],
};

/// `l · x · rᵀ` on W lanes at once, skipping zero coefficients (half of Bᵀ and Aᵀ).
#[inline(always)]
fn sandwich<const R: usize, const K: usize, const W: usize>(
    l: &[[f32; K]; R],
    x: &[[[f32; W]; K]; K],
    r: &[[f32; K]; R],
) -> [[[f32; W]; R]; R] {
    let mut t = [[[0.0f32; W]; K]; R];
    for (ti, li) in t.iter_mut().zip(l) {
        for (&c, xk) in li.iter().zip(x) {
            if c != 0.0 {
                for (tv, xv) in ti.iter_mut().zip(xk) {
                    tv.iter_mut().zip(xv).for_each(|(a, b)| *a += c * b);
                }
            }
        }
    }
    let mut out = [[[0.0f32; W]; R]; R];
    for (oi, ti) in out.iter_mut().zip(&t) {
        for (ov, rj) in oi.iter_mut().zip(r) {
            for (&c, tv) in rj.iter().zip(ti) {
                if c != 0.0 {
                    ov.iter_mut().zip(tv).for_each(|(a, b)| *a += c * b);
                }
            }
        }
    }
    out
}

/// Run `f` compiled for the widest vector set here: the lanes then fill whole registers. The
/// arithmetic is unfused either way, so the bits are the same.
#[inline(always)]
fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: each is called only where the CPU has the features it enables.
        match Isa::best() {
            Isa::Avx512 => return unsafe { avx512(f) },
            Isa::Avx2 => return unsafe { avx2(f) },
            Isa::Portable => {}
        }
    }
    f()
}

thread_local! {
    /// Per-thread scratch for one block of tiles: its input rows in lanes, V, the products.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// Tiles `tx0..tx0 + txn` of tile row `ty`: the unit the transforms and GEMMs work on, small
/// enough that its transformed input and products (α²·(c_in + c_out)·16 values a tile) stay in
/// the core's L2 cache between the transform, the GEMM and the inverse transform.
#[derive(Clone, Copy)]
struct Block {
    ty: usize,
    tx0: usize,
    txn: usize,
}

/// The blocks covering the output, row by row. `BLOCK_BYTES` bounds one block's working set.
fn blocks(m: usize, a: usize, c_in: usize, c_out: usize, g: &ConvGeom) -> Vec<Block> {
    const BLOCK_BYTES: usize = 384 * 1024;
    let (ty_n, tx_n) = (g.oh.div_ceil(m), g.ow.div_ceil(m));
    let per_tile = a * a * (c_in + c_out) * LANES * 4;
    let width = (BLOCK_BYTES / per_tile).clamp(1, tx_n);
    let mut out = Vec::new();
    for ty in 0..ty_n {
        for tx0 in (0..tx_n).step_by(width) {
            out.push(Block { ty, tx0, txn: width.min(tx_n - tx0) });
        }
    }
    out
}

/// A window of planes `src[i][c]` (i < count; other lanes zero) into lanes: `dst[c][r][x]` is
/// pixel (y0 + r, x0 + x) of every image, zero outside the plane.
#[allow(clippy::too_many_arguments)]
fn gather(
    src: &[f32],
    count: usize,
    chans: usize,
    (h, w): (usize, usize),
    (y0, x0): (isize, isize),
    (rows, cols): (usize, usize),
    dst: &mut [Lane],
) {
    dst.fill([0.0; LANES]);
    // Columns of the window inside the plane.
    let xa = (-x0).max(0) as usize;
    let xb = ((w as isize - x0).max(0) as usize).min(cols);
    for c in 0..chans {
        for r in 0..rows {
            let y = y0 + r as isize;
            if y < 0 || y >= h as isize || xa >= xb {
                continue;
            }
            // One window row (a couple of KiB) takes the 16 images in turn while in L1.
            let out = &mut dst[(c * rows + r) * cols + xa..(c * rows + r) * cols + xb];
            for i in 0..count {
                let at = ((i * chans + c) * h + y as usize) * w;
                let row = &src[at + (x0 + xa as isize) as usize..at + (x0 + xb as isize) as usize];
                for (o, v) in out.iter_mut().zip(row) {
                    o[i] = *v;
                }
            }
        }
    }
}

/// V[e][c][t·16 + lane] = (Bᵀ·d·B)[e] for every tile t of a block and channel c, from the block's
/// input rows in lanes (`rows[c][α][cols]`).
#[inline(always)]
fn input_transform<const M: usize, const A: usize>(
    t: &Transform<M, A>,
    rows: &[Lane],
    chans: usize,
    txn: usize,
    v: &mut [f32],
) {
    let (cols, lane_cols) = (txn * M + 2, txn * LANES);
    for c in 0..chans {
        let plane = &rows[c * A * cols..(c + 1) * A * cols];
        for tx in 0..txn {
            let d: [[Lane; A]; A] = std::array::from_fn(|r| std::array::from_fn(|s| plane[r * cols + tx * M + s]));
            let vt = sandwich(&t.bt, &d, &t.bt);
            for (e, lane) in vt.iter().flatten().enumerate() {
                let at = (e * chans + c) * lane_cols + tx * LANES;
                v[at..at + LANES].copy_from_slice(lane);
            }
        }
    }
}

/// The filter transform of `w[k][c][3][3]`: `u[e][k][c]`.
fn transform_filters<const M: usize, const A: usize>(t: &Transform<M, A>, w: &[f32], k: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; A * A * k * c];
    for (kc, f) in w.chunks_exact(9).enumerate() {
        let x: [[[f32; 1]; 3]; 3] = std::array::from_fn(|i| std::array::from_fn(|j| [f[i * 3 + j]]));
        let v = sandwich(&t.g, &x, &t.g);
        for (e, val) in v.iter().flatten().enumerate() {
            u[e * k * c + kc] = val[0];
        }
    }
    u
}

/// y = act(conv(x, w) + b) on 3×3 / stride 1 / pad 1, with `gemm` for the products.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    tile: Tile,
    gemm: Option<Isa>,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    g: &ConvGeom,
) {
    assert!(applies(g), "winograd: {g:?} is not 3×3 / stride 1 / pad 1");
    match tile {
        Tile::F2 => forward_t(&F2, gemm, x, w, b, act, y, g),
        Tile::F4 => forward_t(&F4, gemm, x, w, b, act, y, g),
    }
}

/// dx = the adjoint of the convolution applied to dy: the forward pass of the filter flipped
/// in both axes with input and output channels swapped.
pub fn backward_data(tile: Tile, gemm: Option<Isa>, dy: &[f32], w: &[f32], dx: &mut [f32], g: &ConvGeom) {
    assert!(applies(g), "winograd: {g:?} is not 3×3 / stride 1 / pad 1");
    let mut flipped = vec![0.0f32; w.len()];
    for co in 0..g.c_out {
        for ci in 0..g.c_in {
            for t in 0..9 {
                flipped[(ci * g.c_out + co) * 9 + 8 - t] = w[(co * g.c_in + ci) * 9 + t];
            }
        }
    }
    let gt = ConvGeom { c_in: g.c_out, c_out: g.c_in, h: g.oh, w: g.ow, oh: g.h, ow: g.w, ..*g };
    forward(tile, gemm, dy, &flipped, None, Activation::Identity, dx, &gt)
}

#[allow(clippy::too_many_arguments)]
fn forward_t<const M: usize, const A: usize>(
    t: &Transform<M, A>,
    gemm: Option<Isa>,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    g: &ConvGeom,
) {
    let (ci, co) = (g.c_in, g.c_out);
    let u = transform_filters(t, w, co, ci);
    let (in_img, out_img) = (ci * g.h * g.w, co * g.oh * g.ow);
    let blocks = blocks(M, A, ci, co, g);
    let widest = blocks.iter().map(|b| b.txn).max().unwrap_or(0);
    // Scratch: input rows in lanes, V[e][ci][16·txn], products[e][co][16·txn], one output
    // channel's tile row in lanes.
    let rows_len = ci * A * (widest * M + 2) * LANES;
    let (v_len, m_len, o_len) = (A * A * ci * widest * LANES, A * A * co * widest * LANES, M * widest * M * LANES);
    y.par_chunks_mut(out_img * LANES).enumerate().for_each(|(grp, ys)| {
        let count = ys.len() / out_img;
        let xs = &x[grp * LANES * in_img..(grp * LANES + count) * in_img];
        with_scratch(rows_len + v_len + m_len + o_len, |buf| {
            let (rows, rest) = buf.split_at_mut(rows_len);
            let (v, rest) = rest.split_at_mut(v_len);
            let (prod, orow) = rest.split_at_mut(m_len);
            let rows: &mut [Lane] = bytemuck::cast_slice_mut(rows);
            let orow: &mut [Lane] = bytemuck::cast_slice_mut(orow);
            for &Block { ty, tx0, txn } in &blocks {
                let (cols, lane_cols) = (txn * M + 2, txn * LANES);
                let origin = ((ty * M) as isize - 1, (tx0 * M) as isize - 1);
                gather(xs, count, ci, (g.h, g.w), origin, (A, cols), &mut rows[..ci * A * cols]);
                vectorized(#[inline(always)] || input_transform(t, rows, ci, txn, v));
                for e in 0..A * A {
                    sgemm_on(
                        gemm,
                        co,
                        lane_cols,
                        ci,
                        &u[e * co * ci..(e + 1) * co * ci],
                        Mat::rows(ci),
                        &v[e * ci * lane_cols..(e + 1) * ci * lane_cols],
                        Mat::rows(lane_cols),
                        &mut prod[e * co * lane_cols..(e + 1) * co * lane_cols],
                        Mat::rows(lane_cols),
                        false,
                    );
                }
                // The block's output rows and columns inside the map.
                let (oy0, ox0) = (ty * M, tx0 * M);
                let (rn, xn) = (M.min(g.oh - oy0), (txn * M).min(g.ow - ox0));
                for k in 0..co {
                    vectorized(#[inline(always)] || {
                        for tx in 0..txn {
                            let mt: [[Lane; A]; A] = std::array::from_fn(|r| {
                                std::array::from_fn(|s| {
                                    let at = ((r * A + s) * co + k) * lane_cols + tx * LANES;
                                    prod[at..at + LANES].try_into().unwrap()
                                })
                            });
                            let out = sandwich(&t.at, &mt, &t.at);
                            for (r, o) in out.iter().enumerate() {
                                orow[r * txn * M + tx * M..r * txn * M + (tx + 1) * M].copy_from_slice(o);
                            }
                        }
                    });
                    // Each image's rows are written whole, reading its lane.
                    let bias = b.map(|b| b[k]);
                    for i in 0..count {
                        for r in 0..rn {
                            let at = i * out_img + (k * g.oh + oy0 + r) * g.ow + ox0;
                            for (o, l) in ys[at..at + xn].iter_mut().zip(&orow[r * txn * M..]) {
                                *o = act.apply(bias.map_or(l[i], |b| l[i] + b));
                            }
                        }
                    }
                }
            }
        })
    });
}

/// dw = ∂(Σ dy·conv(x, w))/∂w on 3×3 / stride 1 / pad 1 (the bias gradient is not computed here).
pub fn backward_weight(tile: Tile, gemm: Option<Isa>, x: &[f32], dy: &[f32], dw: &mut [f32], g: &ConvGeom) {
    assert!(applies(g), "winograd: {g:?} is not 3×3 / stride 1 / pad 1");
    match tile {
        Tile::F2 => backward_weight_t(&F2, gemm, x, dy, dw, g),
        Tile::F4 => backward_weight_t(&F4, gemm, x, dy, dw, g),
    }
}

fn backward_weight_t<const M: usize, const A: usize>(
    t: &Transform<M, A>,
    gemm: Option<Isa>,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    g: &ConvGeom,
) {
    let (ci, co) = (g.c_in, g.c_out);
    let (in_img, out_img) = (ci * g.h * g.w, co * g.oh * g.ow);
    let blocks = blocks(M, A, ci, co, g);
    let widest = blocks.iter().map(|b| b.txn).max().unwrap_or(0);
    let (rows_len, drows_len) = (ci * A * (widest * M + 2) * LANES, co * M * widest * M * LANES);
    let (v_len, z_len) = (A * A * ci * widest * LANES, A * A * co * widest * LANES);
    // Σ over this group's tiles of Z[e]·V[e]ᵀ, [e][co][ci], one partial per group of images.
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(LANES))
        .into_par_iter()
        .map(|grp| {
            let count = LANES.min(g.n - grp * LANES);
            let xs = &x[grp * LANES * in_img..(grp * LANES + count) * in_img];
            let dys = &dy[grp * LANES * out_img..(grp * LANES + count) * out_img];
            let mut acc = vec![0.0f32; A * A * co * ci];
            with_scratch(rows_len + drows_len + v_len + z_len, |buf| {
                let (rows, rest) = buf.split_at_mut(rows_len);
                let (drows, rest) = rest.split_at_mut(drows_len);
                let (v, z) = rest.split_at_mut(v_len);
                let rows: &mut [Lane] = bytemuck::cast_slice_mut(rows);
                let drows: &mut [Lane] = bytemuck::cast_slice_mut(drows);
                for &Block { ty, tx0, txn } in &blocks {
                    let (cols, lane_cols) = (txn * M + 2, txn * LANES);
                    let origin = ((ty * M) as isize - 1, (tx0 * M) as isize - 1);
                    gather(xs, count, ci, (g.h, g.w), origin, (A, cols), &mut rows[..ci * A * cols]);
                    let origin = ((ty * M) as isize, (tx0 * M) as isize);
                    gather(dys, count, co, (g.oh, g.ow), origin, (M, txn * M), &mut drows[..co * M * txn * M]);
                    vectorized(#[inline(always)] || {
                        input_transform(t, rows, ci, txn, v);
                        // Z[e][k][t·16 + lane] = (A·dy·Aᵀ)[e] per output-gradient tile.
                        for k in 0..co {
                            let plane = &drows[k * M * txn * M..(k + 1) * M * txn * M];
                            for tx in 0..txn {
                                let d: [[Lane; M]; M] =
                                    std::array::from_fn(|r| std::array::from_fn(|s| plane[r * txn * M + tx * M + s]));
                                let zt = sandwich(&t.a, &d, &t.a);
                                for (e, lane) in zt.iter().flatten().enumerate() {
                                    let at = (e * co + k) * lane_cols + tx * LANES;
                                    z[at..at + LANES].copy_from_slice(lane);
                                }
                            }
                        }
                    });
                    for e in 0..A * A {
                        sgemm_on(
                            gemm,
                            co,
                            ci,
                            lane_cols,
                            &z[e * co * lane_cols..(e + 1) * co * lane_cols],
                            Mat::rows(lane_cols),
                            &v[e * ci * lane_cols..(e + 1) * ci * lane_cols],
                            Mat::transposed(lane_cols),
                            &mut acc[e * co * ci..(e + 1) * co * ci],
                            Mat::rows(ci),
                            true,
                        );
                    }
                }
            });
            acc
        })
        .collect();
    let mut sum = vec![0.0f32; A * A * co * ci];
    for part in &partials {
        sum.iter_mut().zip(part).for_each(|(s, v)| *s += v);
    }
    for (kc, out) in dw.chunks_exact_mut(9).enumerate() {
        let m: [[[f32; 1]; A]; A] = std::array::from_fn(|r| std::array::from_fn(|s| [sum[(r * A + s) * co * ci + kc]]));
        let d = sandwich(&t.gt, &m, &t.gt);
        for (o, v) in out.iter_mut().zip(d.iter().flatten()) {
            *o = v[0];
        }
    }
}
