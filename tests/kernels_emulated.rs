//! Parity of every CUDA kernel, run on the host emulator, against plain Rust
//! reference loops. Outputs are poisoned before each launch so a kernel that
//! skips an element cannot pass by leaving a correct-looking value behind.

use rotvar::backend::cuda::emu::{self, KArg};
use rotvar::backend::cuda::kernels;
use rotvar::backend::precision::{self, Precision};

mod common;
use common::Rng;

const FP32: Precision = Precision::Fp32;

const POISON: f32 = f32::NAN;

fn f32s<const N: usize>(xs: [f64; N]) -> [KArg; N] {
    xs.map(|x| KArg::F32(x as f32))
}
fn i32s<const N: usize>(xs: [usize; N]) -> [KArg; N] {
    xs.map(|x| KArg::I32(x as i32))
}

fn run(name: &str, grid: u32, block: u32, args: &[KArg]) {
    // SAFETY: every test passes pointers to live Vecs sized for `n`.
    unsafe { emu::launch(name, (grid, 1, 1), (block, 1, 1), 0, args) }.unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// |got - want| <= rel * max(|want|, floor): relative error, measured against
/// `floor` (the operands' scale) where cancellation makes |want| tiny.
fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= rel * w.abs().max(floor), "{what}[{i}]: got {g}, want {w} (err {err:e})");
    }
}

/// (n, grid, block, element offset). Sizes cross several grid-stride
/// iterations (grid*block << n), leave n % 4 tails, and the odd offset
/// misaligns every pointer so the scalar path is covered too.
const SHAPES: &[(usize, u32, u32, usize)] =
    &[(1, 1, 32, 0), (7, 2, 64, 0), (4099, 3, 128, 0), (4099, 3, 128, 1), (20_000, 4, 256, 0)];

/// Runs an elementwise kernel over every shape. `make` builds the argument
/// list from (output, inputs, n); `reference` maps input values to the
/// expected output. Inputs are drawn in [lo, hi).
fn check_map(
    name: &str,
    n_inputs: usize,
    (lo, hi): (f32, f32),
    make: impl Fn(KArg, &[KArg], i64) -> Vec<KArg>,
    reference: impl Fn(&[f64]) -> f64,
) {
    let mut rng = Rng(0x5EED ^ name.len() as u64);
    for &(n, grid, block, off) in SHAPES {
        let inputs: Vec<Vec<f32>> = (0..n_inputs).map(|_| rng.vec(n + off, lo, hi)).collect();
        let mut out = vec![POISON; n + off];
        let in_args: Vec<KArg> = inputs.iter().map(|v| KArg::slice(&v[off..])).collect();
        let out_arg = KArg::slice_mut(&mut out[off..]);
        run(name, grid, block, &make(out_arg, &in_args, n as i64));
        let want: Vec<f64> =
            (off..n + off).map(|i| reference(&inputs.iter().map(|v| v[i] as f64).collect::<Vec<_>>())).collect();
        let tag = format!("{name} n={n} off={off}");
        assert_close(&tag, &out[off..], &want, 1e-5, 1e-6);
    }
}

// Each case: kernel, number of inputs, input range, argument list builder
// (output, inputs, n), and the reference for one element.
#[test]
fn fill() {
    let make = |o, _: &[KArg], n| vec![o, KArg::F32(-2.5), KArg::I64(n)];
    check_map("fill_f32", 0, (0., 1.), make, |_| -2.5);
}

#[test]
fn add_mul_scale() {
    let binary = |o, i: &[KArg], n| vec![o, i[0], i[1], KArg::I64(n)];
    let add = |act: i32| move |o, i: &[KArg], n| vec![o, i[0], i[1], KArg::I32(act), KArg::I64(n)];
    check_map("add_f32", 2, (-2., 2.), add(0), |x| x[0] + x[1]);
    check_map("add_f32", 2, (-2., 2.), add(1), |x| (x[0] + x[1]).max(0.));
    check_map("mul_f32", 2, (-2., 2.), binary, |x| x[0] * x[1]);
    let make = |o, i: &[KArg], n| vec![o, i[0], KArg::F32(0.3), KArg::I64(n)];
    check_map("scale_f32", 1, (-2., 2.), make, |x| 0.3f32 as f64 * x[0]);
}

#[test]
fn relu_elu() {
    let unary = |o, i: &[KArg], n| vec![o, i[0], KArg::I64(n)];
    let binary = |o, i: &[KArg], n| vec![o, i[0], i[1], KArg::I64(n)];
    check_map("relu_fwd_f32", 1, (-1., 1.), unary, |x| x[0].max(0.));
    let relu_bwd = |x: &[f64]| if x[1] > 0. { x[0] } else { 0. };
    check_map("relu_bwd_f32", 2, (-1., 1.), binary, relu_bwd);
    let a = 1.3f32 as f64;
    let unary_a = |o, i: &[KArg], n| vec![o, i[0], KArg::F32(1.3), KArg::I64(n)];
    let binary_a = |o, i: &[KArg], n| vec![o, i[0], i[1], KArg::F32(1.3), KArg::I64(n)];
    let elu_fwd = |x: &[f64]| if x[0] > 0. { x[0] } else { a * x[0].exp_m1() };
    check_map("elu_fwd_f32", 1, (-3., 3.), unary_a, elu_fwd);
    let elu_bwd = |x: &[f64]| {
        if x[1] > 0. {
            x[0]
        } else {
            x[0] * a * x[1].exp()
        }
    };
    check_map("elu_bwd_f32", 2, (-3., 3.), binary_a, elu_bwd);
}

