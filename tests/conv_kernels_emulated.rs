//! Parity of the convolution and pooling kernels (kernels/conv.cu, conv_tc.cu,
//! kernels/pool.cu), run on the host emulator, against naive f64 reference
//! loops. Outputs are poisoned (NaN) before every launch so a kernel that skips
//! an element cannot pass by leaving a correct-looking value behind. Launch
//! configurations are the ones documented at the top of each .cu file.

use rotvar::backend::cuda::emu::{self, KArg};
use rotvar::backend::precision::{self, Precision};

mod common;
use common::Rng;

const POISON: f32 = f32::NAN;
const FP32: Precision = Precision::Fp32;
const BLOCK: u32 = 256;
/// The conv kernels' variants and their (BM, BN) tiles (conv.cu): every one is checked on every
/// shape, whatever tile the host would pick for it (v4's and v5's backward-data on stride 1 only).
/// v5 is v4 with its tiles filled by cp.async, so the emulator's cp.async checks run on every shape.
const TILED: [(&str, usize, usize); 5] =
    [("v1", 64, 64), ("v2_bm32", 32, 128), ("v2_bm16", 16, 256), ("v4", 128, 128), ("v5", 128, 128)];
/// The tiles with tensor-core twins (v5's: the 128 x 128 tile on 64 x 32 warp tiles).
const TC_TILED: [(&str, usize, usize); 4] = [TILED[0], TILED[1], TILED[2], TILED[4]];

/// v4's and v5's backward-data kernels take stride 1 only (the host runs v3 for the others).
fn bwd_data_takes(t: (&str, usize, usize), g: &Conv) -> bool {
    (t.0 != "v4" && t.0 != "v5") || g.stride == 1
}

fn launch(name: &str, grid: (u32, u32, u32), block: u32, args: &[KArg]) {
    // SAFETY: every test passes pointers to live Vecs sized for the shapes it launches with.
    unsafe { emu::launch(name, grid, (block, 1, 1), 0, args) }.unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// Every buffer sits between guard zones as long as itself (+256), and the
/// kernel is given exactly the data between them, so the emulator's memcheck
/// reports any access outside it. The zones are a second line: an input read
/// past either end would return NaN, and an output write past either end would
/// change a sentinel that `Output::take` checks.
fn guard(len: usize) -> usize {
    len + 256
}
const SENTINEL: f32 = -12345.5;

struct Input(Vec<f32>, usize);
impl Input {
    fn new(data: &[f32]) -> Self {
        let g = guard(data.len());
        let mut buf = vec![f32::NAN; data.len() + 2 * g];
        buf[g..g + data.len()].copy_from_slice(data);
        Input(buf, g)
    }
    /// Exactly the data: the sanitizer checks every access against these bounds.
    fn arg(&self) -> KArg {
        KArg::slice(&self.0[self.1..self.0.len() - self.1])
    }
}

/// An output buffer poisoned with NaN inside sentinel guard zones.
struct Output(Vec<f32>, usize, usize);
impl Output {
    fn new(len: usize) -> Self {
        let g = guard(len);
        let mut buf = vec![SENTINEL; len + 2 * g];
        buf[g..g + len].fill(POISON);
        Output(buf, g, len)
    }
    /// Exactly the output: the sanitizer checks every access against these bounds.
    fn arg(&mut self) -> KArg {
        KArg::slice_mut(&mut self.0[self.1..self.1 + self.2])
    }
    /// The written elements, after checking that nothing outside them changed.
    fn take(self, what: &str) -> Vec<f32> {
        let Output(buf, g, len) = self;
        let outside = buf[..g].iter().chain(&buf[g + len..]);
        assert!(outside.into_iter().all(|v| v.to_bits() == SENTINEL.to_bits()), "{what}: wrote out of bounds");
        buf[g..g + len].to_vec()
    }
}

fn i32s(xs: &[usize]) -> Vec<KArg> {
    xs.iter().map(|&x| KArg::I32(x as i32)).collect()
}

/// max |got - want| / max(1, max |want|) < tol, and no NaN anywhere.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f64, |m, &w| m.max(w.abs()));
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}[{i}]: NaN (element not written?), want {w}");
        let err = (g as f64 - w).abs();
        if err > worst {
            (worst, at) = (err, i);
        }
    }
    let rel = worst / scale;
    assert!(
        rel < tol,
        "{what}: max err {worst:e} at [{at}] (got {}, want {}), relative {rel:e} >= {tol:e}",
        got[at],
        want[at]
    );
}

// ---------------------------------------------------------------- conv

