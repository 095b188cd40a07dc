//! Winograd convolutions for 3×3 and 5×5 filters, stride 1, "same" padding (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016): F(2×2, r×r) and F(4×4, r×r).
//!
//! A convolution of an m×m output tile with an r×r filter is computed in the transformed domain
//! with α² = (m+r−1)² products instead of r²·m²: for 3×3, 2.25× fewer multiplications with m = 2
//! and 4× with m = 4; for 5×5, 2.8× and 6.25×.
//! Over channels the products become α² independent GEMMs, which run on the same GEMM as the
//! im2col route:
//!
//! - forward: `U = G·w·Gᵀ` per filter, `V = Bᵀ·d·B` per input tile, `M[e] = U[e]·V[e]` for each
//!   of the α² points `e`, `y = Aᵀ·M·A` per output tile;
//! - backward-data: the forward pass of the flipped, channel-transposed filter over `dy` (with
//!   stride 1 and "same" padding that is exactly the adjoint), or, where dy has more channels
//!   than dx, the forward formula transposed: `dV = Uᵀ·(A·dy·Aᵀ)`, `dx += B·dV·Bᵀ`;
//! - weight gradient: differentiating the forward formula in `w` gives
//!   `dw = Gᵀ·(Σ_tiles (A·dy·Aᵀ) ⊙ (Bᵀ·d·B))·G`, the sum over tiles being α² GEMMs that reduce
//!   over the tiles of every image. With the transposed backward-data it shares `A·dy·Aᵀ`:
//!   [`backward_data_and_weight`] computes both from one pass over dy.
//!
//! The transforms run on 16 images at once (one f32 lane per image), so every tile transform is a
//! handful of vector adds; a group of 16 images is also the unit of parallel work, and a batch
//! that does not fill the last group leaves its lanes at zero. The forward's transforms use
//! `f32::mul_add`, which is fused on every path (the portable one too), the weight gradient's
//! plain multiply and add (see `FORWARD_FUSED`): either way their bits do not depend on the
//! vector width.
//!
//! Winograd is not bit-identical to the direct convolution: its rounding differs, more so for
//! m = 4 (the transforms scale values by up to 8 and 1/90). The im2col route in `conv.rs` is its
//! oracle; tests hold forward, backward-data and weight gradient to 1e-3 of the output's scale
//! (the worst measured is about 1e-5, printed by the test). Results are still deterministic:
//! each group's work is fixed, and the weight gradient adds the groups' partial sums in group
//! order.

mod lanes;
mod transform;

use super::buffers::{recycle, reused, with_scratch, LINE};
use super::gemm::{sgemm_packed_rhs, sgemm_prepacked, Mat, PackedLhs, RhsLayout, RhsOperand, KC};
use super::isa::{l2_bytes, vectorized, Isa};
use crate::backend::{Activation, ConvGeom};
use lanes::{from_lanes, to_lanes, transposer, Transpose};
use rayon::prelude::*;
use std::cell::RefCell;
use transform::{sandwich, sandwich_with, Coefs, Folded, F23, F25T, F43, F45T};

/// The forward pass's transforms (input and output) use fused multiply-adds, the weight
/// gradient's plain multiplies and adds: each the faster, measured on one core (fused, LeNet
/// conv3's forward ran 10–12% faster and its weight gradient 18% slower: longer dependent
/// chains in transforms that already keep every register busy).
const FORWARD_FUSED: bool = true;

/// Images per group: the transforms' vector lanes.
pub const LANES: usize = 16;
type Lane = [f32; LANES];

/// The output tile size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// F(2×2, 3×3) (α = 4) and F(2×2, 5×5) (α = 6).
    F2,
    /// F(4×4, 3×3) (α = 6) and F(4×4, 5×5) (α = 8).
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

/// Whether Winograd computes this convolution: 3×3 or 5×5 filters, stride 1, "same" padding
/// (SimpleConv, VGG and ResNet's 3×3 layers; LeNet's 5×5 ones).
pub fn applies(g: &ConvGeom) -> bool {
    g.kh == g.kw && (g.kh == 3 || g.kh == 5) && g.stride == 1 && g.pad == g.kh / 2
}