#[test]
fn relu_propagates_nan() {
    let x = [f32::NAN, -1., 2.];
    let mut y = [0f32; 3];
    let args = [KArg::slice_mut(&mut y), KArg::slice(&x), KArg::I64(3)];
    run("relu_fwd_f32", 1, 32, &args);
    assert!(y[0].is_nan() && y[1] == 0. && y[2] == 2.);
}

#[test]
fn axpy_accumulates_in_place() {
    let mut rng = Rng(7);
    for &(n, grid, block, off) in SHAPES {
        let x = rng.vec(n + off, -1., 1.);
        let y0 = rng.vec(n + off, -1., 1.);
        let mut y = y0.clone();
        let (ya, xa) = (KArg::slice_mut(&mut y[off..]), KArg::slice(&x[off..]));
        run("axpy_f32", grid, block, &[ya, xa, KArg::F32(-0.7), KArg::I64(n as i64)]);
        let want: Vec<f64> = (off..n + off).map(|i| y0[i] as f64 + (-0.7f32) as f64 * x[i] as f64).collect();
        assert_close("axpy", &y[off..], &want, 1e-5, 1e-6);
    }
}

#[test]
fn adam_matches_torch_formula() {
    let (lr, b1, b2, eps, wd) = (1e-3f64, 0.9f64, 0.999f64, 1e-8f64, 1e-2f64);
    let mut rng = Rng(11);
    for &(n, grid, block, off) in SHAPES {
        let mut p = rng.vec(n + off, -1., 1.);
        let mut m = vec![0f32; n + off];
        let mut v = vec![0f32; n + off];
        let (mut rp, mut rm, mut rv): (Vec<f64>, Vec<f64>, Vec<f64>) =
            (p.iter().map(|&x| x as f64).collect(), vec![0.; n + off], vec![0.; n + off]);
        for step in 1..=3 {
            let g = rng.vec(n + off, -1., 1.);
            // Host-side scalars in f64, as torch computes them in Python floats.
            let step_size = lr / (1. - b1.powi(step));
            let bc2_sqrt = (1. - b2.powi(step)).sqrt();
            let mut args = vec![
                KArg::slice_mut(&mut p[off..]),
                KArg::slice(&g[off..]),
                KArg::slice_mut(&mut m[off..]),
                KArg::slice_mut(&mut v[off..]),
            ];
            args.extend(f32s([step_size, 1. - b1, b2, 1. - b2, eps, wd, bc2_sqrt]));
            args.push(KArg::I64(n as i64));
            run("adam_update_f32", grid, block, &args);
            for i in off..n + off {
                let gi = g[i] as f64 + wd * rp[i];
                rm[i] = b1 * rm[i] + (1. - b1) * gi;
                rv[i] = b2 * rv[i] + (1. - b2) * gi * gi;
                rp[i] -= step_size * rm[i] / (rv[i].sqrt() / bc2_sqrt + eps);
            }
            let tag = format!("adam n={n} off={off} step={step}");
            assert_close(&format!("{tag} p"), &p[off..], &rp[off..], 1e-5, 0.1);
            assert_close(&format!("{tag} m"), &m[off..], &rm[off..], 1e-5, 1e-2);
            assert_close(&format!("{tag} v"), &v[off..], &rv[off..], 1e-5, 1e-7);
        }
    }
}

