//! Direct convolutions for the stride-1 layers with few channels on one side: LeNet's conv1
//! (1 → 6) and conv2 (6 → 16), and the weight gradient of every model's first layer (1 or 3 →
//! 32 or 64).
//!
//! There im2col + GEMM is a poor fit: the im2col matrix is `c·r²` times the image (25× for a 5×5
//! filter) and the GEMM multiplies it by a matrix with a handful of rows. Winograd's channel
//! GEMMs would have almost nothing to do. So these kernels read the image in place, vectorized
//! over the output columns: one output row is one or two 16-lane vectors, and a block of output
//! channels accumulates in registers while each input row segment is loaded once per tap.
//!
//! - forward: `y[k, oy, ox] = Σ_{c,r,s} w[k, c, r, s] · x_pad[c, oy + r, ox + s]`;
//! - backward-data: at stride 1 it is the forward pass of the flipped filter with its channels
//!   swapped, over `dy` in a border of `k − 1 − pad`;
//! - weight gradient: `dw[k, c, r, s] = Σ_{n,oy,ox} dy[n, k, oy, ox] · x_pad[n, c, oy + r, ox + s]`,
//!   with a block of (output channel, filter column) sums in registers while the images' rows
//!   stream past.
//!
//! Every value is one chain of fused multiply-adds in a fixed order (taps in (c, r, s) order for
//! the forward passes; images then rows for the weight gradient, whose 16 lanes are then added
//! as a fixed tree, and whose 16-image chunks are added in order). The bits therefore do not
//! depend on the vector width, the channel blocking or the thread count, but they differ from
//! the im2col route's, which sums in another order: that route is the oracle, and the tests hold
//! these to 1e-5 of each output's scale.

mod lanes;

use super::buffers::{recycle, with_scratch, zeroed};
use super::isa::Isa;
use crate::backend::{Activation, ConvGeom};
use lanes::{compiled_for_isa, Lanes, L};
use rayon::prelude::*;
use std::cell::RefCell;

/// Images per weight-gradient partial sum. Fixed, as in conv.rs and for the same reason (the
/// sum's order must not depend on the thread count); 16 rather than conv.rs's 8 halves the
/// lane reductions, and a chunk's padded images and gradients still fit in L2.
const WGRAD_CHUNK: usize = 16;

thread_local! {
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The three passes of a convolution, which the direct kernels take on different layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    BackwardData,
    WeightGrad,
}

/// Whether the direct kernels take `pass` of `g`.
///
/// The shape: stride 1; fewer than 8 channels on one side (where Winograd does not go); rows of
/// at most two vectors, input and output (backward-data's output is the input); a 3×3 or 5×5
/// filter (the weight gradient's register blocks are built for these) with a padding under the
/// filter size, so that the flipped filter's border is valid.
///
/// The pass, by measurement (`rotvar bench conv` against `--cpu-conv im2col`, in
/// benches/RESULTS.md): the forward kernels keep at most 12 channels in registers, so they win
/// where a pass writes 4 to 16 channels (LeNet's conv1 and conv2 forward, conv2 backward-data:
/// 1.75–2× im2col). With 32 or 64 output channels (the first layer of SimpleConv or ResNet)
/// the pass is bound by writing its large output, and im2col writes it faster; with fewer than
/// 4, a channel block has too few independent sums to hide the FMA latency. The weight gradient
/// wins on every layer the shape admits.
pub fn applies(g: &ConvGeom, pass: Pass) -> bool {
    let shape = g.stride == 1
        && (g.c_in < 8 || g.c_out < 8)
        && g.kh == g.kw
        && matches!(g.kw, 3 | 5)
        && g.pad < g.kw
        && g.w <= 2 * L
        && g.ow <= 2 * L;
    shape
        && match pass {
            Pass::Forward => (4..=16).contains(&g.c_out),
            Pass::BackwardData => (4..=16).contains(&g.c_in),
            Pass::WeightGrad => true,
        }
}

/// A stride-1 convolution as the kernels see it: `c_in` planes of `h × w` in a zero border of
/// `pad`, copied into planes of `hp × wp` whose rows are long enough for
/// every vector load (the lanes past the output's width read zeros or real values and are
/// dropped).
#[derive(Clone, Copy, Debug)]
struct Plan {
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    nv: usize,
    hp: usize,
    wp: usize,
}

impl Plan {
    fn new(c_in: usize, c_out: usize, h: usize, w: usize, k: usize, pad: usize) -> Plan {
        let (oh, ow) = (h + 2 * pad + 1 - k, w + 2 * pad + 1 - k);
        let nv = ow.div_ceil(L);
        Plan { c_in, c_out, h, w, k, pad, oh, ow, nv, hp: h + 2 * pad, wp: (nv * L + k - 1).max(w + 2 * pad) }
    }

