//! Convolution on the CPU: im2col + GEMM, parallel over images, and the choice of algorithm
//! (`Engine`). On rotvar's own GEMM paths the forward pass and the weight gradient skip the
//! im2col matrix and let the GEMM pack straight from the padded image (`ImageCols`); the
//! explicit route stays as their oracle. By default the 3×3 and 5×5 stride-1 layers with enough
//! channels go to Winograd (`winograd/`), and those with few channels on one side to the direct
//! kernels (`direct/`), each with im2col as its oracle.
//!
//! Forward and backward-data are independent per image. Backward-weight sums over images, so it
//! is split into chunks of a fixed number of images whose partial sums are added in chunk order:
//! the result is bit-identical whatever the thread count.

use super::direct;
use super::gemm::{sgemm_on, sgemm_rhs, Mat, PackRhs};
use super::isa::{self, Isa};
use super::winograd::{self, Tile};
use crate::backend::{Activation, ConvGeom};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};

thread_local! {
    /// Per-thread im2col scratch, kept across calls so its pages are faulted in only once.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's scratch buffer of at least `len` values.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    super::buffers::with_scratch(&SCRATCH, len, f)
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

thread_local! {
    /// Per-thread padded copies of a group of images, for the implicit im2col.
    static PADDED_IMAGES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The im2col matrix of consecutive images, read in place by the GEMM's packing instead of being
/// written out first: `[k × imgs·p]` (forward), or its transpose (the weight gradient). Element
/// ((ci, ky, kx), (i, oy, ox)) is `x[i][ci][oy·s + ky][ox·s + kx]` of the padded images.
struct ImageCols<'a> {
    x: &'a [f32],
    g: &'a ConvGeom,
    /// Padded plane height and width.
    hp: usize,
    wp: usize,
    transposed: bool,
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
fn with_padded_images<R>(x: &[f32], imgs: usize, g: &ConvGeom, f: impl FnOnce(&[f32], usize, usize) -> R) -> R {
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

/// How a convolution multiplies: on the crate or one of rotvar's paths, and, on rotvar's, whether
/// it reads the image in place (implicit im2col) or writes the im2col matrix first. The two give
/// the same bits (tests below); the explicit one stays as the readable oracle.
///
/// `winograd`, where set, takes the 3×3 and 5×5 stride-1 "same" layers with enough channels
/// (see `winograd_on`), and `direct` the stride-1 layers with few channels on one side (see
/// `direct_on`); their bits differ from the im2col route's, which is their oracle.
#[derive(Clone, Copy, Debug)]
pub struct Engine {
    pub gemm: Option<Isa>,
    pub implicit: bool,
    pub winograd: Option<Tile>,
    pub direct: bool,
}

/// The convolution algorithm: 0 im2col, 1 Winograd F(2,3), 2 Winograd F(4,3) (the default:
/// 1.2–2.1× faster than im2col on every SimpleConv layer it takes, benches/RESULTS.md).
static ALGO: AtomicU8 = AtomicU8::new(2);

/// `--cpu-conv`: `im2col`, `winograd-f2` or `winograd-f4` (`winograd` is F(4,3)).
pub fn parse_algo(s: &str) -> Result<Option<Tile>> {
    match s.to_ascii_lowercase().as_str() {
        "im2col" | "gemm" => Ok(None),
        "winograd-f2" | "f2" => Ok(Some(Tile::F2)),
        "winograd" | "winograd-f4" | "f4" => Ok(Some(Tile::F4)),
        other => bail!("unknown CPU convolution {other:?}: use im2col, winograd, winograd-f2 or winograd-f4"),
    }
}

/// Run every later convolution of this process with im2col (None) or Winograd.
pub fn choose_algo(t: Option<Tile>) {
    ALGO.store(
        match t {
            None => 0,
            Some(Tile::F2) => 1,
            Some(Tile::F4) => 2,
        },
        Ordering::Relaxed,
    );
}

/// The algorithms in use: `im2col`, or the Winograd tile and the direct kernels beside it.
pub fn algo_name() -> &'static str {
    match Engine::current().winograd {
        None => "im2col",
        Some(Tile::F2) => "winograd-f2 + direct",
        Some(Tile::F4) => "winograd-f4 + direct",
    }
}

impl Engine {
    /// The process-wide choice (`--cpu-gemm`, `--cpu-conv`), implicit wherever rotvar's GEMM runs.
    pub fn current() -> Engine {
        let gemm = isa::active();
        let winograd = match ALGO.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(Tile::F2),
            _ => Some(Tile::F4),
        };
        // The direct kernels come with Winograd: `--cpu-conv im2col` keeps every layer on the
        // oracle route.
        Engine { gemm, implicit: gemm.is_some(), winograd, direct: winograd.is_some() }
    }

    /// The vector path for the direct kernels on `pass` of `g`, if this engine uses them
    /// there: the GEMM's path where rotvar's GEMM runs (so every `--cpu-gemm` path gives the
    /// same bits), else the widest this CPU has. Under the crate's GEMM on an x86 CPU without
    /// AVX2 the widest is portable, where `mul_add` is a library call per value: im2col then.
    fn direct_on(self, g: &ConvGeom, pass: direct::Pass) -> Option<Isa> {
        let isa = self.gemm.unwrap_or_else(Isa::best);
        let slow = cfg!(target_arch = "x86_64") && self.gemm.is_none() && isa == Isa::Portable;
        (self.direct && !slow && direct::applies(g, pass)).then_some(isa)
    }

    /// The Winograd tile for `g`, if this engine uses Winograd there. A layer with a handful of
    /// input or output channels (conv1 on grayscale, LeNet's 6-channel conv2) gives the GEMMs
    /// almost nothing to do, and the transforms would dominate; the direct kernels take those.
    fn winograd_on(self, g: &ConvGeom) -> Option<Tile> {
        self.winograd.filter(|_| winograd::applies(g) && g.c_in >= 8 && g.c_out >= 8)
    }

    /// The path for an implicit im2col on `g`, if this engine does one there.
    fn implicit_on(self, g: &ConvGeom) -> Option<Isa> {
        self.gemm.filter(|_| self.implicit && !is_pointwise(g))
    }

    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        self,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        la: Mat,
        b: &[f32],
        lb: Mat,
        c: &mut [f32],
        lc: Mat,
        acc: bool,
    ) {
        sgemm_on(self.gemm, m, n, k, a, la, b, lb, c, lc, acc)
    }
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

/// out[c_out, imgs·p] (the images side by side) into NCHW `ys`.
fn to_images(out: &[f32], ys: &mut [f32], imgs: usize, g: &ConvGeom) {
    let (p, ld) = (g.oh * g.ow, imgs * g.oh * g.ow);
    for (i, yn) in ys.chunks_exact_mut(g.c_out * p).enumerate() {
        for (co, plane) in yn.chunks_exact_mut(p).enumerate() {
            plane.copy_from_slice(&out[co * ld + i * p..co * ld + (i + 1) * p]);
        }
    }
}

pub fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, act: Activation, y: &mut [f32], g: &ConvGeom) {
    forward_on(Engine::current(), x, w, b, act, y, g)
}