/// adam_multi_f32 (every tensor in one launch, a table of addresses) gives the bits of one
/// adam_update_f32 launch per tensor, for any split of the blocks among the tensors.
#[test]
fn adam_multi_gives_the_per_tensor_bits() {
    let mut rng = Rng(17);
    let (step_size, b1, b2, eps, bc2) = (1e-2f32, 0.1f32, 0.999f32, 1e-8f32, 0.05f32);
    let lens = [1000usize, 3, 77, 1];
    let wds = [1e-2f32, 0.0, 0.5, 1e-3];
    let init: Vec<[Vec<f32>; 4]> = lens
        .iter()
        .map(|&n| [rng.vec(n, -1., 1.), rng.vec(n, -1., 1.), rng.vec(n, -0.1, 0.1), rng.vec(n, 0., 0.1)])
        .collect();
    // One launch per tensor.
    let mut want = init.clone();
    for (t, [p, g, m, v]) in want.iter_mut().enumerate() {
        let mut args = vec![KArg::slice_mut(p), KArg::slice(g), KArg::slice_mut(m), KArg::slice_mut(v)];
        args.extend(f32s([
            step_size as f64,
            b1 as f64,
            b2 as f64,
            (1. - b2) as f64,
            eps as f64,
            wds[t] as f64,
            bc2 as f64,
        ]));
        args.push(KArg::I64(lens[t] as i64));
        run("adam_update_f32", 2, 128, &args);
    }
    for blocks in [[1u32, 1, 1, 1], [3, 1, 2, 5]] {
        let mut got = init.clone();
        let mut table = Vec::new();
        let mut first = 0u32;
        for (t, [p, g, m, v]) in got.iter_mut().enumerate() {
            for a in [p.as_mut_ptr() as u64, g.as_ptr() as u64, m.as_mut_ptr() as u64, v.as_mut_ptr() as u64] {
                table.extend([a as u32, (a >> 32) as u32]);
            }
            table.extend([lens[t] as u32, 0, first, wds[t].to_bits()]);
            first += blocks[t];
        }
        let mut args = vec![KArg::slice(&table), KArg::I32(lens.len() as i32)];
        args.extend(f32s([step_size as f64, b1 as f64, b2 as f64, (1. - b2) as f64, eps as f64, bc2 as f64]));
        run("adam_multi_f32", first, 64, &args);
        for (t, (w, g)) in want.iter().zip(&got).enumerate() {
            for (k, name) in ["param", "grad", "exp_avg", "exp_avg_sq"].iter().enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&g[k]), bits(&w[k]), "tensor {t} {name}, blocks {blocks:?}");
            }
        }
        assert_ne!(got[0][0], init[0][0], "the parameters moved");
    }
}

#[test]
fn sgd_momentum_matches_torch_formula() {
    let (lr, mom, damp, wd) = (0.1f64, 0.9f64, 0.1f64, 5e-4f64);
    let mut rng = Rng(13);
    for nesterov in [0, 1] {
        for &(n, grid, block, off) in SHAPES {
            let mut p = rng.vec(n + off, -1., 1.);
            // Poisoned: the first step must not read the momentum buffer.
            let mut buf = vec![POISON; n + off];
            let mut rp: Vec<f64> = p.iter().map(|&x| x as f64).collect();
            let mut rb = vec![0f64; n + off];
            for step in 0..3 {
                let g = rng.vec(n + off, -1., 1.);
                let (pa, ga) = (KArg::slice_mut(&mut p[off..]), KArg::slice(&g[off..]));
                let mut args = vec![pa, ga, KArg::slice_mut(&mut buf[off..])];
                args.extend(f32s([lr, mom, damp, wd]));
                args.extend([KArg::I32(nesterov), KArg::I32((step == 0) as i32)]);
                args.push(KArg::I64(n as i64));
                run("sgd_momentum_update_f32", grid, block, &args);
                for i in off..n + off {
                    let gi = g[i] as f64 + wd * rp[i];
                    let b = mom * rb[i] + (1. - damp) * gi;
                    rb[i] = if step == 0 { gi } else { b };
                    let d = if nesterov == 1 { gi + mom * rb[i] } else { rb[i] };
                    rp[i] -= lr * d;
                }
                let tag = format!("sgd nesterov={nesterov} n={n} off={off} step={step}");
                // Floors: p and buf are O(0.1..1); cancellation can leave them ~0.
                assert_close(&format!("{tag} p"), &p[off..], &rp[off..], 1e-5, 0.1);
                assert_close(&format!("{tag} buf"), &buf[off..], &rb[off..], 1e-5, 0.1);
            }
        }
    }
}

/// Two-stage sum as the GPU backend will run it. Stage 2 reuses `block`
/// (production uses 1024) so only one case pays for 1024-thread emulated
/// launches, which are slow on small CI machines.
fn device_sum(x: &[f32], grid: u32, block: u32, scale: f32) -> f32 {
    let mut partials = vec![POISON; grid as usize];
    let (pa, xa) = (KArg::slice_mut(&mut partials), KArg::slice(x));
    let n = KArg::I64(x.len() as i64);
    run("reduce_sum_f32", grid, block, &[pa, xa, n, KArg::F32(1.)]);
    let mut out = [POISON];
    let (oa, pa) = (KArg::slice_mut(&mut out), KArg::slice(&partials));
    let n = KArg::I64(grid as i64);
    run("reduce_sum_f32", 1, block, &[oa, pa, n, KArg::F32(scale)]);
    out[0]
}

#[test]
fn reduce_sum_two_stage() {
    let mut rng = Rng(17);
    let shapes = [(1usize, 1u32, 32u32), (31, 2, 64), (1000, 5, 128), (100_003, 8, 256)];
    for &(n, grid, block) in shapes.iter().chain(&[(5000, 2, 1024)]) {
        let x = rng.vec(n, -1., 1.);
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        let abs_sum: f64 = x.iter().map(|&v| (v as f64).abs()).sum();
        let got = device_sum(&x, grid, block, 1.);
        // Error bound scaled by sum|x|: the sum of signed data can be ~0.
        let err = (got as f64 - want).abs();
        assert!(err <= 1e-5 * abs_sum.max(1.), "sum n={n}: got {got}, want {want}, err {err:e}");
        let mean = device_sum(&x, grid, block, 1. / n as f32);
        assert!((mean as f64 - want / n as f64).abs() <= 1e-5 * (abs_sum / n as f64).max(1e-3), "mean n={n}");
        // Deterministic: no atomics, so bits must repeat exactly.
        assert_eq!(got.to_bits(), device_sum(&x, grid, block, 1.).to_bits(), "sum n={n} not deterministic");
    }
}