thread_local! {
    /// Per-thread scratch for one group of images: its planes in lanes, and one block's
    /// transformed operands and products.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The tile grid of a layer: `ty × tx` tiles of m×m outputs.
#[derive(Clone, Copy)]
struct Grid {
    ty: usize,
    tx: usize,
}

impl Grid {
    fn new(m: usize, g: &ConvGeom) -> Grid {
        Grid { ty: g.oh.div_ceil(m), tx: g.ow.div_ceil(m) }
    }
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

/// The forward pass (and backward-data, which is one) bounds a block by 5/8 of the core's L2
/// cache. Half was measured best on a 1 MiB and a 2 MiB L2 for SimpleConv's 64-channel layers
/// (5–8% faster than 512 KiB on the 2 MiB one), and 5/8 runs them as fast while it fits two of
/// LeNet conv3's 557 KB tiles into a block on a 2 MiB L2 (its forward 5–8% faster: the GEMMs
/// get 32 columns instead of 16). Its outputs do not depend on the blocks.
fn forward_block_bytes() -> usize {
    (l2_bytes() * 5 / 8).clamp(256 << 10, 2 << 20)
}

/// The weight gradient sums its products block by block, so its blocks are fixed, whatever the
/// machine, and its bits with them.
const WGRAD_BLOCK_BYTES: usize = 512 << 10;

/// The blocks covering the grid, row by row, each with a working set of at most `bytes`. A
/// block's lanes also fit one KC block of the GEMM, so that the weight gradient's reduction over
/// them is a single block (its packed operands are then addressed by row and column alone).
fn blocks(a: usize, c_in: usize, c_out: usize, grid: Grid, bytes: usize) -> Vec<Block> {
    let per_tile = a * a * (c_in + c_out) * LANES * 4;
    let width = (bytes / per_tile).clamp(1, grid.tx).min(KC / LANES);
    let mut out = Vec::new();
    for ty in 0..grid.ty {
        for tx0 in (0..grid.tx).step_by(width) {
            out.push(Block { ty, tx0, txn: width.min(grid.tx - tx0) });
        }
    }
    out
}

/// What every pass lays out the same way: the tile grid, the blocks over it (at most
/// `block_bytes` each), and two kinds of lane planes: the input side's, `padded` (rows × columns,
/// with the zero border, wider where tiles overhang the map), and the output side's, `tiled`
/// (the whole tile grid).
struct Layout {
    blocks: Vec<Block>,
    /// The most tiles in one block.
    widest: usize,
    padded: (usize, usize),
    tiled: (usize, usize),
}

impl Layout {
    fn new<const M: usize, const A: usize, const R: usize>(g: &ConvGeom, block_bytes: usize) -> Layout {
        let grid = Grid::new(M, g);
        let blocks = blocks(A, g.c_in, g.c_out, grid, block_bytes);
        let widest = blocks.iter().map(|b| b.txn).max().unwrap_or(0);
        Layout { blocks, widest, padded: (grid.ty * M + R - 1, grid.tx * M + R - 1), tiled: (grid.ty * M, grid.tx * M) }
    }

    /// One group's scratch for a pass through the transformed domain with c_in padded planes
    /// and c_out tiled planes (the forward pass and the transposed backward-data both have
    /// them), a block's transformed operands of `k` channels and its products of `rows`.
    fn with_scratch<Out>(
        &self,
        isa: Isa,
        a: usize,
        g: &ConvGeom,
        (k, rows): (usize, usize),
        f: impl FnOnce(&mut [Lane], &mut [Lane], &mut [f32], &mut [f32]) -> Out,
    ) -> Out {
        let ((hp, wp), (oh, ow)) = (self.padded, self.tiled);
        let (padded_len, tiled_len) = (g.c_in * hp * wp * LANES, g.c_out * oh * ow * LANES);
        let v_len = a * a * skew(RhsLayout::new(isa, k, self.widest * LANES).len());
        let m_len = a * a * skew(rows * self.widest * LANES);
        with_scratch(&SCRATCH, padded_len + tiled_len + v_len + m_len, |buf| {
            let (padded, rest) = buf.split_at_mut(padded_len);
            let (tiled, rest) = rest.split_at_mut(tiled_len);
            let (v, prod) = rest.split_at_mut(v_len);
            f(bytemuck::cast_slice_mut(padded), bytemuck::cast_slice_mut(tiled), v, prod)
        })
    }
}

/// The distance between two points' operands of `len` values: `len` rounded up to a whole
/// 64-byte line, plus one line whenever that is a multiple of 1 KiB. The transforms write (and
/// the inverse transform reads) one lane of every point in turn; at a power-of-two distance
/// (4 KiB for 64 channels of one tile) all α² of those lines fall into one set of the L1
/// cache, whose 8 to 12 ways cannot hold them.
fn skew(len: usize) -> usize {
    let lines = len.div_ceil(LINE);
    LINE * if lines.is_multiple_of(16) { lines + 1 } else { lines }
}

/// (l·d·lᵀ)[e] for every tile of a block and every channel c, reading the tiles' K×K windows
/// (at m-pixel steps) from lane planes (`pw`-wide rows, `ph` rows a channel), to
/// `v[e·v_at + place(c, t)..+16]`: Bᵀ·x·B of the input (K = α), A·dy·Aᵀ of a gradient (K = m).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transform_tiles<const A: usize, const K: usize>(
    l: &Folded<A, K>,
    fused: bool,
    planes: &[Lane],
    chans: usize,
    (ph, pw): (usize, usize),
    (m, blk): (usize, Block),
    v: &mut [f32],
    v_at: usize,
    place: impl Fn(usize, usize) -> usize,
) {
    for c in 0..chans {
        for t in 0..blk.txn {
            let corner = c * ph * pw + blk.ty * m * pw + (blk.tx0 + t) * m;
            let load = |r: usize, s: usize| planes[corner + r * pw + s];
            // Once per tile and channel: the layout's offset divides.
            let base = place(c, t);
            sandwich_with(l, l, fused, load, |i, j, lane| {
                let at = (i * A + j) * v_at + base;
                v[at..at + LANES].copy_from_slice(lane);
            });
        }
    }
}

/// `l·P·lᵀ` of the point products P of every channel and tile of a block (`prod[e·m_at + c·ld +
/// t·16..+16]` for point e), into the tile's window at m-pixel steps of lane planes (`pw`-wide
/// rows, `ph` rows a channel): `out(index, lane)` for each R×R result. Aᵀ·M·A of the forward
/// (R = m), B·dV·Bᵀ of the transposed backward-data (R = α).
#[inline(always)]
fn untransform_tiles<const R: usize, const K: usize>(
    l: &Folded<R, K>,
    chans: usize,
    (prod, m_at, ld): (&[f32], usize, usize),
    (ph, pw): (usize, usize),
    (m, blk): (usize, Block),
    mut out: impl FnMut(usize, &Lane),
) {
    for c in 0..chans {
        for t in 0..blk.txn {
            let load = |r: usize, s: usize| {
                let at = (r * K + s) * m_at + c * ld + t * LANES;
                prod[at..at + LANES].try_into().unwrap()
            };
            let corner = c * ph * pw + blk.ty * m * pw + (blk.tx0 + t) * m;
            sandwich_with(l, l, FORWARD_FUSED, load, |i, j, lane| out(corner + i * pw + j, lane));
        }
    }
}

/// The filter transform of `w[k][c][r][r]`: `u[e][k][c]`.
fn transform_filters<const M: usize, const A: usize, const R: usize, T: Coefs<M, A, R>>(
    isa: Isa,
    w: &[f32],
    k: usize,
    c: usize,
) -> Vec<f32> {
    // Sixteen filters at a time, one per lane, on both cores (filter by filter it was 2% of a
    // LeNet step), then regrouped by point: the same arithmetic in every lane, so the same bits.
    let n = k * c;
    let per_group: Vec<[[Lane; A]; A]> = (0..n.div_ceil(LANES))
        .into_par_iter()
        .map(|grp| {
            let f0 = grp * LANES;
            let mut out = [[[0.0f32; LANES]; A]; A];
            let load = |i: usize, j: usize| -> Lane {
                std::array::from_fn(|l| if f0 + l < n { w[(f0 + l) * R * R + i * R + j] } else { 0.0 })
            };
            vectorized(
                isa,
                #[inline(always)]
                || sandwich_with(&T::T.g, &T::T.g, false, load, |i, j, v| out[i][j] = *v),
            );
            out
        })
        .collect();
    // Recycled and not zeroed (every value is written below): zero-filling it was a serial
    // memset between two parallel passes.
    let mut u = reused(A * A * n);
    u.par_chunks_mut(n).enumerate().for_each(|(e, ue)| {
        for (f, v) in ue.iter_mut().enumerate() {
            *v = per_group[f / LANES][e / A][e % A][f % LANES];
        }
    });
    u
}

/// The transformed filters `U[e]` (c_out × c_in), or their transposes, each packed once as the
/// left-hand operand of its point's GEMM.
fn packed_filters<const M: usize, const A: usize, const R: usize, T: Coefs<M, A, R>>(
    isa: Isa,
    w: &[f32],
    co: usize,
    ci: usize,
    transposed: bool,
) -> Vec<PackedLhs> {
    let u = transform_filters::<M, A, R, T>(isa, w, co, ci);
    let packed = u
        .par_chunks(co * ci)
        .map(|ue| match transposed {
            false => PackedLhs::new(isa, co, ci, ue, Mat::rows(ci)),
            true => PackedLhs::new(isa, ci, co, ue, Mat::transposed(ci)),
        })
        .collect();
    recycle(u);
    packed
}

/// The block's α² GEMMs: `prod[e] (rows × lane_cols) = packed[e] · v(e)`, each product `m_at`
/// values after the previous point's.
fn point_products<'v>(
    isa: Isa,
    packed: &[PackedLhs],
    v: impl Fn(usize) -> RhsOperand<'v>,
    (prod, m_at, rows): (&mut [f32], usize, usize),
    lane_cols: usize,
) {
    for (e, ue) in packed.iter().enumerate() {
        let out = &mut prod[e * m_at..e * m_at + rows * lane_cols];
        sgemm_prepacked(isa, rows, lane_cols, &ue.data, ue.layout, v(e), out, Mat::rows(lane_cols), false);
    }
}