#[derive(Clone, Copy, Debug)]
struct Conv {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    r: usize,
    s: usize,
    stride: usize,
    pad: usize,
}

impl Conv {
    fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.r) / self.stride + 1
    }
    fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.s) / self.stride + 1
    }
    fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    fn w_len(&self) -> usize {
        self.k * self.c * self.r * self.s
    }
    fn y_len(&self) -> usize {
        self.n * self.k * self.oh() * self.ow()
    }
    /// N, C, H, W, K, R, S, stride, pad, OH, OW as kernel arguments.
    fn args(&self) -> Vec<KArg> {
        i32s(&[self.n, self.c, self.h, self.w, self.k, self.r, self.s, self.stride, self.pad, self.oh(), self.ow()])
    }
    /// Input coordinate of output `o` and kernel tap `t`, if inside the image.
    fn input(&self, o: usize, t: usize, size: usize) -> Option<usize> {
        let i = (o * self.stride + t) as isize - self.pad as isize;
        (0..size as isize).contains(&i).then_some(i as usize)
    }
    /// Every (n, k, oy, ox, c, r, s, x index) term of the convolution sum.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
        let (oh, ow) = (self.oh(), self.ow());
        for n in 0..self.n {
            for k in 0..self.k {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let yi = ((n * self.k + k) * oh + oy) * ow + ox;
                        for c in 0..self.c {
                            for r in 0..self.r {
                                let Some(iy) = self.input(oy, r, self.h) else { continue };
                                for s in 0..self.s {
                                    let Some(ix) = self.input(ox, s, self.w) else { continue };
                                    let xi = ((n * self.c + c) * self.h + iy) * self.w + ix;
                                    let wi = ((k * self.c + c) * self.r + r) * self.s + s;
                                    f(yi, xi, wi, k, c);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn ref_fwd(g: &Conv, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
    let mut y = vec![0f64; g.y_len()];
    g.for_each_tap(|yi, xi, wi, _, _| y[yi] += w[wi] as f64 * x[xi] as f64);
    if let Some(b) = bias {
        let p = g.oh() * g.ow();
        for (i, v) in y.iter_mut().enumerate() {
            *v += b[(i / p) % g.k] as f64;
        }
    }
    y
}

fn ref_bwd_data(g: &Conv, dy: &[f32], w: &[f32]) -> Vec<f64> {
    let mut dx = vec![0f64; g.x_len()];
    g.for_each_tap(|yi, xi, wi, _, _| dx[xi] += w[wi] as f64 * dy[yi] as f64);
    dx
}

fn ref_bwd_weight(g: &Conv, x: &[f32], dy: &[f32]) -> Vec<f64> {
    let mut dw = vec![0f64; g.w_len()];
    g.for_each_tap(|yi, xi, wi, _, _| dw[wi] += dy[yi] as f64 * x[xi] as f64);
    dw
}

/// The kernel of `pass` in `variant`: in fp32 the CUDA-core kernel, otherwise its tensor-core
/// twin (kernels/conv_tc.cu), which takes the precision as one more argument.
fn kernel(pass: &str, variant: &str, prec: Precision, args: &mut Vec<KArg>) -> String {
    if prec == Precision::Fp32 {
        return format!("{pass}_{variant}");
    }
    args.push(KArg::I32(prec.code()));
    let tile = match variant {
        "v1" => "tc_bm64",
        "v2_bm32" => "tc_bm32",
        "v2_bm16" => "tc_bm16",
        "v3" => "tc_v3",
        "v5" => "tc_v5",
        v => panic!("no tensor-core twin of {v}"),
    };
    format!("{pass}_{tile}")
}

fn blocks(n: usize, tile: usize) -> u32 {
    n.div_ceil(tile) as u32
}

/// Activation codes of the fused epilogue (RV_ACT_* in rotvar_common.cuh).
const IDENTITY: i32 = 0;
const RELU: i32 = 1;

fn conv_fwd_variant(
    (variant, bm, bn): (&str, usize, usize),
    g: &Conv,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: i32,
    prec: Precision,
) -> Vec<f32> {
    let (xi, wi, bi) = (Input::new(x), Input::new(w), bias.map(Input::new));
    let mut y = Output::new(g.y_len());
    let mut args = vec![y.arg(), xi.arg(), wi.arg(), bi.as_ref().map_or(KArg::Ptr(0), Input::arg)];
    args.extend(g.args());
    args.push(KArg::I32(act));
    let grid = (blocks(g.n * g.oh() * g.ow(), bn), blocks(g.k, bm), 1);
    let name = kernel("conv2d_fwd", variant, prec, &mut args);
    launch(&name, grid, BLOCK, &args);
    y.take(&name)
}

fn conv_bwd_data_variant(
    (variant, bm, bn): (&str, usize, usize),
    g: &Conv,
    dy: &[f32],
    w: &[f32],
    prec: Precision,
) -> Vec<f32> {
    let (dyi, wi) = (Input::new(dy), Input::new(w));
    let mut dx = Output::new(g.x_len());
    let mut args = vec![dx.arg(), dyi.arg(), wi.arg()];
    args.extend(g.args());
    let grid = (blocks(g.n * g.h * g.w, bn), blocks(g.c, bm), 1);
    let name = kernel("conv2d_bwd_data", variant, prec, &mut args);
    launch(&name, grid, BLOCK, &args);
    dx.take(&name)
}

/// The strided backward-data kernel: one GEMM per sub-pixel phase (grid.z = stride²).
fn conv_bwd_data_v3(g: &Conv, dy: &[f32], w: &[f32], prec: Precision) -> Vec<f32> {
    let (dyi, wi) = (Input::new(dy), Input::new(w));
    let mut dx = Output::new(g.x_len());
    let mut args = vec![dx.arg(), dyi.arg(), wi.arg()];
    args.extend(g.args());
    let cols = g.n * g.h.div_ceil(g.stride) * g.w.div_ceil(g.stride);
    let grid = (blocks(cols, 64), blocks(g.c, 64), (g.stride * g.stride) as u32);
    let name = kernel("conv2d_bwd_data", "v3", prec, &mut args);
    launch(&name, grid, BLOCK, &args);
    dx.take(&name)
}

/// Split-K weight gradient followed by the ordered sum of the splits.
/// `sum_cfg` = Some((grid, block)) overrides the documented sum_partials
/// launch. Returns (dW, partials).
fn conv_bwd_weight(
    (variant, bm, bn): (&str, usize, usize),
    g: &Conv,
    x: &[f32],
    dy: &[f32],
    splits: usize,
    sum_cfg: Option<(u32, u32)>,
    prec: Precision,
) -> (Vec<f32>, Vec<f32>) {
    let len = g.w_len();
    let (xi, dyi) = (Input::new(x), Input::new(dy));
    let mut partial = Output::new(splits * len);
    let mut args = vec![partial.arg(), xi.arg(), dyi.arg()];
    args.extend(g.args());
    args.push(KArg::I32(splits as i32));
    let grid = (blocks(g.c * g.r * g.s, bn), blocks(g.k, bm), splits as u32);
    let name = kernel("conv2d_bwd_weight", variant, prec, &mut args);
    launch(&name, grid, BLOCK, &args);
    let partial = partial.take(&name);

    let pi = Input::new(&partial);
    let mut dw = Output::new(len);
    let (sg, sb) = sum_cfg.unwrap_or((blocks(len, 256).min(1024), 256));
    let args = [dw.arg(), pi.arg(), KArg::I32(splits as i32), KArg::I64(len as i64)];
    launch("sum_partials_f32", (sg, 1, 1), sb, &args);
    (dw.take("sum_partials_f32"), partial)
}

const fn conv(n: usize, c: usize, hw: (usize, usize), k: usize, rs: (usize, usize), stride: usize, pad: usize) -> Conv {
    Conv { n, c, h: hw.0, w: hw.1, k, r: rs.0, s: rs.1, stride, pad }
}

/// Ragged everywhere: no extent is a multiple of the 64x64x16 tiles.
const CONVS: &[Conv] = &[
    conv(3, 5, (7, 9), 6, (3, 3), 1, 1),
    conv(3, 5, (7, 9), 6, (3, 3), 2, 1),
    // LeNet-style 5x5, pad 2.
    conv(2, 3, (12, 10), 8, (5, 5), 1, 2),
    // Pointwise, and pointwise strided (skips inputs).
    conv(2, 7, (5, 6), 9, (1, 1), 1, 0),
    conv(2, 7, (5, 6), 9, (1, 1), 2, 0),
    // K and C*R*S larger than one tile: two row tiles, several K slices.
    conv(2, 9, (6, 6), 70, (3, 3), 1, 1),
    // Non-square kernel, stride larger than the kernel (some dx get nothing).
    conv(2, 4, (9, 8), 5, (3, 2), 3, 1),
    // Stride 2 without padding, (H - R) not a multiple of the stride.
    conv(1, 3, (8, 10), 4, (3, 3), 2, 0),
    // More than one 256-wide column tile, K and C between the narrow tiles' heights.
    conv(4, 20, (11, 13), 20, (3, 3), 1, 1),
];

#[test]
fn conv_fwd_matches_reference() {
    let mut rng = Rng(0xC0_4F);
    for g in CONVS {
        let x = rng.vec(g.x_len(), -1., 1.);
        let w = rng.vec(g.w_len(), -1., 1.);
        let bias = rng.vec(g.k, -1., 1.);
        let want = ref_fwd(g, &x, &w, Some(&bias));
        let want_relu: Vec<f64> = want.iter().map(|v| v.max(0.0)).collect();
        let want_relu_nb: Vec<f64> = ref_fwd(g, &x, &w, None).iter().map(|v| v.max(0.0)).collect();
        for t in TILED {
            let tag = format!("{} {g:?}", t.0);
            let y = conv_fwd_variant(t, g, &x, &w, None, IDENTITY, FP32);
            assert_close(&format!("fwd no bias {tag}"), &y, &ref_fwd(g, &x, &w, None), 1e-4);
            let y = conv_fwd_variant(t, g, &x, &w, Some(&bias), IDENTITY, FP32);
            assert_close(&format!("fwd bias {tag}"), &y, &want, 1e-4);
            // The fused ReLU: against the reference, and bit for bit the ReLU of the unfused output.
            let y_relu = conv_fwd_variant(t, g, &x, &w, Some(&bias), RELU, FP32);
            assert_close(&format!("fwd bias+relu {tag}"), &y_relu, &want_relu, 1e-4);
            assert!(y.iter().any(|&v| v < 0.0) && y.iter().any(|&v| v > 0.0), "{tag}: both signs are exercised");
            for (i, (&a, &b)) in y.iter().zip(&y_relu).enumerate() {
                let fused = if a > 0.0 { a } else { 0.0 };
                assert_eq!(fused.to_bits(), b.to_bits(), "fwd bias+relu {tag} [{i}]: {b} vs relu({a})");
            }
            let y_relu = conv_fwd_variant(t, g, &x, &w, None, RELU, FP32);
            assert_close(&format!("fwd relu no bias {tag}"), &y_relu, &want_relu_nb, 1e-4);
        }
    }
}

#[test]
fn conv_bwd_data_matches_reference() {
    let mut rng = Rng(0xDA7A);
    for g in CONVS {
        let dy = rng.vec(g.y_len(), -1., 1.);
        let w = rng.vec(g.w_len(), -1., 1.);
        let want = ref_bwd_data(g, &dy, &w);
        for t in TILED.into_iter().filter(|&t| bwd_data_takes(t, g)) {
            let dx = conv_bwd_data_variant(t, g, &dy, &w, FP32);
            assert_close(&format!("bwd data {} {g:?}", t.0), &dx, &want, 1e-4);
        }
    }
}

/// The v2 kernels only change the tile shape: the same sums in the same order, so the same
/// bits as v1 (forward with bias and ReLU, backward data, backward weight).
#[test]
fn narrow_tile_conv_kernels_give_v1_bits() {
    let mut rng = Rng(0x2B17);
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    for g in CONVS {
        let (x, w, bias, dy) = (
            rng.vec(g.x_len(), -1., 1.),
            rng.vec(g.w_len(), -1., 1.),
            rng.vec(g.k, -1., 1.),
            rng.vec(g.y_len(), -1., 1.),
        );
        let fwd = |t| bits(conv_fwd_variant(t, g, &x, &w, Some(&bias), RELU, FP32));
        let bwd = |t| bits(conv_bwd_data_variant(t, g, &dy, &w, FP32));
        let wgrad = |t| bits(conv_bwd_weight(t, g, &x, &dy, 3, None, FP32).0);
        for t in &TILED[1..] {
            assert_eq!(fwd(*t), fwd(TILED[0]), "fwd {} {g:?}", t.0);
            if bwd_data_takes(*t, g) {
                assert_eq!(bwd(*t), bwd(TILED[0]), "bwd data {} {g:?}", t.0);
            }
            assert_eq!(wgrad(*t), wgrad(TILED[0]), "bwd weight {} {g:?}", t.0);
        }
    }
}

/// v3 (stride > 1): every phase's valid taps only, against the reference and bit for bit
/// against v1 (the same nonzero products in the same order); phases without taps are zeros.
#[test]
fn strided_conv_bwd_data_v3_matches_reference_and_v1() {
    let mut rng = Rng(0x5EB3);
    let extra = [
        conv(2, 3, (9, 9), 5, (3, 3), 2, 1),
        conv(2, 70, (8, 7), 4, (1, 1), 2, 0),
        conv(1, 2, (10, 11), 3, (5, 4), 3, 2),
    ];
    let strided: Vec<&Conv> = CONVS.iter().chain(&extra).filter(|g| g.stride > 1).collect();
    assert!(strided.len() >= 6);
    for g in strided {
        let dy = rng.vec(g.y_len(), -1., 1.);
        let w = rng.vec(g.w_len(), -1., 1.);
        let got = conv_bwd_data_v3(g, &dy, &w, FP32);
        assert_close(&format!("bwd data v3 {g:?}"), &got, &ref_bwd_data(g, &dy, &w), 1e-4);
        let v1 = conv_bwd_data_variant(TILED[0], g, &dy, &w, FP32);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&v1), "bwd data v3 vs v1 {g:?}");
    }
}

#[test]
fn conv_bwd_weight_matches_reference_for_any_splits() {
    let mut rng = Rng(0x3E16);
    for g in CONVS {
        let x = rng.vec(g.x_len(), -1., 1.);
        let dy = rng.vec(g.y_len(), -1., 1.);
        let want = ref_bwd_weight(g, &x, &dy);
        let kred = g.n * g.oh() * g.ow();
        // 7 leaves the reduction length undivided (and, with 16-aligned
        // chunks, some trailing splits empty); a split per 16-step slice too.
        for splits in [1, 3, 7, kred.div_ceil(16)] {
            for t in TILED {
                let (dw, partial) = conv_bwd_weight(t, g, &x, &dy, splits, None, FP32);
                let tag = format!("bwd weight {} splits={splits} {g:?}", t.0);
                assert_close(&tag, &dw, &want, 1e-4);
                assert!(partial.iter().all(|v| !v.is_nan()), "{tag}: a split left its partial slice unwritten");
            }
        }
    }
}

#[test]
fn conv_bwd_weight_is_deterministic() {
    let mut rng = Rng(0xD37);
    for g in [&CONVS[0], &CONVS[5]] {
        let x = rng.vec(g.x_len(), -1., 1.);
        let dy = rng.vec(g.y_len(), -1., 1.);
        for splits in [3, 5] {
            let (a, pa) = conv_bwd_weight(TILED[0], g, &x, &dy, splits, None, FP32);
            // A different sum_partials grid/block must not change the bits either.
            let (b, pb) = conv_bwd_weight(TILED[0], g, &x, &dy, splits, Some((1, 64)), FP32);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&pa), bits(&pb), "partials differ between runs, splits={splits} {g:?}");
            assert_eq!(bits(&a), bits(&b), "dW differs between runs, splits={splits} {g:?}");
        }
    }
}

// ---------------------------------------------------------------- tensor cores

/// The largest |got - want| relative to max(1, max |want|).
fn deviation(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1f64, |m, &w| m.max(w.abs()));
    got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs())) / scale
}