struct GemmCase {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
    /// Extra elements per row beyond the logical width (leading-dim padding).
    pad: usize,
}

/// The epilogue of gemm_tiled_v2 (v1 has none): a per-column bias and the activation code.
#[derive(Clone, Copy)]
struct Epilogue {
    bias: bool,
    relu: bool,
}

/// Runs `kernel` ("gemm_tiled_v1", "gemm_tiled_v2", "gemm_tiled_v4", "gemm_splitk_v3/<splits>") on case `c`, or
/// in a precision other than fp32 its tensor-core twin (gemm_tc, gemm_splitk_tc), and checks it
/// against the f64 product of the operands as the precision rounds them. Returns the largest
/// deviation from the product of the unrounded operands, relative to each element's scale.
fn check_gemm(kernel: &str, c: &GemmCase, e: Option<Epilogue>, rng: &mut Rng, prec: Precision) -> f64 {
    let (ar, ac) = if c.ta { (c.k, c.m) } else { (c.m, c.k) };
    let (br, bc) = if c.tb { (c.n, c.k) } else { (c.k, c.n) };
    let (lda, ldb, ldc) = (ac + c.pad, bc + c.pad, c.n + c.pad);
    let a = rng.vec(ar * lda, -1., 1.);
    let b = rng.vec(br * ldb, -1., 1.);
    let tc = |args: &mut Vec<KArg>| args.push(KArg::I32(prec.code()));
    let bias = rng.vec(c.n.max(1), -1., 1.);
    let use_bias = e.is_some_and(|e| e.bias);
    let relu = e.is_some_and(|e| e.relu);
    // beta == 0 must not read C, so poison it; otherwise C carries data.
    let c0 = if c.beta == 0. { vec![POISON; c.m * ldc] } else { rng.vec(c.m * ldc, -1., 1.) };
    let mut cm = c0.clone();
    let tile = if kernel == "gemm_tiled_v4" || kernel == "gemm_tiled_v5" { 128 } else { 64 };
    let grid = (c.n.div_ceil(tile) as u32, c.m.div_ceil(tile) as u32, 1);
    let bias_arg = if use_bias { KArg::slice(&bias) } else { KArg::Ptr(0) };
    if let Some(splits) = kernel.strip_prefix("gemm_splitk_v3/") {
        // v3 has alpha = 1, beta = 0; its partials are poisoned, so a slice left unwritten fails.
        assert!(c.alpha == 1. && c.beta == 0., "v3 computes C = act(op(A) op(B) + bias)");
        let splits: usize = splits.parse().expect("gemm_splitk_v3/<splits>");
        let mut partial = vec![POISON; splits * c.m * c.n];
        let mut args = vec![KArg::slice(&a), KArg::slice(&b), KArg::slice_mut(&mut partial)];
        args.extend(i32s([c.m, c.n, c.k, lda, ldb, c.ta as usize, c.tb as usize, splits]));
        let name = if prec == Precision::Fp32 { "gemm_splitk_v3" } else { "gemm_splitk_tc" };
        if name == "gemm_splitk_tc" {
            tc(&mut args);
        }
        unsafe { emu::launch(name, (grid.0, grid.1, splits as u32), (256, 1, 1), 0, &args) }
            .unwrap_or_else(|e| panic!("{name} launch: {e}"));
        let mut args = vec![KArg::slice_mut(&mut cm), KArg::slice(&partial), bias_arg];
        args.extend(i32s([c.m, c.n, ldc, splits, relu as usize]));
        unsafe { emu::launch("splitk_sum_f32", (3, 1, 1), (256, 1, 1), 0, &args) }.expect("splitk_sum_f32 launch");
    } else {
        let mut args = vec![KArg::slice(&a), KArg::slice(&b), KArg::slice_mut(&mut cm)];
        if e.is_some() {
            args.push(bias_arg);
        }
        args.extend(i32s([c.m, c.n, c.k, lda, ldb, ldc, c.ta as usize, c.tb as usize]));
        args.extend(f32s([c.alpha as f64, c.beta as f64]));
        if e.is_some() {
            args.push(KArg::I32(relu as i32));
        }
        let mut name = kernel;
        if prec != Precision::Fp32 {
            name = match kernel {
                "gemm_tiled_v2" => "gemm_tc",
                "gemm_tiled_v5" => "gemm_tc_v5",
                other => panic!("{other} has no tensor-core twin"),
            };
            tc(&mut args);
        }
        unsafe { emu::launch(name, grid, (256, 1, 1), 0, &args) }.unwrap_or_else(|e| panic!("{name} launch: {e}"));
    }
    let (a, araw) = (precision::rounded(prec, &a).into_owned(), a);
    let (b, braw) = (precision::rounded(prec, &b).into_owned(), b);
    let mut worst_raw = 0f64;
    let tag = format!(
        "{kernel} {prec} {}x{}x{} ta={} tb={} alpha={} beta={} pad={} bias={use_bias} relu={relu}",
        c.m, c.n, c.k, c.ta, c.tb, c.alpha, c.beta, c.pad
    );
    let (mut negative, mut positive) = (0, 0);
    for i in 0..c.m {
        for j in 0..c.n {
            let (mut acc, mut mag, mut raw) = (0f64, 0f64, 0f64);
            for p in 0..c.k {
                let (ia, ib) =
                    (if c.ta { p * lda + i } else { i * lda + p }, if c.tb { j * ldb + p } else { p * ldb + j });
                let (av, bv) = (a[ia] as f64, b[ib] as f64);
                acc += av * bv;
                mag += (av * bv).abs();
                raw += araw[ia] as f64 * braw[ib] as f64;
            }
            let mut want = c.alpha as f64 * acc;
            let mut scale = c.alpha.abs() as f64 * mag;
            if c.beta != 0. {
                want += c.beta as f64 * c0[i * ldc + j] as f64;
                scale += (c.beta as f64 * c0[i * ldc + j] as f64).abs();
            }
            if use_bias {
                want += bias[j] as f64;
                scale += (bias[j] as f64).abs();
            }
            if want < 0.0 {
                negative += 1;
            } else {
                positive += 1;
            }
            let mut want_raw = want + c.alpha as f64 * (raw - acc);
            if relu {
                want = want.max(0.0);
                want_raw = want_raw.max(0.0);
            }
            let got = cm[i * ldc + j] as f64;
            assert!((got - want).abs() <= 1e-5 * scale.max(1e-3), "{tag}: C[{i},{j}] got {got}, want {want}");
            worst_raw = worst_raw.max((got - want_raw).abs() / scale.max(1e-3));
        }
        // Padding columns of C are not part of the output and must be untouched.
        for j in c.n..ldc {
            assert_eq!(cm[i * ldc + j].to_bits(), c0[i * ldc + j].to_bits(), "{tag}: wrote C[{i},{j}] in padding");
        }
    }
    if relu && c.m * c.n >= 100 {
        assert!(negative > 0 && positive > 0, "{tag}: the ReLU case must see both signs");
    }
    worst_raw
}