/// y = act(conv(x, w) + b), the products on rotvar's `isa` GEMM.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    tile: Tile,
    isa: Isa,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    g: &ConvGeom,
) {
    assert!(applies(g), "winograd: {g:?} is not 3×3 or 5×5 / stride 1 / same padding");
    match (tile, g.kh) {
        (Tile::F2, 3) => forward_t::<2, 4, 3, F23>(isa, x, w, b, act, y, g),
        (Tile::F4, 3) => forward_t::<4, 6, 3, F43>(isa, x, w, b, act, y, g),
        (Tile::F2, _) => forward_t::<2, 6, 5, F25T>(isa, x, w, b, act, y, g),
        (Tile::F4, _) => forward_t::<4, 8, 5, F45T>(isa, x, w, b, act, y, g),
    }
}

/// dx = the adjoint of the convolution applied to dy. Where dy has more channels than dx
/// (LeNet's conv3: 120 against 16), through the transposed transforms ([`backward_t`]), whose
/// costly 2-D transform runs on dx's channels; elsewhere as the forward pass of the filter
/// flipped in both axes with input and output channels swapped, whose costly transform runs on
/// dy's.
pub fn backward_data(tile: Tile, isa: Isa, dy: &[f32], w: &[f32], dx: &mut [f32], g: &ConvGeom) {
    assert!(applies(g), "winograd: {g:?} is not 3×3 or 5×5 / stride 1 / same padding");
    if g.c_in < g.c_out {
        return backward(tile, isa, &[], dy, w, Some(dx), None, g);
    }
    let taps = g.kh * g.kw;
    let mut flipped = vec![0.0f32; w.len()];
    for co in 0..g.c_out {
        for ci in 0..g.c_in {
            for t in 0..taps {
                flipped[(ci * g.c_out + co) * taps + taps - 1 - t] = w[(co * g.c_in + ci) * taps + t];
            }
        }
    }
    let gt = ConvGeom { c_in: g.c_out, c_out: g.c_in, h: g.oh, w: g.ow, oh: g.h, ow: g.w, ..*g };
    forward(tile, isa, dy, &flipped, None, Activation::Identity, dx, &gt)
}

