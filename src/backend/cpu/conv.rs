//! Convolution on the CPU: im2col + GEMM, parallel over images, and the choice of algorithm
//! (`Engine`). On rotvar's own GEMM paths the forward pass and the weight gradient skip the
//! im2col matrix and let the GEMM pack straight from the padded image (`ImageCols`); the
//! explicit route stays as their oracle (both in `im2col.rs`). By default the 3×3 and 5×5 stride-1 layers with enough
//! channels go to Winograd (`winograd/`), and those with few channels on one side to the direct
//! kernels (`direct/`), each with im2col as its oracle.
//!
//! Forward and backward-data are independent per image. Backward-weight sums over images, so it
//! is split into chunks of a fixed number of images whose partial sums are added in chunk order:
//! the result is bit-identical whatever the thread count.

use super::direct;
use super::gemm::{sgemm_on, sgemm_rhs, Mat};
use super::im2col::{col2im, im2col, with_padded_images, ImageCols};
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