fn gemm_cases() -> Vec<GemmCase> {
    let case = |(m, n, k), ta, tb, alpha, beta, pad| GemmCase { m, n, k, ta, tb, alpha, beta, pad };
    let mut cases = Vec::new();
    // Ragged (not multiples of the 64x64x16 tile), degenerate, exact, multi-block, and K spanning
    // many slices (v2's register prefetch runs ahead of the shared tiles).
    for mnk in [(67, 45, 33), (1, 1, 1), (64, 64, 16), (130, 70, 50), (5, 129, 17), (70, 66, 161)] {
        for ta in [false, true] {
            for tb in [false, true] {
                cases.push(case(mnk, ta, tb, 1., 0., 0));
            }
        }
    }
    cases.push(case((67, 45, 33), false, true, -0.5, 0.75, 3));
    cases.push(case((33, 70, 65), true, false, 2., 1., 5));
    cases.push(case((3, 2, 0), false, false, 1., 0.5, 0));
    cases
}

#[test]
fn gemm_tiled_v1_parity() {
    let mut rng = Rng(19);
    for c in &gemm_cases() {
        check_gemm("gemm_tiled_v1", c, None, &mut rng, FP32);
    }
}

#[test]
fn gemm_tiled_v2_parity_with_fused_bias_and_relu() {
    let mut rng = Rng(23);
    for c in &gemm_cases() {
        for (bias, relu) in [(false, false), (true, false), (false, true), (true, true)] {
            check_gemm("gemm_tiled_v2", c, Some(Epilogue { bias, relu }), &mut rng, FP32);
        }
    }
}

/// v3 splits the reduction over gridDim.z and sums the slices in a second kernel: right for
/// any number of slices, empty ones too (a split count past K / 16 leaves the last slices
/// without steps), with and without the epilogue, in every transpose case.
#[test]
fn gemm_splitk_v3_parity_for_any_split_count() {
    let mut rng = Rng(31);
    for c in gemm_cases().iter().filter(|c| c.alpha == 1. && c.beta == 0.) {
        for splits in [1, 2, 3, 7, 13] {
            for (bias, relu) in [(false, false), (true, true)] {
                check_gemm(&format!("gemm_splitk_v3/{splits}"), c, Some(Epilogue { bias, relu }), &mut rng, FP32);
            }
        }
    }
    // Padded leading dimensions, LeNet fc1's transposes (x · wᵀ) and a reduction of many slices.
    let c = GemmCase { m: 9, n: 84, k: 1000, ta: false, tb: true, alpha: 1., beta: 0., pad: 3 };
    check_gemm("gemm_splitk_v3/4", &c, Some(Epilogue { bias: true, relu: true }), &mut rng, FP32);
}