fn forward_t<const M: usize, const A: usize, const R: usize, T: Coefs<M, A, R>>(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    g: &ConvGeom,
) {
    let (ci, co) = (g.c_in, g.c_out);
    // The input transform writes V in the GEMM's packed layout, so no operand is copied per
    // block.
    let packed = packed_filters::<M, A, R, T>(isa, w, co, ci, false);
    let (in_img, out_img) = (ci * g.h * g.w, co * g.oh * g.ow);
    let tr = transposer(isa);
    // The input in padded lane planes, the output in tiled ones.
    let lay = Layout::new::<M, A, R>(g, forward_block_bytes());
    let ((hp, wp), (oh, ow)) = (lay.padded, lay.tiled);
    y.par_chunks_mut(out_img * LANES).enumerate().for_each(|(grp, ys)| {
        let count = ys.len() / out_img;
        let xs = &x[grp * LANES * in_img..(grp * LANES + count) * in_img];
        lay.with_scratch(isa, A, g, (ci, co), |xl, yl, v, prod| {
            vectorized(
                isa,
                #[inline(always)]
                || to_lanes(xs, count, ci, (g.h, g.w), (hp, wp), (g.pad, g.pad), tr, xl),
            );
            for &blk in &lay.blocks {
                let lane_cols = blk.txn * LANES;
                let layout = RhsLayout::new(isa, ci, lane_cols);
                let (v_at, m_at) = (skew(layout.len()), skew(co * lane_cols));
                let place = |c: usize, t: usize| layout.offset(c, t * LANES);
                vectorized(
                    isa,
                    #[inline(always)]
                    || transform_tiles(&T::T.bt, FORWARD_FUSED, xl, ci, (hp, wp), (M, blk), v, v_at, place),
                );
                let v = &*v;
                let operand = |e: usize| RhsOperand::Packed(&v[e * v_at..e * v_at + layout.len()], layout);
                point_products(isa, &packed, operand, (prod, m_at, co), lane_cols);
                let products = (&*prod, m_at, lane_cols);
                vectorized(
                    isa,
                    #[inline(always)]
                    || untransform_tiles(&T::T.at, co, products, (oh, ow), (M, blk), |at, lane| yl[at] = *lane),
                );
            }
            vectorized(
                isa,
                #[inline(always)]
                || from_lanes(yl, count, co, (g.oh, g.ow), (oh, ow), b, act, tr, ys),
            );
        })
    });
}