    fn forward(g: &ConvGeom) -> Plan {
        Plan::new(g.c_in, g.c_out, g.h, g.w, g.kw, g.pad)
    }

    /// Backward-data as a forward pass over `dy`: channels swapped, border `k − 1 − pad`.
    fn backward_data(g: &ConvGeom) -> Plan {
        Plan::new(g.c_out, g.c_in, g.oh, g.ow, g.kw, g.kw - 1 - g.pad)
    }

    fn plane(&self) -> usize {
        self.hp * self.wp
    }

    /// One image's `c_in` planes into `dst` (`c_in` padded planes), borders zeroed.
    fn pad_into(&self, x: &[f32], dst: &mut [f32]) {
        dst.fill(0.0);
        for (src, plane) in x.chunks_exact(self.h * self.w).zip(dst.chunks_exact_mut(self.plane())) {
            for (y, row) in src.chunks_exact(self.w).enumerate() {
                let at = (y + self.pad) * self.wp + self.pad;
                plane[at..at + self.w].copy_from_slice(row);
            }
        }
    }
}

/// Channels per block when at most `max` fit: as even as possible (16 channels under a limit
/// of 12 go as 8 + 8, not 12 + 4, so that no block runs at a third of the registers' reach).
fn balanced(channels: usize, max: usize) -> usize {
    channels.div_ceil(channels.div_ceil(max))
}

/// Output channels per register block in the forward kernel: on AVX-512 it computes two
/// vectors at a time (`2·kb` accumulators, two loaded vectors and a broadcast weight within 32
/// registers), on AVX2 one (`kb` accumulators of two registers each, the loaded vector's two and
/// the broadcast within 16).
fn forward_block(isa: Isa, c_out: usize) -> usize {
    balanced(c_out, if isa == Isa::Avx2 { 6 } else { 12 })
}

/// The filter `w[k, c, r, s]` in blocks of `kb` output channels, each block `[c, r, s][kb]`, so
/// that the kernel reads one tap's `kb` weights side by side. A last, smaller block holds the
/// remainder.
fn blocked_weights(w: &[f32], p: &Plan, kb: usize) -> Vec<f32> {
    let taps = p.c_in * p.k * p.k;
    let mut out = Vec::with_capacity(p.c_out * taps);
    for k0 in (0..p.c_out).step_by(kb) {
        let n = kb.min(p.c_out - k0);
        for t in 0..taps {
            out.extend((k0..k0 + n).map(|k| w[k * taps + t]));
        }
    }
    out
}

/// `KB` channels × `NV` output vectors, from the padded image `xp` and one block of blocked
/// weights: vector `j` covers the 16 outputs whose first tap reads `xp[at + j·step]` (the two
/// halves of a row: `step` 16; two rows: `step` = the padded row length).
#[inline(always)]
fn forward_vectors<S: Lanes, const KB: usize, const NV: usize>(
    p: &Plan,
    xp: &[f32],
    wb: &[f32],
    at: usize,
    step: usize,
) -> [[S; NV]; KB] {
    // SAFETY (every `Lanes` call below): this runs inside `S`'s `compiled_for_isa!` frame.
    let mut acc = [[unsafe { S::zero() }; NV]; KB];
    // The block's weights, `KB` a tap: checked once here, not at every tap.
    let wb = wb[..p.c_in * p.k * p.k * KB].as_ptr();
    let mut t = 0;
    for c in 0..p.c_in {
        for r in 0..p.k {
            // Every load below reads 16 values from `row` at `j·step + s`, s < k: one check.
            let row = xp[c * p.plane() + at + r * p.wp..][..(NV - 1) * step + p.k - 1 + L].as_ptr();
            for s in 0..p.k {
                // SAFETY: t < c_in·k·k, within the slice checked above.
                let wk: &[f32; KB] = unsafe { &*(wb.add(t * KB) as *const [f32; KB]) };
                t += 1;
                let v: [S; NV] = std::array::from_fn(|j| unsafe { S::load(row.add(j * step + s)) });
                for (acc_k, &wk) in acc.iter_mut().zip(wk) {
                    let wk = unsafe { S::splat(wk) };
                    for (a, &v) in acc_k.iter_mut().zip(&v) {
                        *a = unsafe { a.fma(wk, v) };
                    }
                }
            }
        }
    }
    acc
}