/// The tensor-core kernels (every tile, every pass, every precision) against the f64 reference
/// of their rounded operands: the same exact products, summed in another order. A control checks
/// that the rounding shows against the unrounded reference (TF32 and BF16 stray from it, 3xTF32
/// does not), so a kernel that quietly ran fp32 would fail, as would one that rounded wrongly.
#[test]
fn tensor_core_conv_kernels_match_the_reference_of_their_rounded_operands() {
    let mut rng = Rng(0x7C0E);
    for g in [&CONVS[0], &CONVS[1], &CONVS[2], &CONVS[5], &CONVS[8]] {
        let (x, w, bias, dy) = (
            rng.vec(g.x_len(), -1., 1.),
            rng.vec(g.w_len(), -1., 1.),
            rng.vec(g.k, -1., 1.),
            rng.vec(g.y_len(), -1., 1.),
        );
        let raw = [ref_fwd(g, &x, &w, Some(&bias)), ref_bwd_data(g, &dy, &w), ref_bwd_weight(g, &x, &dy)];
        for p in [Precision::Tf32, Precision::Tf32x3, Precision::Bf16] {
            let r = |v: &[f32]| precision::rounded(p, v).into_owned();
            let (xr, wr, dyr) = (r(&x), r(&w), r(&dy));
            let want = [ref_fwd(g, &xr, &wr, Some(&bias)), ref_bwd_data(g, &dyr, &wr), ref_bwd_weight(g, &xr, &dyr)];
            let check = |what: &str, got: &[f32], i: usize| {
                assert_close(what, got, &want[i], 1e-5);
                let dev = deviation(got, &raw[i]);
                match p {
                    Precision::Tf32 => assert!(dev > 2e-5, "{what}: {dev:e} from fp32, TF32 rounding not visible"),
                    Precision::Bf16 => assert!(dev > 1e-3, "{what}: {dev:e} from fp32, BF16 rounding not visible"),
                    _ => assert!(dev < 1e-5, "{what}: {dev:e} from fp32, 3xTF32 should be as close as fp32"),
                }
            };
            for t in TC_TILED {
                let tag = format!("{p} {} {g:?}", t.0);
                check(&format!("fwd {tag}"), &conv_fwd_variant(t, g, &x, &w, Some(&bias), IDENTITY, p), 0);
                if bwd_data_takes(t, g) {
                    check(&format!("bwd data {tag}"), &conv_bwd_data_variant(t, g, &dy, &w, p), 1);
                }
                check(&format!("bwd weight {tag}"), &conv_bwd_weight(t, g, &x, &dy, 3, None, p).0, 2);
            }
            if g.stride > 1 {
                check(&format!("bwd data v3 {p} {g:?}"), &conv_bwd_data_v3(g, &dy, &w, p), 1);
            }
        }
    }
}