/// dw = ∂(Σ dy·conv(x, w))/∂w (the bias gradient is not computed here).
pub fn backward_weight(tile: Tile, isa: Isa, x: &[f32], dy: &[f32], dw: &mut [f32], g: &ConvGeom) {
    backward(tile, isa, x, dy, &[], None, Some(dw), g)
}

/// dx and dw at once: where dy has more channels than dx, from one pass over dy (which goes into
/// lanes and through A·dy·Aᵀ once for both, see [`backward_t`]); elsewhere as the two passes.
/// Either way the same bits as [`backward_data`] and [`backward_weight`].
#[allow(clippy::too_many_arguments)]
pub fn backward_data_and_weight(
    tile: Tile,
    isa: Isa,
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    g: &ConvGeom,
) {
    assert!(applies(g), "winograd: {g:?} is not 3×3 or 5×5 / stride 1 / same padding");
    if g.c_in < g.c_out {
        return backward(tile, isa, x, dy, w, Some(dx), Some(dw), g);
    }
    backward_data(tile, isa, dy, w, dx, g);
    backward_weight(tile, isa, x, dy, dw, g);
}

#[allow(clippy::too_many_arguments)]
fn backward(
    tile: Tile,
    isa: Isa,
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    g: &ConvGeom,
) {
    assert!(applies(g), "winograd: {g:?} is not 3×3 or 5×5 / stride 1 / same padding");
    match (tile, g.kh) {
        (Tile::F2, 3) => backward_t::<2, 4, 3, F23>(isa, x, dy, w, dx, dw, g),
        (Tile::F4, 3) => backward_t::<4, 6, 3, F43>(isa, x, dy, w, dx, dw, g),
        (Tile::F2, _) => backward_t::<2, 6, 5, F25T>(isa, x, dy, w, dx, dw, g),
        (Tile::F4, _) => backward_t::<4, 8, 5, F45T>(isa, x, dy, w, dx, dw, g),
    }
}