/// Write vector `j` of each channel to output row `rows[j].0`, from column `rows[j].1`, with
/// bias and activation.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn store_vectors<S: Lanes, const KB: usize, const NV: usize>(
    acc: &[[S; NV]; KB],
    p: &Plan,
    rows: [(usize, usize); NV],
    k0: usize,
    b: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) {
    for (k, vs) in acc.iter().enumerate() {
        for (v, &(oy, ox)) in vs.iter().zip(&rows) {
            let out = &mut y[((k0 + k) * p.oh + oy) * p.ow + ox..][..(p.ow - ox).min(L)];
            // SAFETY: inside `S`'s frame, as in `forward_vectors`. The same as
            // `act.apply(v + b)` on each value (or `act.apply(v)` without a bias).
            unsafe {
                let mut v = *v;
                if let Some(b) = b {
                    v = v.add(S::splat(b[k0 + k]));
                }
                if act == Activation::Relu {
                    v = v.relu();
                }
                v.store_n(out);
            }
        }
    }
}

/// One image, one channel block: two vectors at a time where the registers allow (the halves of
/// a row where rows are longer than 16, else pairs of rows, and a last odd row alone), else one.
/// Each output is the same chain of FMAs either way.
#[inline(always)]
fn forward_image<S: Lanes, const KB: usize>(
    p: &Plan,
    xp: &[f32],
    wb: &[f32],
    k0: usize,
    b: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) {
    if !S::PAIRS {
        for oy in 0..p.oh {
            for j in 0..p.nv {
                let acc = forward_vectors::<S, KB, 1>(p, xp, wb, oy * p.wp + j * L, 0);
                store_vectors(&acc, p, [(oy, j * L)], k0, b, act, y);
            }
        }
        return;
    }
    if p.nv == 2 {
        for oy in 0..p.oh {
            let acc = forward_vectors::<S, KB, 2>(p, xp, wb, oy * p.wp, L);
            store_vectors(&acc, p, [(oy, 0), (oy, L)], k0, b, act, y);
        }
        return;
    }
    let mut oy = 0;
    // Three rows at a time where their 3·KB sums fit the registers with the three loaded
    // vectors and the broadcast: more FMAs per weight broadcast.
    if KB <= 8 {
        while oy + 2 < p.oh {
            let acc = forward_vectors::<S, KB, 3>(p, xp, wb, oy * p.wp, p.wp);
            store_vectors(&acc, p, [(oy, 0), (oy + 1, 0), (oy + 2, 0)], k0, b, act, y);
            oy += 3;
        }
    }
    while oy + 1 < p.oh {
        let acc = forward_vectors::<S, KB, 2>(p, xp, wb, oy * p.wp, p.wp);
        store_vectors(&acc, p, [(oy, 0), (oy + 1, 0)], k0, b, act, y);
        oy += 2;
    }
    if oy < p.oh {
        let acc = forward_vectors::<S, KB, 1>(p, xp, wb, oy * p.wp, 0);
        store_vectors(&acc, p, [(oy, 0)], k0, b, act, y);
    }
}