/// v4 decodes taps through a table that packs r | s << 16 and assumes stride 1 in backward-data:
/// anything else traps rather than computing garbage.
#[test]
fn v4_kernels_refuse_what_their_tap_tables_cannot_hold() {
    let trap = |name: &str, g: &Conv, extra: &[KArg]| {
        let (x, w) = (vec![0.5f32; g.x_len()], vec![0.25f32; g.w_len()]);
        let (xi, wi) = (Input::new(&x), Input::new(&w));
        let mut out = Output::new(g.x_len().max(g.y_len()));
        let mut args = vec![out.arg(), xi.arg(), wi.arg()];
        if name.contains("fwd") {
            args.push(KArg::Ptr(0));
        }
        args.extend(g.args());
        args.extend_from_slice(extra);
        // SAFETY: the buffers are sized for g (the output for the larger of x and y).
        unsafe { emu::launch(name, (1, 1, 1), (BLOCK, 1, 1), 0, &args) }.is_err()
    };
    let strided = conv(1, 2, (6, 6), 3, (3, 3), 2, 1);
    assert!(trap("conv2d_bwd_data_v4", &strided, &[]), "stride 2 accepted");
    assert!(trap("conv2d_bwd_data_v5", &strided, &[]), "v5: stride 2 accepted");
    let wide = conv(1, 1, (1, 40000), 1, (1, 1), 1, 0);
    assert!(trap("conv2d_fwd_v4", &wide, &[KArg::I32(IDENTITY)]), "W = 40000 accepted");
    let ok = conv(1, 2, (6, 6), 3, (3, 3), 1, 1);
    assert!(!trap("conv2d_fwd_v4", &ok, &[KArg::I32(IDENTITY)]), "a plain conv was refused");
}