/// `l·d·lᵀ` of tile `t` (its window at `corner` in every lane plane: `planes[c]`, `ph` rows of
/// `pw`) for every channel, 16 channels at a time: staged, transposed so that each lane (one
/// pixel of one image) becomes a row of 16 channels, and stored into `dst` (one operand per point
/// e) in the GEMM's packed right-hand layout `lb`, whose rows are pixels and columns channels.
/// Inlined, so the coefficients stay compile-time constants.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn transform_transposed<const A: usize, const K: usize>(
    l: &Folded<A, K>,
    planes: &[Lane],
    chans: usize,
    (ph, pw): (usize, usize),
    corner: usize,
    t: usize,
    lb: RhsLayout,
    dst: &mut [f32],
    stage: &mut [f32],
    tr: Transpose,
) {
    // The α² squares lie `skew` apart: at 1 KiB each, the lanes one channel writes to all of
    // them fell into four sets of the L1 cache.
    let sq_at = skew(LANES * LANES);
    let (n, e_at) = (lb.len(), skew(lb.len()));
    for c0 in (0..chans).step_by(LANES) {
        let cn = LANES.min(chans - c0);
        for c in c0..c0 + cn {
            let at = c * ph * pw + corner;
            let load = |r: usize, s: usize| planes[at + r * pw + s];
            sandwich_with(l, l, false, load, |i, j, lane| {
                let at = (i * A + j) * sq_at + (c - c0) * LANES;
                stage[at..at + LANES].copy_from_slice(lane);
            });
        }
        // Strips are whole multiples of 16 columns: each pixel's channels are contiguous, and
        // the block's pixels lie in one KC block, one strip row (nr values) apart.
        let at0 = lb.offset(t * LANES, c0);
        debug_assert_eq!(lb.offset(t * LANES + LANES - 1, c0), at0 + (LANES - 1) * lb.nr);
        for (e, sq) in stage.chunks_exact_mut(sq_at).enumerate() {
            let sq: &mut [Lane; LANES] = bytemuck::cast_slice_mut(&mut sq[..LANES * LANES]).try_into().unwrap();
            // SAFETY: `tr` comes from `transposer`, which checked the CPU.
            unsafe { tr(sq) };
            let dst = &mut dst[e * e_at..e * e_at + n];
            for (j, row) in sq.iter().enumerate() {
                let at = at0 + j * lb.nr;
                dst[at..at + LANES].copy_from_slice(row);
            }
        }
    }
}