/// gemm_tc, gemm_tc_v5 and gemm_splitk_tc in every precision, on every case and epilogue, against the
/// product of the rounded operands; the rounding must show against the unrounded product where
/// the reduction is long enough (TF32 and BF16), and must not for 3xTF32.
#[test]
fn tensor_core_gemms_match_the_product_of_their_rounded_operands() {
    let mut rng = Rng(37);
    for prec in [Precision::Tf32, Precision::Tf32x3, Precision::Bf16] {
        let mut worst = 0f64;
        for c in &gemm_cases() {
            for (bias, relu) in [(false, false), (true, true)] {
                let e = Some(Epilogue { bias, relu });
                worst = worst.max(check_gemm("gemm_tiled_v2", c, e, &mut rng, prec));
                worst = worst.max(check_gemm("gemm_tiled_v5", c, e, &mut rng, prec));
                if c.alpha == 1. && c.beta == 0. {
                    worst = worst.max(check_gemm("gemm_splitk_v3/3", c, e, &mut rng, prec));
                }
            }
        }
        // v5's 128 x 128 tile: both warp rows, every warp column, two blocks each way.
        let big = GemmCase { m: 150, n: 140, k: 40, ta: true, tb: false, alpha: 1., beta: 0., pad: 1 };
        worst =
            worst.max(check_gemm("gemm_tiled_v5", &big, Some(Epilogue { bias: true, relu: false }), &mut rng, prec));
        match prec {
            Precision::Tf32 => assert!(worst > 1e-4, "TF32 rounding not visible: {worst:e}"),
            Precision::Bf16 => assert!(worst > 1e-3, "BF16 rounding not visible: {worst:e}"),
            _ => assert!(worst < 1e-5, "3xTF32 strays from fp32 by {worst:e}"),
        }
    }
}