/// Every channel block of one padded image.
#[inline(always)]
fn forward_blocks<S: Lanes>(
    p: &Plan,
    kb: usize,
    xp: &[f32],
    wb: &[f32],
    b: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) {
    let taps = p.c_in * p.k * p.k;
    for k0 in (0..p.c_out).step_by(kb) {
        let n = kb.min(p.c_out - k0);
        let wb = &wb[k0 * taps..(k0 + n) * taps];
        macro_rules! dispatch {
            ($($k:literal)*) => {
                match n {
                    $($k => forward_image::<S, $k>(p, xp, wb, k0, b, act, y),)*
                    _ => unreachable!("channel block {n} is over 12"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }
}

compiled_for_isa! {
    #[allow(clippy::too_many_arguments)]
    fn forward_blocks_on(p: &Plan, kb: usize, xp: &[f32], wb: &[f32], b: Option<&[f32]>, act: Activation, y: &mut [f32]) => forward_blocks
}

/// y = act(conv(x, w) + b) for every image of `x` on plan `p`, parallel over images.
#[allow(clippy::too_many_arguments)]
fn convolve(isa: Isa, p: &Plan, n: usize, x: &[f32], w: &[f32], b: Option<&[f32]>, act: Activation, y: &mut [f32]) {
    let kb = forward_block(isa, p.c_out);
    let wb = blocked_weights(w, p, kb);
    let (in_img, out_img) = (p.c_in * p.h * p.w, p.c_out * p.oh * p.ow);
    y[..n * out_img].par_chunks_mut(out_img).zip(x[..n * in_img].par_chunks(in_img)).for_each(|(yn, xn)| {
        with_scratch(&PADDED, p.c_in * p.plane(), |xp| {
            p.pad_into(xn, xp);
            forward_blocks_on(isa, p, kb, xp, &wb, b, act, yn)
        })
    });
}

pub fn forward(isa: Isa, x: &[f32], w: &[f32], b: Option<&[f32]>, act: Activation, y: &mut [f32], g: &ConvGeom) {
    convolve(isa, &Plan::forward(g), g.n, x, w, b, act, y)
}

/// dx = the forward pass of `wf[c, k, r, s] = w[k, c, k−1−r, k−1−s]` over `dy`.
pub fn backward_data(isa: Isa, dy: &[f32], w: &[f32], dx: &mut [f32], g: &ConvGeom) {
    let p = Plan::backward_data(g);
    let (kk, taps) = (g.kw * g.kw, g.c_in * g.kw * g.kw);
    let mut wf = vec![0.0f32; w.len()];
    for c in 0..g.c_in {
        for k in 0..g.c_out {
            for t in 0..kk {
                wf[(c * g.c_out + k) * kk + kk - 1 - t] = w[k * taps + c * kk + t];
            }
        }
    }
    convolve(isa, &p, g.n, dy, &wf, None, Activation::Identity, dx)
}

/// Output channels per weight-gradient register block, and the vectors of a row each pass
/// takes: `kb × k × nv` accumulators and `kb × nv` gradient vectors, plus the one input vector in
/// flight, within 31 of AVX-512's 32 registers. On AVX2 (16 registers, two per vector) a pass
/// takes one vector of the row, and one channel of a 5×5 filter (or two of a 3×3) already fills
/// the file. Splitting a row's vectors over passes keeps every lane's chain, so the bits stay.
fn wgrad_block(isa: Isa, k: usize, nv: usize, c_out: usize) -> (usize, usize) {
    if isa == Isa::Avx2 {
        return (if k <= 3 { balanced(c_out, 2) } else { 1 }, 1);
    }
    (balanced(c_out, (1..=6).rev().find(|kb| nv * kb * (k + 1) < 31).unwrap_or(1)), nv)
}

/// Sums for filter row `r` of input channel `c`, channels `k0 .. k0 + KB`, every column
/// `s < K`, over the chunk's images and rows, for the row's vectors `j0 .. j0 + NV`: `xp` is the
/// chunk's padded images, `dy` their gradients (NCHW), read with the lanes past the output's
/// width zeroed. Each sum's lanes go to `lanes[(k·K + s)·nv + j]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn wgrad_block_sums<S: Lanes, const KB: usize, const K: usize, const NV: usize>(
    p: &Plan,
    imgs: usize,
    xp: &[f32],
    dy: &[f32],
    (c, r, k0, j0): (usize, usize, usize, usize),
    lanes: &mut [[f32; L]],
) {
    // SAFETY (every `Lanes` call below): this runs inside `S`'s `compiled_for_isa!` frame.
    let mut acc = [[[unsafe { S::zero() }; NV]; K]; KB];
    let widths: [usize; NV] = std::array::from_fn(|j| (p.ow - (j0 + j) * L).min(L));
    let masks: [S::Mask; NV] = std::array::from_fn(|j| unsafe { S::mask(widths[j]) });
    // Row oy's loads read 16 values at `oy·wp + j·16 + s` (s < K) of `xs`, and the first
    // `widths[j]` at `oy·ow + j·16` of each `ds[k]`: one check per image and plane, not per
    // row (the checks and index arithmetic cost as much as the FMAs on LeNet's conv2).
    let x_span = (p.oh - 1) * p.wp + (NV - 1) * L + K - 1 + L;
    let d_span = (p.oh - 1) * p.ow + (NV - 1) * L + widths[NV - 1];
    for i in 0..imgs {
        let xs = xp[(i * p.c_in + c) * p.plane() + r * p.wp + j0 * L..][..x_span].as_ptr();
        let ds: [*const f32; KB] = std::array::from_fn(|k| {
            let at = (i * p.c_out + k0 + k) * p.oh * p.ow + j0 * L;
            dy[at..at + d_span].as_ptr()
        });
        for oy in 0..p.oh {
            let xrow = xs.wrapping_add(oy * p.wp);
            let d: [[S; NV]; KB] = std::array::from_fn(|k| {
                let drow = ds[k].wrapping_add(oy * p.ow);
                std::array::from_fn(|j| unsafe { S::load_masked(drow.wrapping_add(j * L), masks[j]) })
            });
            for s in 0..K {
                for j in 0..NV {
                    let x = unsafe { S::load(xrow.add(j * L + s)) };
                    for (acc_k, d_k) in acc.iter_mut().zip(&d) {
                        acc_k[s][j] = unsafe { acc_k[s][j].fma(d_k[j], x) };
                    }
                }
            }
        }
    }
    for (k, acc_k) in acc.iter().enumerate() {
        for (s, acc_s) in acc_k.iter().enumerate() {
            for (j, v) in acc_s.iter().enumerate() {
                lanes[(k * K + s) * p.nv + j0 + j] = unsafe { v.to_array() };
            }
        }
    }
}

/// Add each sum's vectors, then its 16 lanes as a tree (lane l + lane l+8, then l+4, ..), into
/// `dw[k, c, r, s]`. A chain of 16 dependent adds per weight cost as much as a third of the
/// accumulation on LeNet's conv2; the tree's first levels are vector adds.
#[inline(always)]
fn store_sums(p: &Plan, lanes: &[[f32; L]], (n, c, r, k0): (usize, usize, usize, usize), dw: &mut [f32]) {
    for k in 0..n {
        for s in 0..p.k {
            let v = &lanes[(k * p.k + s) * p.nv..][..p.nv];
            let mut t = v[0];
            for u in &v[1..] {
                t.iter_mut().zip(u).for_each(|(a, b)| *a += b);
            }
            let mut width = L / 2;
            while width > 0 {
                for l in 0..width {
                    t[l] += t[l + width];
                }
                width /= 2;
            }
            dw[(((k0 + k) * p.c_in + c) * p.k + r) * p.k + s] = t[0];
        }
    }
}

/// dw for the images of one chunk (`x`, `dy` hold exactly them).
fn wgrad_chunk(isa: Isa, p: &Plan, imgs: usize, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (in_img, pimg) = (p.c_in * p.h * p.w, p.c_in * p.plane());
    let (kb, per_pass) = wgrad_block(isa, p.k, p.nv, p.c_out);
    with_scratch(&PADDED, imgs * pimg, |xp| {
        for i in 0..imgs {
            p.pad_into(&x[i * in_img..(i + 1) * in_img], &mut xp[i * pimg..(i + 1) * pimg]);
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 && isa.supported() && (p.k == 3 || p.k == 5) {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { avx2_halves::wgrad_blocks(p, imgs, xp, dy, dw) };
        }
        wgrad_blocks_on(isa, p, (kb, per_pass), imgs, xp, dy, dw)
    });
}

/// The weight gradient on AVX2 by half vectors: each pass takes 8 of a vector's 16 lanes, so
/// that a 5×5 filter's sums for two output channels (three of a 3×3) fit the 16 registers with
/// one input vector, and each input load serves them all. With a whole vector of two registers
/// only one channel fitted, and every pass loaded its five shifted inputs for five FMAs (the
/// loads, not the FMAs, set the pace: LeNet's conv2 ran at half AVX-512's speed, 0.75× oneDNN's).
/// Every lane runs the chain it runs in `wgrad_block_sums`, so the bits are the same.
#[cfg(target_arch = "x86_64")]
mod avx2_halves {
    use super::{store_sums, Plan, L};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA present; `p.k` is 3 or 5.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn wgrad_blocks(p: &Plan, imgs: usize, xp: &[f32], dy: &[f32], dw: &mut [f32]) {
        let kb = super::balanced(p.c_out, if p.k == 3 { 3 } else { 2 });
        let mut lanes = [[0.0f32; L]; 6 * 5 * 2];
        for k0 in (0..p.c_out).step_by(kb) {
            let n = kb.min(p.c_out - k0);
            for c in 0..p.c_in {
                for r in 0..p.k {
                    for j in 0..p.nv {
                        for h in 0..2 {
                            let at = (c, r, k0, j, h);
                            match (n, p.k) {
                                (1, 3) => sums::<1, 3>(p, imgs, xp, dy, at, &mut lanes),
                                (2, 3) => sums::<2, 3>(p, imgs, xp, dy, at, &mut lanes),
                                (3, 3) => sums::<3, 3>(p, imgs, xp, dy, at, &mut lanes),
                                (1, 5) => sums::<1, 5>(p, imgs, xp, dy, at, &mut lanes),
                                (2, 5) => sums::<2, 5>(p, imgs, xp, dy, at, &mut lanes),
                                other => unreachable!("weight-gradient block {other:?}"),
                            }
                        }
                    }
                    store_sums(p, &lanes, (n, c, r, k0), dw);
                }
            }
        }
    }

    /// Lanes `8h .. 8h + 8` of vector `j` of `wgrad_block_sums::<_, KB, K, 1>`'s sums.
    #[inline(always)]
    unsafe fn sums<const KB: usize, const K: usize>(
        p: &Plan,
        imgs: usize,
        xp: &[f32],
        dy: &[f32],
        (c, r, k0, j, h): (usize, usize, usize, usize, usize),
        lanes: &mut [[f32; L]],
    ) {
        let mut acc = [[_mm256_setzero_ps(); K]; KB];
        let width = (p.ow - j * L).min(L).saturating_sub(8 * h).min(8);
        let mask = _mm256_loadu_si256(MASKS[8 - width..].as_ptr().cast());
        let col = j * L + 8 * h;
        // As in `wgrad_block_sums`: one bounds check per image and plane.
        let x_span = (p.oh - 1) * p.wp + K - 1 + 8;
        // A half past the row's end reads nothing (its mask is empty) and is not checked.
        let d_span = if width > 0 { (p.oh - 1) * p.ow + width } else { 0 };
        for i in 0..imgs {
            let xs = xp[(i * p.c_in + c) * p.plane() + r * p.wp + col..][..x_span].as_ptr();
            let ds: [*const f32; KB] = std::array::from_fn(|k| {
                let at = (i * p.c_out + k0 + k) * p.oh * p.ow + col;
                dy[at.min(dy.len())..][..d_span].as_ptr()
            });
            for oy in 0..p.oh {
                let xrow = xs.add(oy * p.wp);
                let d: [__m256; KB] = std::array::from_fn(|k| _mm256_maskload_ps(ds[k].wrapping_add(oy * p.ow), mask));
                for s in 0..K {
                    let x = _mm256_loadu_ps(xrow.add(s));
                    for (acc_k, d_k) in acc.iter_mut().zip(&d) {
                        acc_k[s] = _mm256_fmadd_ps(*d_k, x, acc_k[s]);
                    }
                }
            }
        }
        for (k, acc_k) in acc.iter().enumerate() {
            for (s, v) in acc_k.iter().enumerate() {
                _mm256_storeu_ps(lanes[(k * K + s) * p.nv + j][8 * h..].as_mut_ptr(), *v);
            }
        }
    }

    /// `MASKS[8 − n..][..8]`: the first n lanes on.
    static MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
}

/// Every (output channel block, input channel, filter row) of one chunk; the block's gradient
/// planes stay in cache while every input channel and row passes over them.
#[inline(always)]
fn wgrad_blocks<S: Lanes>(
    p: &Plan,
    (kb, per_pass): (usize, usize),
    imgs: usize,
    xp: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) {
    let mut lanes = [[0.0f32; L]; 6 * 5 * 2];
    for k0 in (0..p.c_out).step_by(kb) {
        let n = kb.min(p.c_out - k0);
        for c in 0..p.c_in {
            for r in 0..p.k {
                for j0 in (0..p.nv).step_by(per_pass) {
                    let at = (c, r, k0, j0);
                    macro_rules! dispatch {
                        ($(($b:literal, $k:literal, $v:literal)),*) => {
                            match (n, p.k, per_pass) {
                                $(($b, $k, $v) => wgrad_block_sums::<S, $b, $k, $v>(p, imgs, xp, dy, at, &mut lanes),)*
                                other => unreachable!("weight-gradient block {other:?}"),
                            }
                        };
                    }
                    dispatch!(
                        (1, 3, 1),
                        (2, 3, 1),
                        (3, 3, 1),
                        (4, 3, 1),
                        (5, 3, 1),
                        (6, 3, 1),
                        (1, 3, 2),
                        (2, 3, 2),
                        (3, 3, 2),
                        (1, 5, 1),
                        (2, 5, 1),
                        (3, 5, 1),
                        (4, 5, 1),
                        (5, 5, 1),
                        (1, 5, 2),
                        (2, 5, 2)
                    )
                }
                store_sums(p, &lanes, (n, c, r, k0), dw);
            }
        }
    }
}

compiled_for_isa! {
    fn wgrad_blocks_on(p: &Plan, blocks: (usize, usize), imgs: usize, xp: &[f32], dy: &[f32], dw: &mut [f32]) => wgrad_blocks
}

/// dw = Σ over images, in chunks of 8 images whose partial sums are added in chunk order.
pub fn backward_weight(isa: Isa, x: &[f32], dy: &[f32], dw: &mut [f32], g: &ConvGeom) {
    let p = Plan::forward(g);
    let (in_img, out_img) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow);
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(WGRAD_CHUNK))
        .into_par_iter()
        .map(|ch| {
            let images = ch * WGRAD_CHUNK..((ch + 1) * WGRAD_CHUNK).min(g.n);
            let mut part = zeroed(dw.len());
            let (xs, dys) =
                (&x[images.start * in_img..images.end * in_img], &dy[images.start * out_img..images.end * out_img]);
            wgrad_chunk(isa, &p, images.len(), xs, dys, &mut part);
            part
        })
        .collect();
    dw.fill(0.0);
    for part in &partials {
        dw.iter_mut().zip(part).for_each(|(d, v)| *d += v);
    }
    partials.into_iter().for_each(recycle);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::conv::{backward_data_on, backward_weight_on, forward_on, Engine};
    use crate::rng::Rng;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The three passes of `g` on the direct kernels at width `isa`: forward with bias (no
    /// activation, then ReLU), backward-data, weight gradient. Outputs start as NaN, so a value
    /// the kernels skip fails.
    fn direct_passes(isa: Isa, g: &ConvGeom, x: &[f32], w: &[f32], bias: &[f32], dy: &[f32]) -> Vec<Vec<f32>> {
        let mut outs = Vec::new();
        for act in [Activation::Identity, Activation::Relu] {
            let mut y = vec![f32::NAN; g.out_len()];
            forward(isa, x, w, Some(bias), act, &mut y, g);
            outs.push(y);
        }
        let mut dx = vec![f32::NAN; g.in_len()];
        backward_data(isa, dy, w, &mut dx, g);
        let mut dw = vec![f32::NAN; w.len()];
        backward_weight(isa, x, dy, &mut dw, g);
        outs.extend([dx, dw]);
        outs
    }

    /// Every pass against the im2col route on rotvar's portable GEMM (the oracle), at the
    /// models' shapes and at odd ones: non-square maps, paddings 0 to k−1, rows of one and two
    /// vectors (7 to 32 columns), odd row counts, channel counts that leave a partial register
    /// block, batches that leave a partial 16-image chunk. The tolerance is 1e-5 of each
    /// output's largest value: the two routes differ only in summation order. Every vector width
    /// (the portable twin included) gives the same bits, and so does one thread.
    #[test]
    fn direct_matches_im2col_and_its_own_bits_everywhere() {
        let mut rng = Rng::new(41);
        let oracle = Engine { gemm: Some(Isa::Portable), implicit: false, winograd: None, direct: false };
        // (n, c_in, h, w, c_out, k, pad)
        let geoms = [
            (3, 1, 28, 28, 6, 5, 2),
            (19, 6, 14, 14, 16, 5, 2),
            (2, 1, 28, 28, 32, 3, 1),
            (2, 3, 32, 32, 64, 3, 1),
            (9, 2, 9, 13, 5, 3, 0),
            (4, 5, 17, 30, 3, 5, 1),
            (3, 12, 16, 7, 4, 5, 4),
            (1, 7, 6, 30, 9, 3, 2),
            // Rows of 8 and 24 columns: AVX2's half passes with no lane of a row inside.
            (5, 3, 8, 8, 7, 3, 1),
            (2, 2, 10, 24, 5, 5, 2),
        ];
        let mut worst = 0.0f32;
        for &(n, c, h, w, co, k, pad) in &geoms {
            let g = ConvGeom::new(n, c, h, w, co, (k, k), 1, pad).unwrap();
            assert!(applies(&g, Pass::WeightGrad), "{g:?} should fit the direct kernels");
            let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.normal()).collect();
            let wt: Vec<f32> = (0..co * g.k()).map(|_| rng.normal() * 0.2).collect();
            let bias: Vec<f32> = (0..co).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..n * co * g.oh * g.ow).map(|_| rng.normal()).collect();
            let mut want = Vec::new();
            for act in [Activation::Identity, Activation::Relu] {
                let mut y = vec![f32::NAN; g.out_len()];
                forward_on(oracle, &x, &wt, Some(&bias), act, &mut y, &g);
                want.push(y);
            }
            let mut dx = vec![f32::NAN; g.in_len()];
            backward_data_on(oracle, &dy, &wt, &mut dx, &g);
            let mut dw = vec![f32::NAN; wt.len()];
            backward_weight_on(oracle, &x, &dy, &mut dw, None, &g);
            want.extend([dx, dw]);
            let mut first: Option<Vec<Vec<f32>>> = None;
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let got = direct_passes(isa, &g, &x, &wt, &bias, &dy);
                let names = ["forward", "forward+relu", "backward-data", "weight gradient"];
                for (what, (a, b)) in names.iter().zip(got.iter().zip(&want)) {
                    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let err = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                    assert!(err < 1e-5, "{what} {g:?} on {isa}: error {err:e} of scale {scale}");
                    worst = worst.max(err);
                }
                match &first {
                    None => first = Some(got),
                    Some(f) => {
                        for (a, b) in got.iter().zip(f) {
                            assert_eq!(bits(a), bits(b), "{g:?}: {isa} disagrees with the portable twin");
                        }
                    }
                }
            }
            // The weight gradient, the one pass that sums over images, on one thread.
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let mut dw = vec![f32::NAN; wt.len()];
            one.install(|| backward_weight(Isa::best(), &x, &dy, &mut dw, &g));
            assert_eq!(bits(&dw), bits(&first.as_ref().unwrap()[3]), "{g:?}: one thread disagrees");
        }
        eprintln!("direct convolution worst relative error against im2col: {worst:e}");
        assert!(worst > 0.0, "the direct kernels should round differently from im2col somewhere");
    }

    /// The engine sends each pass where `applies` says: LeNet's conv2 runs every pass on the
    /// direct kernels (same bits as calling them), SimpleConv's conv1 only its weight gradient
    /// (its forward has the im2col route's bits; with 9 taps the two routes happen to agree to
    /// the bit there, so only LeNet's case can tell them apart).
    #[test]
    fn the_engine_routes_each_pass_as_applies_says() {
        let mut rng = Rng::new(43);
        let isa = Isa::best();
        let engine = Engine { gemm: Some(isa), implicit: true, winograd: None, direct: true };
        let im2col = Engine { direct: false, ..engine };
        for (g, all) in [
            (ConvGeom::new(5, 6, 14, 14, 16, (5, 5), 1, 2).unwrap(), true),
            (ConvGeom::new(3, 1, 28, 28, 32, (3, 3), 1, 1).unwrap(), false),
        ] {
            let x: Vec<f32> = (0..g.in_len()).map(|_| rng.normal()).collect();
            let wt: Vec<f32> = (0..g.c_out * g.k()).map(|_| rng.normal()).collect();
            let bias: Vec<f32> = (0..g.c_out).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..g.out_len()).map(|_| rng.normal()).collect();
            let direct = direct_passes(isa, &g, &x, &wt, &bias, &dy);
            let mut y = vec![f32::NAN; g.out_len()];
            forward_on(engine, &x, &wt, Some(&bias), Activation::Identity, &mut y, &g);
            let mut y_im2col = vec![f32::NAN; g.out_len()];
            forward_on(im2col, &x, &wt, Some(&bias), Activation::Identity, &mut y_im2col, &g);
            let mut dw = vec![f32::NAN; wt.len()];
            backward_weight_on(engine, &x, &dy, &mut dw, None, &g);
            assert!(bits(&dw) == bits(&direct[3]), "{g:?}: weight gradient not on the direct kernels");
            assert!(bits(&y) == bits(if all { &direct[0] } else { &y_im2col }), "{g:?}: forward routed wrongly");
            if all {
                // Here the two routes round differently, so the check above can tell them apart.
                assert!(bits(&direct[0]) != bits(&y_im2col), "{g:?}: the two routes should differ");
                let mut dx = vec![f32::NAN; g.in_len()];
                backward_data_on(engine, &dy, &wt, &mut dx, &g);
                assert!(bits(&dx) == bits(&direct[2]), "{g:?}: backward-data not on the direct kernels");
            }
        }
    }

    /// What the direct kernels take: the small-channel stride-1 layers, not Winograd's layers,
    /// strides above 1, filters other than 3×3 and 5×5, or rows over two vectors; and per pass,
    /// the forward kernels only where a pass writes 4 to 16 channels.
    #[test]
    fn applies_to_the_small_channel_layers_only() {
        let g = |c, h, co, k, s, p| ConvGeom::new(2, c, h, h, co, (k, k), s, p).unwrap();
        use Pass::*;
        for (geom, passes) in [
            (g(1, 28, 6, 5, 1, 2), [true, false, true]),
            (g(6, 14, 16, 5, 1, 2), [true, true, true]),
            (g(1, 28, 32, 3, 1, 1), [false, false, true]),
            (g(3, 32, 64, 3, 1, 1), [false, false, true]),
            (g(16, 7, 120, 5, 1, 2), [false; 3]),
            (g(32, 28, 32, 3, 1, 1), [false; 3]),
            (g(3, 32, 64, 3, 2, 1), [false; 3]),
            (g(3, 32, 8, 1, 1, 0), [false; 3]),
            (g(1, 40, 6, 3, 1, 1), [false; 3]),
            (g(1, 28, 6, 7, 1, 3), [false; 3]),
        ] {
            for (pass, want) in [Forward, BackwardData, WeightGrad].into_iter().zip(passes) {
                assert_eq!(applies(&geom, pass), want, "{geom:?} {pass:?}");
            }
        }
    }
}