/// A precision code the tensor-core kernels do not know (fp32's 0 among them) traps.
#[test]
fn tensor_core_kernels_refuse_an_unknown_precision() {
    let g = &CONVS[0];
    let (x, w) = (vec![0.5f32; g.x_len()], vec![0.25f32; g.w_len()]);
    let (xi, wi) = (Input::new(&x), Input::new(&w));
    for code in [0, 4, -1] {
        let mut y = Output::new(g.y_len());
        let mut args = vec![y.arg(), xi.arg(), wi.arg(), KArg::Ptr(0)];
        args.extend(g.args());
        args.extend([KArg::I32(IDENTITY), KArg::I32(code)]);
        let grid = (blocks(g.n * g.oh() * g.ow(), 64), blocks(g.k, 64), 1);
        // SAFETY: the buffers are sized for g.
        let r = unsafe { emu::launch("conv2d_fwd_tc_bm64", grid, (BLOCK, 1, 1), 0, &args) };
        assert!(r.is_err(), "precision code {code} was accepted");
    }
}

#[test]
fn sum_partials_adds_splits_in_order() {
    let mut rng = Rng(0x50);
    for (splits, len, grid, block) in [(1usize, 5usize, 1u32, 32u32), (4, 1000, 2, 64), (9, 777, 4, 256)] {
        let partial = rng.vec(splits * len, -1., 1.);
        let pi = Input::new(&partial);
        let mut out = Output::new(len);
        let args = [out.arg(), pi.arg(), KArg::I32(splits as i32), KArg::I64(len as i64)];
        launch("sum_partials_f32", (grid, 1, 1), block, &args);
        let out = out.take("sum_partials_f32");
        for (i, &o) in out.iter().enumerate() {
            // Exactly the f32 left-to-right sum: the order is part of the contract.
            let want = (1..splits).fold(partial[i], |s, z| s + partial[z * len + i]);
            assert_eq!(o.to_bits(), want.to_bits(), "sum_partials splits={splits} len={len} [{i}]");
        }
    }
}