/// One slice is v2's main loop and epilogue: the same bits. More slices give bits that depend
/// only on the shape and the slice count, not on the order blocks run in.
#[test]
fn gemm_splitk_v3_is_v2_with_one_slice_and_deterministic() {
    let mut rng = Rng(37);
    let (m, n, k) = (70, 66, 300);
    let (a, b, bias) = (rng.vec(m * k, -1., 1.), rng.vec(k * n, -1., 1.), rng.vec(n, -1., 1.));
    let v2 = {
        let mut c = vec![POISON; m * n];
        let mut args = vec![KArg::slice(&a), KArg::slice(&b), KArg::slice_mut(&mut c), KArg::slice(&bias)];
        args.extend(i32s([m, n, k, k, n, n, 0, 0]));
        args.extend(f32s([1., 0.]));
        args.push(KArg::I32(1));
        unsafe { emu::launch("gemm_tiled_v2", (2, 2, 1), (256, 1, 1), 0, &args) }.expect("v2 launch");
        c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let v3 = |splits: usize| {
        let mut partial = vec![POISON; splits * m * n];
        let mut args = vec![KArg::slice(&a), KArg::slice(&b), KArg::slice_mut(&mut partial)];
        args.extend(i32s([m, n, k, k, n, 0, 0, splits]));
        unsafe { emu::launch("gemm_splitk_v3", (2, 2, splits as u32), (256, 1, 1), 0, &args) }.expect("v3 launch");
        let mut c = vec![POISON; m * n];
        let mut args = vec![KArg::slice_mut(&mut c), KArg::slice(&partial), KArg::slice(&bias)];
        args.extend(i32s([m, n, n, splits, 1]));
        unsafe { emu::launch("splitk_sum_f32", (5, 1, 1), (256, 1, 1), 0, &args) }.expect("sum launch");
        c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(v3(1), v2, "one slice differs from v2");
    let five = v3(5);
    assert_ne!(five, v2, "five slices sum in another order: some bits should differ");
    for _ in 0..3 {
        assert_eq!(v3(5), five, "split-K bits changed between runs");
    }
}

/// A split count that disagrees with the grid is a launch error, not a silent wrong sum.
#[test]
fn gemm_splitk_v3_checks_its_grid() {
    let (a, b, mut p) = (vec![1f32; 64], vec![1f32; 64], vec![0f32; 3 * 64]);
    let mut args = vec![KArg::slice(&a), KArg::slice(&b), KArg::slice_mut(&mut p)];
    args.extend(i32s([8, 8, 8, 8, 8, 0, 0, 3]));
    assert!(unsafe { emu::launch("gemm_splitk_v3", (1, 1, 2), (256, 1, 1), 0, &args) }.is_err());
}

/// v2 adds only a prefetch and an epilogue: with neither bias nor activation its output is v1's,
/// bit for bit (same slices, same FMA order).
#[test]
fn gemm_tiled_v2_without_epilogue_equals_v1_bitwise() {
    let mut rng = Rng(29);
    let (m, n, k) = (70, 66, 161);
    let (a, b) = (rng.vec(m * k, -1., 1.), rng.vec(k * n, -1., 1.));
    let run = |kernel: &str| {
        let mut c = vec![POISON; m * n];
        let mut args = vec![KArg::slice(&a), KArg::slice(&b), KArg::slice_mut(&mut c)];
        let epilogue = kernel != "gemm_tiled_v1";
        if epilogue {
            args.push(KArg::Ptr(0));
        }
        args.extend(i32s([m, n, k, k, n, n, 0, 0]));
        args.extend(f32s([1., 0.]));
        if epilogue {
            args.push(KArg::I32(0));
        }
        let tile = if kernel == "gemm_tiled_v4" || kernel == "gemm_tiled_v5" { 128 } else { 64 };
        let grid = (n.div_ceil(tile) as u32, m.div_ceil(tile) as u32, 1);
        unsafe { emu::launch(kernel, grid, (256, 1, 1), 0, &args) }.expect("gemm launch");
        c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(run("gemm_tiled_v1"), run("gemm_tiled_v2"));
    // v4's 128 x 128 tiles sum each output in the same order: the same bits; v5 only fills
    // the same tiles by cp.async.
    assert_eq!(run("gemm_tiled_v1"), run("gemm_tiled_v4"));
    assert_eq!(run("gemm_tiled_v1"), run("gemm_tiled_v5"));
}

#[test]
fn gemm_wrong_block_size_is_an_error() {
    let (a, b, mut c) = (vec![1f32; 4], vec![1f32; 4], vec![0f32; 4]);
    let mut args = vec![KArg::slice(&a), KArg::slice(&b), KArg::slice_mut(&mut c)];
    args.extend(i32s([2, 2, 2, 2, 2, 2, 0, 0]));
    args.extend(f32s([1., 0.]));
    let r = unsafe { emu::launch("gemm_tiled_v1", (1, 1, 1), (128, 1, 1), 0, &args) };
    let err = r.unwrap_err();
    assert!(err.to_string().contains("__trap"), "{err}");
}

#[test]
fn bad_launches_are_errors_not_crashes() {
    let mut y = vec![0f32; 8];
    let p = KArg::slice_mut(&mut y);
    let ok = [p, KArg::F32(1.), KArg::I64(8)];
    let arg_cases: [(&str, &[KArg], &str); 6] = [
        ("no_such_kernel", &ok, "unknown kernel"),
        ("fill_f32", &[p, KArg::F32(1.)], "expected 3 arguments, got 2"),
        ("fill_f32", &[p, KArg::F32(1.), KArg::I64(8), KArg::I32(0)], "expected 3"),
        ("fill_f32", &[p, KArg::F32(1.), KArg::I32(8)], "argument 2 `n`"),
        ("fill_f32", &[KArg::F32(0.), KArg::F32(1.), KArg::I64(8)], "`float*`"),
        ("fill_f32", &[p, KArg::Ptr(0), KArg::I64(8)], "`float`"),
    ];
    for (name, args, needle) in arg_cases {
        let e = unsafe { emu::launch(name, (1, 1, 1), (32, 1, 1), 0, args) };
        let e = e.expect_err(&format!("{name} {args:?} should fail")).to_string();
        assert!(e.contains(needle), "error {e:?} should mention {needle:?}");
    }
    type Dims = ((u32, u32, u32), (u32, u32, u32), u32);
    let dim_cases: [(Dims, &str); 5] = [
        (((0, 1, 1), (32, 1, 1), 0), "grid"),
        (((1, 1, 1), (0, 1, 1), 0), "block"),
        (((1, 1, 1), (64, 32, 1), 0), "2048 threads"),
        (((1, 70_000, 1), (32, 1, 1), 0), "grid"),
        (((1, 1, 1), (32, 1, 1), 1 << 20), "shared memory"),
    ];
    for ((grid, block, shmem), needle) in dim_cases {
        let e = unsafe { emu::launch("fill_f32", grid, block, shmem, &ok) };
        let e = e.expect_err(&format!("{grid:?} {block:?} {shmem} should fail")).to_string();
        assert!(e.contains(needle), "error {e:?} should mention {needle:?}");
    }
    // Nothing ran: the output is untouched.
    assert!(y.iter().all(|&v| v == 0.));
}

#[test]
fn signatures_are_exposed() {
    let k = emu::find_kernel("gemm_tiled_v1").expect("gemm registered");
    assert_eq!(k.module, "gemm");
    assert_eq!(k.params.len(), 13);
    assert_eq!(k.to_string().split('(').next(), Some("gemm_tiled_v1"));
    assert!(emu::kernels().len() >= 13);
}

/// With nvcc present, every kernel exists in its PTX module and the PTX
/// targets an ISA the CUDA 13.0 driver accepts.
#[test]
fn ptx_modules_match_emulated_kernels() {
    if !kernels::HAVE_PTX {
        eprintln!("no nvcc at build time: PTX checks skipped");
        return;
    }
    for k in emu::kernels() {
        let ptx = kernels::ptx_module(k.module).unwrap_or_else(|| panic!("no PTX module {}", k.module));
        assert!(ptx.contains(&format!(".entry {}(", k.name)), "{} missing from {}.ptx", k.name, k.module);
        assert_eq!(kernels::module_of(k.name), Some(k.module));
    }
    for (name, ptx) in kernels::PTX_MODULES {
        let v = ptx.lines().find_map(|l| l.trim().strip_prefix(".version ")).expect(".version");
        let (a, b) = v.trim().split_once('.').expect("x.y");
        let v = (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap());
        assert!(v <= (9, 0), "{name}.ptx has PTX ISA {v:?} > 9.0");
        assert!(ptx.contains(".target sm_90"), "{name}.ptx target");
    }
}

/// Every embedded module has an sm_90 cubin beside its PTX (an ELF image, loaded on H100/H200
/// without JIT), and the source hash `rotvar info` reports is a sha256.
#[test]
fn every_ptx_module_has_an_sm90_cubin() {
    if !kernels::HAVE_PTX {
        eprintln!("no GPU kernels in this build: cubin checks skipped");
        return;
    }
    assert_eq!(kernels::CUBIN_CC, (9, 0));
    let ptx: Vec<&str> = kernels::PTX_MODULES.iter().map(|(n, _)| *n).collect();
    let cubin: Vec<&str> = kernels::CUBIN_MODULES.iter().map(|(n, _)| *n).collect();
    assert_eq!(ptx, cubin);
    for (name, image) in kernels::CUBIN_MODULES {
        assert!(image.starts_with(b"\x7fELF"), "{name}: not an ELF image");
        for k in emu::kernels().iter().filter(|k| k.module == *name) {
            let sym = format!("{}\0", k.name);
            assert!(
                image.windows(sym.len()).any(|w| w == sym.as_bytes()),
                "{} missing from {name}.sm_90.cubin",
                k.name
            );
        }
    }
    assert_eq!(kernels::SOURCE_SHA256.len(), 64);
    assert!(kernels::SOURCE_SHA256.chars().all(|c| c.is_ascii_hexdigit()));
}

/// v4 (128 × 128 tiles, conv.cuh's main loop with the GEMM's loaders) on every case: all four
/// transposes, ragged edges, leading-dimension padding, alpha/beta, the fused bias and ReLU.
#[test]
fn gemm_tiled_v4_parity() {
    let mut rng = Rng(31);
    for c in &gemm_cases() {
        check_gemm("gemm_tiled_v4", c, Some(Epilogue { bias: false, relu: false }), &mut rng, FP32);
        if c.alpha == 1. && c.beta == 0. {
            check_gemm("gemm_tiled_v4", c, Some(Epilogue { bias: true, relu: true }), &mut rng, FP32);
        }
    }
    // Several 128-row blocks in both directions.
    let big = GemmCase { m: 300, n: 260, k: 40, ta: true, tb: false, alpha: 1., beta: 0., pad: 2 };
    check_gemm("gemm_tiled_v4", &big, Some(Epilogue { bias: true, relu: false }), &mut rng, FP32);
}

/// v5 (v4 with cp.async double buffering) on v4's cases, and bit for bit v4's output on every
/// transpose combination, with aligned leading dimensions (16-byte copies) and odd ones (4-byte
/// copies), ragged edges included.
#[test]
fn gemm_tiled_v5_parity_and_v4_bits() {
    let mut rng = Rng(37);
    for c in &gemm_cases() {
        check_gemm("gemm_tiled_v5", c, Some(Epilogue { bias: false, relu: false }), &mut rng, FP32);
    }
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for pad in [0, 1, 4] {
            let (m, n, k) = (131, 135, 37); // pad 1 makes lda (transposed A) and ldb (B) multiples of 4
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let (lda, ldb) = (ac + pad, bc + pad);
            let (a, b) = (rng.vec(ar * lda, -1., 1.), rng.vec(br * ldb, -1., 1.));
            let bias = rng.vec(n, -1., 1.);
            let run = |kernel: &str| {
                let mut c = vec![POISON; m * n];
                let mut args = vec![KArg::slice(&a), KArg::slice(&b), KArg::slice_mut(&mut c), KArg::slice(&bias)];
                args.extend(i32s([m, n, k, lda, ldb, n, ta as usize, tb as usize]));
                args.extend(f32s([1., 0.]));
                args.push(KArg::I32(1));
                let grid = (n.div_ceil(128) as u32, m.div_ceil(128) as u32, 1);
                unsafe { emu::launch(kernel, grid, (256, 1, 1), 0, &args) }.expect("gemm launch");
                c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let v4 = run("gemm_tiled_v4");
            assert!(v4.iter().all(|&b| !f32::from_bits(b).is_nan()), "ta {ta} tb {tb} pad {pad}: v4 left NaN");
            assert!(v4 == run("gemm_tiled_v5"), "ta {ta} tb {tb} pad {pad}: v5 differs from v4");
        }
    }
}