/// Backward-data through the transposed transforms, the weight gradient, or both from one pass
/// over dy; both start from `Z = A·dy·Aᵀ` of every tile, written row-major per point
/// (`[channel][pixel]`, the block's 16·txn pixels to a row).
///
/// Backward-data (only where c_in < c_out, see [`backward_data`]): `dV[e] = U[e]ᵀ·Z[e]` per
/// point e, with Z read in place as the GEMM's right operand, then `dx += B·dV·Bᵀ` added into
/// the tile's α×α window of the padded input (windows overlap by r − 1). The α×α transform (the
/// costly one) runs on dx's c_in channels, the m×m → α×α one on dy's c_out; the flipped forward
/// pass has them the other way round. The windows are added in a fixed order (block by block,
/// channel, tile, in row order whatever the blocks), so dx's bits are fixed.
///
/// Weight gradient: `dU[e] = Σ_pixels Z[e] ⊗ (Bᵀ·x·B)[e]`, α² GEMMs reducing over a block's
/// pixels, then `dw = Gᵀ·dU·G`. The side with more channels (dy's 120 against x's 16 in LeNet's
/// conv3) is the GEMM's left operand, read in place row-major as its transform wrote it; only
/// the other is transposed, 16 channels of one tile at a time, into the packed right operand
/// (pixels × channels). Each group of 16 images sums its blocks (fixed, whatever the machine)
/// into its own partial, and the partials are added in group order, so the bits depend neither
/// on the thread count nor on whether dx was computed alongside.
///
/// A·dy·Aᵀ, shared, is the weight gradient's plain multiply and add (not `FORWARD_FUSED`).
fn backward_t<const M: usize, const A: usize, const R: usize, T: Coefs<M, A, R>>(
    isa: Isa,
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    g: &ConvGeom,
) {
    let (ci, co) = (g.c_in, g.c_out);
    assert!(dx.is_none() || ci < co, "winograd: the transposed backward-data is for fewer channels in than out");
    let (in_img, out_img) = (ci * g.h * g.w, co * g.oh * g.ow);
    let tr = transposer(isa);
    let lay = Layout::new::<M, A, R>(g, WGRAD_BLOCK_BYTES);
    let (blocks, ld_max) = (&lay.blocks, lay.widest * LANES);
    let ((hp, wp), (oh, ow)) = (lay.padded, lay.tiled);
    let packed = dx.is_some().then(|| packed_filters::<M, A, R, T>(isa, w, co, ci, true));
    let want_dw = dw.is_some();
    // The weight gradient's rows: dy's channels (then Z is its left operand as it stands) or x's.
    let dy_rows = ci < co;
    let (rows, cols) = if dy_rows { (co, ci) } else { (ci, co) };
    let (want_dx, padded, tiled) = (packed.is_some(), ci * hp * wp * LANES, co * oh * ow * LANES);
    let lens = [
        tiled,                                                                           // dy in lanes
        if want_dw { padded } else { 0 },                                                // x in lanes
        if want_dx { padded } else { 0 },                                                // dx in lanes
        A * A * skew(rows * ld_max),                                                     // row-major transforms
        if want_dw { A * A * skew(RhsLayout::new(isa, ld_max, cols).len()) } else { 0 }, // transposed
        if want_dw { A * A * skew(LANES * LANES) } else { 0 },                           // transpose staging
        if want_dx { A * A * skew(ci * ld_max) } else { 0 },                             // dV
    ];
    let groups = g.n.div_ceil(LANES);
    let dx_parts: Vec<Option<&mut [f32]>> = match dx {
        Some(d) => d.chunks_mut(in_img * LANES).map(Some).collect(),
        None => (0..groups).map(|_| None).collect(),
    };
    // Σ over this group's tiles, [e][rows][cols], one partial per group of images.
    let partials: Vec<Option<Vec<f32>>> = dx_parts
        .into_par_iter()
        .enumerate()
        .map(|(grp, dxs)| {
            let count = LANES.min(g.n - grp * LANES);
            let dys = &dy[grp * LANES * out_img..(grp * LANES + count) * out_img];
            // Recycled, like the backend's tensors: a fresh megabyte per group faulted its pages
            // in on every call. The first block's products overwrite it, so it is not zeroed.
            let mut acc = want_dw.then(|| reused(A * A * co * ci));
            with_scratch(&SCRATCH, lens.iter().sum(), |buf| {
                let mut parts = Vec::with_capacity(lens.len());
                let mut rest = buf;
                for len in lens {
                    let (head, tail) = rest.split_at_mut(len);
                    parts.push(head);
                    rest = tail;
                }
                let [dyl, xl, dxl, z, rhs, stage, dv] = <[&mut [f32]; 7]>::try_from(parts).ok().unwrap();
                let (dyl, xl, dxl): (&mut [Lane], &mut [Lane], &mut [Lane]) =
                    (bytemuck::cast_slice_mut(dyl), bytemuck::cast_slice_mut(xl), bytemuck::cast_slice_mut(dxl));
                dxl.fill([0.0; LANES]);
                vectorized(
                    isa,
                    #[inline(always)]
                    || {
                        to_lanes(dys, count, co, (g.oh, g.ow), (oh, ow), (0, 0), tr, dyl);
                        if want_dw {
                            let xs = &x[grp * LANES * in_img..(grp * LANES + count) * in_img];
                            to_lanes(xs, count, ci, (g.h, g.w), (hp, wp), (g.pad, g.pad), tr, xl);
                        }
                    },
                );
                let (dyl, xl) = (&*dyl, &*xl);
                for (b, &blk) in blocks.iter().enumerate() {
                    let ld = blk.txn * LANES;
                    let z_at = skew(rows * ld);
                    let place = |c: usize, t: usize| c * ld + t * LANES;
                    vectorized(
                        isa,
                        #[inline(always)]
                        || match dy_rows {
                            true => transform_tiles(&T::T.a, false, dyl, co, (oh, ow), (M, blk), z, z_at, place),
                            false => transform_tiles(&T::T.bt, false, xl, ci, (hp, wp), (M, blk), z, z_at, place),
                        },
                    );
                    let z = &*z;
                    let z_of = |e: usize| &z[e * z_at..e * z_at + rows * ld];
                    if let Some(packed) = &packed {
                        let m_at = skew(ci * ld);
                        point_products(isa, packed, |e| RhsOperand::Rows(z_of(e), ld), (dv, m_at, ci), ld);
                        let products = (&*dv, m_at, ld);
                        // Added: the windows overlap.
                        let add = |at: usize, lane: &Lane| {
                            let d = &mut dxl[at];
                            *d = std::array::from_fn(|l| d[l] + lane[l]);
                        };
                        vectorized(
                            isa,
                            #[inline(always)]
                            || untransform_tiles(&T::T.b, ci, products, (hp, wp), (M, blk), add),
                        );
                    }
                    if let Some(acc) = acc.as_mut() {
                        let lb = RhsLayout::new(isa, ld, cols);
                        vectorized(
                            isa,
                            #[inline(always)]
                            || {
                                for t in 0..blk.txn {
                                    let at = |w: usize| blk.ty * M * w + (blk.tx0 + t) * M;
                                    let stage = &mut *stage;
                                    match dy_rows {
                                        true => transform_transposed::<A, A>(
                                            &T::T.bt,
                                            xl,
                                            ci,
                                            (hp, wp),
                                            at(wp),
                                            t,
                                            lb,
                                            rhs,
                                            stage,
                                            tr,
                                        ),
                                        false => transform_transposed::<A, M>(
                                            &T::T.a,
                                            dyl,
                                            co,
                                            (oh, ow),
                                            at(ow),
                                            t,
                                            lb,
                                            rhs,
                                            stage,
                                            tr,
                                        ),
                                    }
                                }
                            },
                        );
                        let r_at = skew(lb.len());
                        for e in 0..A * A {
                            let rhs_e = RhsOperand::Packed(&rhs[e * r_at..e * r_at + lb.len()], lb);
                            let out = &mut acc[e * co * ci..(e + 1) * co * ci];
                            sgemm_packed_rhs(
                                isa,
                                rows,
                                ld,
                                z_of(e),
                                Mat::rows(ld),
                                rhs_e,
                                cols,
                                out,
                                Mat::rows(cols),
                                b > 0,
                            );
                        }
                    }
                }
                if let Some(dxs) = dxs {
                    // The border dropped: pixel (y, x) of dx is (y + pad, x + pad) of the padded
                    // planes.
                    let inner = &dxl[g.pad * wp + g.pad..];
                    vectorized(
                        isa,
                        #[inline(always)]
                        || from_lanes(inner, count, ci, (g.h, g.w), (hp, wp), None, Activation::Identity, tr, dxs),
                    );
                }
            });
            acc
        })
        .collect();
    let Some(dw) = dw else {
        return;
    };
    let partials: Vec<Vec<f32>> = partials.into_iter().flatten().collect();
    // The partial sums added in group order (so the bits do not depend on the thread count),
    // split over both cores by position.
    // The first partial is the start (a zeroed start was a serial memset).
    let Some((first, rest)) = partials.split_first() else {
        dw.fill(0.0);
        return;
    };
    let mut sum = reused(A * A * co * ci);
    sum.par_chunks_mut(4096).enumerate().for_each(|(i, chunk)| {
        chunk.copy_from_slice(&first[i * 4096..][..chunk.len()]);
        for part in rest {
            chunk.iter_mut().zip(&part[i * 4096..]).for_each(|(s, v)| *s += v);
        }
    });
    partials.into_iter().for_each(recycle);
    dw.par_chunks_exact_mut(R * R).enumerate().for_each(|(kc, out)| {
        let (k, c) = (kc / ci, kc % ci);
        let at = if dy_rows { k * ci + c } else { c * co + k };
        let m: [[f32; A]; A] = std::array::from_fn(|r| std::array::from_fn(|s| sum[(r * A + s) * co * ci + at]));
        for (o, v) in out.iter_mut().zip(sandwich(&T::T.gt, &m, &T::T.gt).iter().flatten()) {
            *o = *v;
        }
    });
    recycle(sum);
}