#[test]
fn channel_sum_matches_reference() {
    let mut rng = Rng(0xB1A5);
    // (N, C, HW, block): HW below, equal to and above the block size, HW = 1
    // (bias of a fully connected layer), several block sizes.
    for (n, c, hw, block) in [
        (3usize, 5usize, 63usize, 256u32),
        (4, 3, 1, 256),
        (2, 2, 700, 256),
        (3, 4, 77, 64),
        (1, 1, 5, 32),
        (5, 2, 256, 256),
    ] {
        let x = rng.vec(n * c * hw, -1., 1.);
        let run = || {
            let xi = Input::new(&x);
            let mut out = Output::new(c);
            let args = [out.arg(), xi.arg(), KArg::I32(n as i32), KArg::I32(c as i32), KArg::I32(hw as i32)];
            launch("channel_sum_f32", (c as u32, 1, 1), block, &args);
            out.take("channel_sum_f32")
        };
        let out = run();
        let want: Vec<f64> = (0..c)
            .map(|ch| (0..n).flat_map(|i| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw]).map(|&v| v as f64).sum())
            .collect();
        assert_close(&format!("channel_sum N={n} C={c} HW={hw} block={block}"), &out, &want, 1e-4);
        let again = run();
        assert_eq!(
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            again.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn conv_kernels_reject_other_block_sizes() {
    let g = CONVS[0];
    let (x, w) = (vec![0f32; g.x_len()], vec![0f32; g.w_len()]);
    let mut y = vec![0f32; g.y_len()];
    let mut args = vec![KArg::slice_mut(&mut y), KArg::slice(&x), KArg::slice(&w), KArg::Ptr(0)];
    args.extend(g.args());
    args.push(KArg::I32(IDENTITY));
    let r = unsafe { emu::launch("conv2d_fwd_v1", (4, 1, 1), (128, 1, 1), 0, &args) };
    assert!(r.unwrap_err().to_string().contains("__trap"));
}

// ---------------------------------------------------------------- pooling

#[derive(Clone, Copy, Debug)]
struct Pool {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Pool {
    fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    fn args(&self) -> Vec<KArg> {
        i32s(&[self.n, self.c, self.h, self.w, self.k, self.stride, self.pad, self.oh(), self.ow()])
    }
    /// The in-image input range of output `o`'s window.
    fn window(&self, o: usize, size: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride) as isize - self.pad as isize;
        start.max(0) as usize..((start + self.k as isize).max(0) as usize).min(size)
    }
}

const MAX: i32 = 0;
const AVG: i32 = 1;

/// Forward and backward references, written like the CPU backend (window
/// scan rows then columns; strict '>' keeps the first maximum), summed in f64.
fn ref_pool(p: &Pool, kind: i32, x: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (oh, ow, hw) = (p.oh(), p.ow(), p.h * p.w);
    let area = (p.k * p.k) as f64;
    let mut y = vec![0f64; p.n * p.c * oh * ow];
    let mut dx = vec![0f64; p.n * p.c * hw];
    for plane in 0..p.n * p.c {
        let xp = &x[plane * hw..(plane + 1) * hw];
        for oy in 0..oh {
            for ox in 0..ow {
                let o = (plane * oh + oy) * ow + ox;
                let mut best: Option<(f32, usize)> = None;
                let mut sum = 0f64;
                for iy in p.window(oy, p.h) {
                    for ix in p.window(ox, p.w) {
                        let v = xp[iy * p.w + ix];
                        sum += v as f64;
                        if best.is_none_or(|(b, _)| v > b) {
                            best = Some((v, iy * p.w + ix));
                        }
                    }
                }
                if kind == MAX {
                    let (v, at) = best.expect("pool window inside the image");
                    y[o] = v as f64;
                    dx[plane * hw + at] += dy[o] as f64;
                } else {
                    y[o] = sum / area;
                    for iy in p.window(oy, p.h) {
                        for ix in p.window(ox, p.w) {
                            dx[plane * hw + iy * p.w + ix] += dy[o] as f64 / area;
                        }
                    }
                }
            }
        }
    }
    (y, dx)
}

const fn pool(n: usize, c: usize, h: usize, w: usize, k: usize, stride: usize, pad: usize) -> Pool {
    Pool { n, c, h, w, k, stride, pad }
}

const POOLS: &[Pool] = &[
    pool(2, 3, 8, 10, 2, 2, 0),
    // Odd sizes: the last row/column of x is in no window.
    pool(2, 3, 7, 9, 2, 2, 0),
    pool(2, 3, 7, 9, 3, 2, 1),
    // Overlapping windows with padding on every side.
    pool(1, 2, 6, 5, 3, 1, 1),
    pool(2, 2, 9, 7, 2, 1, 1),
];

#[test]
fn pool_fwd_bwd_match_reference() {
    let mut rng = Rng(0x9001);
    for p in POOLS {
        for kind in [MAX, AVG] {
            // (grid, block): the documented launch, and a tiny grid so each
            // thread walks several elements of the grid-stride loop.
            for (ties, (grid_div, block)) in [(false, (256usize, BLOCK)), (true, (usize::MAX, 64))] {
                // Integer-valued data makes many ties: checks the first-maximum rule.
                let x = if ties { rng.ties(p.n * p.c * p.h * p.w, 3) } else { rng.vec(p.n * p.c * p.h * p.w, -1., 1.) };
                let ylen = p.n * p.c * p.oh() * p.ow();
                let dy = rng.vec(ylen, -1., 1.);
                let (want_y, want_dx) = ref_pool(p, kind, &x, &dy);
                let grid =
                    |total: usize| if grid_div == usize::MAX { 1 } else { total.div_ceil(grid_div).min(4096) as u32 };
                let tag = format!("pool kind={kind} ties={ties} block={block} {p:?}");

                let (xi, dyi) = (Input::new(&x), Input::new(&dy));
                let mut y = Output::new(ylen);
                let mut args = vec![y.arg(), xi.arg(), KArg::I32(kind)];
                args.extend(p.args());
                launch("pool2d_fwd_f32", (grid(ylen), 1, 1), block, &args);
                assert_close(&format!("{tag} fwd"), &y.take("pool2d_fwd_f32"), &want_y, 1e-6);

                let mut dx = Output::new(x.len());
                let mut args = vec![dx.arg(), xi.arg(), dyi.arg(), KArg::I32(kind)];
                args.extend(p.args());
                launch("pool2d_bwd_f32", (grid(x.len()), 1, 1), block, &args);
                assert_close(&format!("{tag} bwd"), &dx.take("pool2d_bwd_f32"), &want_dx, 1e-6);
            }
        }
    }
}

#[test]
fn pool_rejects_unknown_kind() {
    let p = POOLS[0];
    let x = vec![0f32; p.n * p.c * p.h * p.w];
    let mut y = vec![0f32; p.n * p.c * p.oh() * p.ow()];
    let mut args = vec![KArg::slice_mut(&mut y), KArg::slice(&x), KArg::I32(2)];
    args.extend(p.args());
    let r = unsafe { emu::launch("pool2d_fwd_f32", (1, 1, 1), (64, 1, 1), 0, &args) };
    assert!(r.unwrap_err().to_string().contains("__trap"));
}

/// RvcDivisor (conv.cuh), the multiply-and-shift division the v4 and wgrad loaders use in place
/// of integer division, is exact: every divisor up to 300 and a spread of large ones, on edge
/// numerators (0, d − 1, d, d + 1, multiples, 2³¹ − 1) and random ones.
#[test]
fn divisor_is_exact_integer_division() {
    let mut rng = Rng(77);
    let mut divisors: Vec<i32> = (1..=300).collect();
    divisors.extend([511, 512, 513, 4095, 65535, 65536, 1 << 20, 1_000_003, (1 << 30) + 1, i32::MAX]);
    for _ in 0..40 {
        divisors.push((rng.next_u64() % i32::MAX as u64) as i32 + 1);
    }
    for &d in &divisors {
        let mut x: Vec<i32> = vec![0, 1, i32::MAX, i32::MAX - 1, i32::MAX - d + 1];
        for m in [1i64, 2, 3, 1000, i32::MAX as i64 / d as i64] {
            for delta in [-1i64, 0, 1] {
                let v = m * d as i64 + delta;
                if (0..=i32::MAX as i64).contains(&v) {
                    x.push(v as i32);
                }
            }
        }
        x.extend((0..64).map(|_| (rng.next_u64() % (i32::MAX as u64 + 1)) as i32));
        let mut q = vec![-7i32; x.len()];
        launch(
            "conv_divisor_probe",
            (2, 1, 1),
            32,
            &[KArg::slice_mut(&mut q), KArg::slice(&x), KArg::I32(d), KArg::I64(x.len() as i64)],
        );
        for (xi, qi) in x.iter().zip(&q) {
            assert_eq!(*qi, xi / d, "{xi} / {d}");
        }
    }
}