pub fn forward_on(e: Engine, x: &[f32], w: &[f32], b: Option<&[f32]>, act: Activation, y: &mut [f32], g: &ConvGeom) {
    if let Some(t) = e.winograd_on(g) {
        return winograd::forward(t, e.gemm.unwrap_or_else(Isa::best), x, w, b, act, y, g);
    }
    if let Some(isa) = e.direct_on(g, direct::Pass::Forward) {
        return direct::forward(isa, x, w, b, act, y, g);
    }
    let (in_img, out_img, p, k) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow, g.oh * g.ow, g.k());
    let group = images_per_gemm(g);
    y.par_chunks_mut(out_img * group).enumerate().for_each(|(t, ys)| {
        let imgs = ys.len() / out_img;
        let xs = &x[t * group * in_img..(t * group + imgs) * in_img];
        if let Some(isa) = e.implicit_on(g) {
            with_padded_images(xs, imgs, g, |xp, hp, wp| {
                let cols = ImageCols { x: xp, g, hp, wp, transposed: false };
                if imgs == 1 {
                    sgemm_rhs(isa, g.c_out, p, k, w, Mat::rows(k), &cols, ys, Mat::rows(p), false);
                    return;
                }
                let ld = imgs * p;
                with_scratch(g.c_out * ld, |out| {
                    sgemm_rhs(isa, g.c_out, ld, k, w, Mat::rows(k), &cols, out, Mat::rows(ld), false);
                    to_images(out, ys, imgs, g);
                });
            });
        } else if is_pointwise(g) {
            e.sgemm(g.c_out, p, k, w, Mat::rows(k), xs, Mat::rows(p), ys, Mat::rows(p), false);
        } else if group == 1 {
            with_scratch(k * p, |col| {
                im2col(xs, g, col, p);
                e.sgemm(g.c_out, p, k, w, Mat::rows(k), col, Mat::rows(p), ys, Mat::rows(p), false);
            });
        } else {
            // out[c_out, imgs·p] = w · col[k, imgs·p], then each image's planes to NCHW.
            let ld = imgs * p;
            with_scratch((k + g.c_out) * ld, |buf| {
                let (col, out) = buf.split_at_mut(k * ld);
                for (i, xn) in xs.chunks_exact(in_img).enumerate() {
                    im2col(xn, g, &mut col[i * p..], ld);
                }
                e.sgemm(g.c_out, ld, k, w, Mat::rows(k), col, Mat::rows(ld), out, Mat::rows(ld), false);
                to_images(out, ys, imgs, g);
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
    backward_data_on(Engine::current(), dy, w, dx, g)
}

pub fn backward_data_on(e: Engine, dy: &[f32], w: &[f32], dx: &mut [f32], g: &ConvGeom) {
    if let Some(t) = e.winograd_on(g) {
        return winograd::backward_data(t, e.gemm.unwrap_or_else(Isa::best), dy, w, dx, g);
    }
    if let Some(isa) = e.direct_on(g, direct::Pass::BackwardData) {
        return direct::backward_data(isa, dy, w, dx, g);
    }
    let (in_img, out_img, p, k) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow, g.oh * g.ow, g.k());
    let group = images_per_gemm(g);
    dx.par_chunks_mut(in_img * group).enumerate().for_each(|(t, dxs)| {
        let imgs = dxs.len() / in_img;
        let dys = &dy[t * group * out_img..(t * group + imgs) * out_img];
        // dcol[k, p] = wᵀ[k, c_out] · dy[c_out, p]
        if is_pointwise(g) {
            e.sgemm(k, p, g.c_out, w, Mat::transposed(k), dys, Mat::rows(p), dxs, Mat::rows(p), false);
        } else if group == 1 {
            with_scratch(k * p, |dcol| {
                e.sgemm(k, p, g.c_out, w, Mat::transposed(k), dys, Mat::rows(p), dcol, Mat::rows(p), false);
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
                e.sgemm(k, ld, g.c_out, w, Mat::transposed(k), dyb, Mat::rows(ld), dcol, Mat::rows(ld), false);
                for (i, dxn) in dxs.chunks_exact_mut(in_img).enumerate() {
                    col2im(&dcol[i * p..], g, dxn, ld);
                }
            });
        }
    });
}

/// The sum of one output plane, in eight f32 lanes (which vectorize) gathered in f64: a plane
/// holds at most a few thousand values, so the f32 lanes lose nothing that matters.
pub(super) fn row_sum(row: &[f32]) -> f64 {
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
    backward_weight_on(Engine::current(), x, dy, dw, db, g)
}

pub fn backward_weight_on(e: Engine, x: &[f32], dy: &[f32], dw: &mut [f32], db: Option<&mut [f32]>, g: &ConvGeom) {
    match (e.winograd_on(g), e.direct_on(g, direct::Pass::WeightGrad)) {
        (Some(t), _) => winograd::backward_weight(t, e.gemm.unwrap_or_else(Isa::best), x, dy, dw, g),
        (None, Some(isa)) => direct::backward_weight(isa, x, dy, dw, g),
        (None, None) => weight_grad(e, x, dy, dw, g),
    }
    if let Some(db) = db {
        bias_grad(dy, db, g);
    }
}

/// dx and dw (and db) of one layer together: the same bits as [`backward_data`] then
/// [`backward_weight`], from one pass over dy where Winograd can share it.
pub fn backward_data_and_weight(
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    g: &ConvGeom,
) {
    backward_data_and_weight_on(Engine::current(), x, dy, w, dx, dw, db, g)
}

#[allow(clippy::too_many_arguments)]
pub fn backward_data_and_weight_on(
    e: Engine,
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    g: &ConvGeom,
) {
    match e.winograd_on(g) {
        Some(t) => winograd::backward_data_and_weight(t, e.gemm.unwrap_or_else(Isa::best), x, dy, w, dx, dw, g),
        None => {
            backward_data_on(e, dy, w, dx, g);
            return backward_weight_on(e, x, dy, dw, db, g);
        }
    }
    if let Some(db) = db {
        bias_grad(dy, db, g);
    }
}

/// db[co] = the sum of dy over images and pixels of channel co (in f64).
pub fn bias_grad(dy: &[f32], db: &mut [f32], g: &ConvGeom) {
    let (out_img, p) = (g.c_out * g.oh * g.ow, g.oh * g.ow);
    db.par_iter_mut().enumerate().for_each(|(co, d)| {
        let mut s = 0.0f64;
        for n in 0..g.n {
            s += row_sum(&dy[n * out_img + co * p..n * out_img + (co + 1) * p]);
        }
        *d = s as f32;
    });
}

/// ReLU's backward (dx = dy where y > 0) fused with [`bias_grad`] of dx: each image's planes are
/// masked and summed while in cache, in parallel over images; the sums are then added over
/// images in order, as `bias_grad` adds them, so db has its bits.
pub fn relu_and_bias_grad(y: &[f32], dy: &[f32], dx: &mut [f32], db: &mut [f32], g: &ConvGeom) {
    let (out_img, p) = (g.c_out * g.oh * g.ow, g.oh * g.ow);
    assert!(y.len() == g.n * out_img && dy.len() == y.len() && dx.len() == y.len() && db.len() == g.c_out);
    let mut sums = vec![0.0f64; g.n * g.c_out];
    let isa = super::isa::active().unwrap_or_else(Isa::best);
    dx.par_chunks_mut(out_img).zip(sums.par_chunks_mut(g.c_out)).enumerate().for_each(|(n, (dxi, si))| {
        // Compiled for the GEMM path's vector set: lane by lane, so the same bits on every width.
        super::isa::vectorized(
            isa,
            #[inline(always)]
            || {
                for (c, (plane, s)) in dxi.chunks_mut(p).zip(si).enumerate() {
                    let at = n * out_img + c * p;
                    for ((o, &yv), &d) in plane.iter_mut().zip(&y[at..at + p]).zip(&dy[at..at + p]) {
                        *o = super::relu_grad(yv, d);
                    }
                    *s = row_sum(plane);
                }
            },
        )
    });
    for (c, d) in db.iter_mut().enumerate() {
        *d = (0..g.n).fold(0.0f64, |s, n| s + sums[n * g.c_out + c]) as f32;
    }
}

/// dw by im2col and GEMM.
fn weight_grad(e: Engine, x: &[f32], dy: &[f32], dw: &mut [f32], g: &ConvGeom) {
    let (in_img, out_img, p, k) = (g.c_in * g.h * g.w, g.c_out * g.oh * g.ow, g.oh * g.ow, g.k());
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(WGRAD_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = super::buffers::zeroed(g.c_out * k);
            let images = c * WGRAD_CHUNK..((c + 1) * WGRAD_CHUNK).min(g.n);
            if images_per_gemm(g) > 1 {
                // Small outputs: the chunk's images side by side, one GEMM with a reduction of
                // imgs·p instead of imgs GEMMs reducing over p (16 values for a 4×4 map).
                let ld = images.len() * p;
                let implicit = e.implicit_on(g);
                let col_len = if implicit.is_some() { 0 } else { k * ld };
                with_scratch(g.c_out * ld + col_len, |buf| {
                    let (dyb, col) = buf.split_at_mut(g.c_out * ld);
                    for (i, n) in images.clone().enumerate() {
                        for co in 0..g.c_out {
                            let plane = &dy[n * out_img + co * p..n * out_img + (co + 1) * p];
                            dyb[co * ld + i * p..co * ld + (i + 1) * p].copy_from_slice(plane);
                        }
                        if implicit.is_none() {
                            im2col(&x[n * in_img..(n + 1) * in_img], g, &mut col[i * p..], ld);
                        }
                    }
                    match implicit {
                        Some(isa) => with_padded_images(&x[images.start * in_img..], images.len(), g, |xp, hp, wp| {
                            let cols = ImageCols { x: xp, g, hp, wp, transposed: true };
                            sgemm_rhs(isa, g.c_out, k, ld, dyb, Mat::rows(ld), &cols, &mut acc, Mat::rows(k), false);
                        }),
                        None => e.sgemm(
                            g.c_out,
                            k,
                            ld,
                            dyb,
                            Mat::rows(ld),
                            col,
                            Mat::transposed(ld),
                            &mut acc,
                            Mat::rows(k),
                            false,
                        ),
                    }
                });
                return acc;
            }
            for n in images {
                let xn = &x[n * in_img..(n + 1) * in_img];
                let dyn_ = &dy[n * out_img..(n + 1) * out_img];
                // dw[c_out, k] += dy[c_out, p] · colᵀ[p, k]
                if let Some(isa) = e.implicit_on(g) {
                    with_padded_images(xn, 1, g, |xp, hp, wp| {
                        let cols = ImageCols { x: xp, g, hp, wp, transposed: true };
                        sgemm_rhs(isa, g.c_out, k, p, dyn_, Mat::rows(p), &cols, &mut acc, Mat::rows(k), true);
                    });
                } else if is_pointwise(g) {
                    e.sgemm(g.c_out, k, p, dyn_, Mat::rows(p), xn, Mat::transposed(p), &mut acc, Mat::rows(k), true);
                } else {
                    with_scratch(k * p, |col| {
                        im2col(xn, g, col, p);
                        e.sgemm(
                            g.c_out,
                            k,
                            p,
                            dyn_,
                            Mat::rows(p),
                            col,
                            Mat::transposed(p),
                            &mut acc,
                            Mat::rows(k),
                            true,
                        );
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
    partials.into_iter().for_each(super::buffers::recycle);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The fused ReLU backward and bias gradient against the two run apart, bit for bit: zeros
    /// and negative values in y (masked), −0 in dy, outputs poisoned first.
    #[test]
    fn fused_relu_and_bias_grad_match_the_two_passes() {
        let mut rng = Rng::new(11);
        for &(n, c, hw) in &[(3, 5, 7), (17, 6, 28), (2, 120, 7)] {
            let g = ConvGeom::new(n, 4, hw, hw, c, (3, 3), 1, 1).unwrap();
            let len = n * c * hw * hw;
            let y: Vec<f32> = (0..len).map(|i| if i % 3 == 0 { 0.0 } else { rng.normal() }).collect();
            let mut dy: Vec<f32> = (0..len).map(|_| rng.normal()).collect();
            dy[1] = -0.0;
            let want: Vec<f32> = y.iter().zip(&dy).map(|(&y, &d)| super::super::relu_grad(y, d)).collect();
            let mut db_want = vec![f32::NAN; c];
            bias_grad(&want, &mut db_want, &g);
            let (mut dx, mut db) = (vec![f32::NAN; len], vec![f32::NAN; c]);
            relu_and_bias_grad(&y, &dy, &mut dx, &mut db, &g);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&dx), bits(&want), "dx {n}x{c}x{hw}");
            assert_eq!(bits(&db), bits(&db_want), "db {n}x{c}x{hw}");
            assert!(db.iter().all(|v| v.abs() > 0.0), "{db:?}");
        }
    }

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

    /// The implicit im2col (the GEMM packs straight from the image) against the explicit one on
    /// the same GEMM path, bit for bit: forward and weight gradient, with and without padding,
    /// strides 1 and 2, maps above and below the 8-image grouping, batches that do not fill a
    /// group; and both against the crate within the GEMM tolerance.
    #[test]
    fn implicit_im2col_matches_the_explicit_one_to_the_bit() {
        let mut rng = Rng::new(23);
        let isa = Isa::best();
        let implicit = Engine { gemm: Some(isa), implicit: true, winograd: None, direct: false };
        let explicit = Engine { gemm: Some(isa), implicit: false, winograd: None, direct: false };
        let crate_engine = Engine { gemm: None, implicit: false, winograd: None, direct: false };
        let geoms = [
            (3, 2, 12, 12, 5, (3, 3), 1, 1),
            (10, 3, 9, 9, 7, (3, 3), 1, 1),
            (2, 1, 28, 28, 6, (5, 5), 1, 2),
            (9, 6, 14, 14, 16, (5, 5), 1, 0),
            (4, 4, 11, 10, 8, (3, 3), 2, 1),
            (5, 3, 7, 7, 20, (3, 2), 2, 0),
            (3, 40, 12, 12, 50, (3, 3), 1, 1),
        ];
        for &(n, c, h, w, co, k, s, pad) in &geoms {
            let g = ConvGeom::new(n, c, h, w, co, k, s, pad).unwrap();
            let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.normal()).collect();
            let wt: Vec<f32> = (0..co * g.k()).map(|_| rng.normal()).collect();
            let bias: Vec<f32> = (0..co).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..n * co * g.oh * g.ow).map(|_| rng.normal()).collect();
            let fwd = |e: Engine| {
                let mut y = vec![f32::NAN; n * co * g.oh * g.ow];
                forward_on(e, &x, &wt, Some(&bias), Activation::Relu, &mut y, &g);
                y
            };
            let wgrad = |e: Engine| {
                let mut dw = vec![f32::NAN; co * g.k()];
                backward_weight_on(e, &x, &dy, &mut dw, None, &g);
                dw
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let close = |a: &[f32], b: &[f32], what: &str| {
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= 1e-3 * (1.0 + y.abs()), "{what} {g:?}: {x} vs {y}");
                }
            };
            let (yi, ye, yc) = (fwd(implicit), fwd(explicit), fwd(crate_engine));
            assert_eq!(bits(&yi), bits(&ye), "forward {g:?} on {isa}");
            close(&yi, &yc, "forward vs crate");
            let (wi, we, wc) = (wgrad(implicit), wgrad(explicit), wgrad(crate_engine));
            assert_eq!(bits(&wi), bits(&we), "weight gradient {g:?} on {isa}");
            close(&wi, &wc, "weight gradient vs crate");
        }
    }

    /// Winograd F(2,r) and F(4,r), r = 3 and 5, against the im2col route (their oracle):
    /// forward (bias, no activation, so every value is compared), backward-data and weight
    /// gradient, on maps that tiles do and do not divide, channel counts on and off multiples of
    /// 16, batches above, below and equal to one 16-image group. Errors are measured against the
    /// largest reference value of each output: Winograd rounds differently (F(4,5) scales by up to
    /// 8 and 1/90), so the tolerance is the GEMM's 1e-3 of that scale, not bits. Each result is
    /// also the same on any vector width.
    #[test]
    fn winograd_matches_im2col_within_tolerance() {
        let mut rng = Rng::new(31);
        let reference = Engine { gemm: Some(Isa::Portable), implicit: false, winograd: None, direct: false };
        let geoms = [
            (3, 8, 12, 12, 8, 3),
            (17, 16, 14, 14, 24, 3),
            (5, 9, 9, 11, 13, 3),
            (16, 32, 7, 7, 64, 3),
            (2, 32, 28, 28, 32, 3),
            (18, 16, 7, 7, 120, 5),
            (3, 8, 14, 14, 16, 5),
            (5, 9, 10, 9, 11, 5),
            // More channels in than out: x's transforms are then the weight gradient's rows.
            (7, 24, 9, 9, 16, 3),
            (4, 16, 7, 7, 8, 5),
        ];
        let mut worst = [0.0f32; 2];
        for &(n, c, h, w, co, r) in &geoms {
            let g = ConvGeom::new(n, c, h, w, co, (r, r), 1, r / 2).unwrap();
            let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.normal()).collect();
            let wt: Vec<f32> = (0..co * g.k()).map(|_| rng.normal() * 0.2).collect();
            let bias: Vec<f32> = (0..co).map(|_| rng.normal()).collect();
            let dy: Vec<f32> = (0..n * co * g.oh * g.ow).map(|_| rng.normal()).collect();
            let run = |e: Engine| {
                let mut y = vec![f32::NAN; n * co * g.oh * g.ow];
                forward_on(e, &x, &wt, Some(&bias), Activation::Identity, &mut y, &g);
                let mut dx = vec![f32::NAN; n * c * h * w];
                backward_data_on(e, &dy, &wt, &mut dx, &g);
                let mut dw = vec![f32::NAN; co * g.k()];
                backward_weight_on(e, &x, &dy, &mut dw, None, &g);
                // Both at once (one pass over dy where Winograd can): the same bits.
                let (mut dx2, mut dw2) = (vec![f32::NAN; dx.len()], vec![f32::NAN; dw.len()]);
                backward_data_and_weight_on(e, &x, &dy, &wt, &mut dx2, &mut dw2, None, &g);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&dx2), bits(&dx), "{g:?}: backward-data alone and with the weight gradient");
                assert_eq!(bits(&dw2), bits(&dw), "{g:?}: weight gradient alone and with backward-data");
                [y, dx, dw]
            };
            let want = run(reference);
            for (ti, tile) in [Tile::F2, Tile::F4].into_iter().enumerate() {
                let mut got_by_isa = Vec::new();
                for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                    let got = run(Engine { gemm: Some(isa), implicit: true, winograd: Some(tile), direct: false });
                    for (what, (a, b)) in
                        ["forward", "backward-data", "weight gradient"].iter().zip(got.iter().zip(&want))
                    {
                        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let err = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                        assert!(err < 1e-3, "{} {what} {g:?} on {isa}: error {err:e} of scale {scale}", tile.name());
                        worst[ti] = worst[ti].max(err);
                    }
                    got_by_isa.push(got);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for other in &got_by_isa[1..] {
                    for (a, b) in other.iter().zip(&got_by_isa[0]) {
                        assert_eq!(bits(a), bits(b), "{} {g:?}: vector widths disagree", tile.name());
                    }
                }
            }
        }
        eprintln!("winograd worst relative error: F(2,r) {:e}, F(4,r) {:e}", worst[0], worst[1]);
    }
}
