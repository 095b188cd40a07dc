//! Every op's backward against central finite differences.
//!
//! For an op y = f(inputs), the scalar L = Σ y ⊙ R with a fixed random R is built on the tape
//! as linear(reshape(y, [1, numel]), R[1, numel]) (a [1, 1] tensor, reshaped to [1]); its
//! analytic gradient comes from `Tape::backward`. The finite differences evaluate f without a
//! tape and compute L on the host in f64. Each tracked input's gradient must agree per tensor
//! (‖g_a − g_fd‖ / max(‖g_a‖, ‖g_fd‖) below a relative tolerance) and per element (max
//! |g_a − g_fd| below a fraction of the gradient's largest magnitude).

use anyhow::{ensure, Context, Result};
use rotvar::autograd::{is_recording, Tape};
use rotvar::backend::cpu::{dropout_keep_scale, CpuBackend};
use rotvar::backend::{BackendRef, PoolKind};
use rotvar::models::{InputSpec, Model};
use rotvar::nn::{BasicBlock, Forward, Layer, Linear, Sequential};
use rotvar::ops::{self, BatchNormState};
use rotvar::rng::Rng;
use rotvar::tensor::Tensor;

/// The CPU backend with im2col convolutions, in every test of this binary. Finite differences
/// of an f32 forward pass resolve a gradient only if the pass is smooth to about 1e-7 in the
/// parameters; Winograd's rounding (about 1e-5 of a layer's largest output, and not smooth in
/// the weights) drowns the differences of a whole model. Winograd's gradients are held to
/// im2col's, to 1e-3, in tests/cpu_conv.rs and in `conv.rs`'s unit tests.
fn cpu() -> BackendRef {
    rotvar::backend::cpu::conv::choose_algo(None);
    CpuBackend::shared()
}

fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| scale * rng.normal()).collect()
}

/// Random values with |v| ≥ margin: away from the kinks of relu and elu at 0.
fn away_from_zero(rng: &mut Rng, n: usize, margin: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = rng.uniform(margin, 2.0);
            if rng.next_f32() < 0.5 {
                -v
            } else {
                v
            }
        })
        .collect()
}

/// Distinct values at least `gap` apart in a random order: max pooling has no ties, and a
/// perturbation smaller than gap/2 never changes which element is the maximum.
fn distinct(rng: &mut Rng, n: usize, gap: f32) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * gap).collect();
    rng.shuffle(&mut v);
    v
}

fn param(b: &BackendRef, shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::parameter(b, shape, data).unwrap()
}

/// L = Σ y ⊙ r on the tape, as a one-element tensor.
fn weighted_sum(y: &Tensor, r: &[f32]) -> Result<Tensor> {
    let n = y.numel();
    let rt = Tensor::from_vec(y.backend(), &[1, n], r)?;
    let l = ops::linear(&ops::reshape(y, &[1, n])?, &rt, None)?;
    ops::reshape(&l, &[1])
}

/// L = Σ y ⊙ r on the host, in f64.
fn host_loss(y: &Tensor, r: &[f32]) -> Result<f64> {
    let v = y.to_vec()?;
    ensure!(v.len() == r.len(), "output size changed between evaluations");
    Ok(v.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum())
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Compare an analytic gradient with a finite-difference one.
fn compare(what: &str, ga: &[f32], gfd: &[f64], rel_tol: f64, elem_tol: f64) {
    let ga: Vec<f64> = ga.iter().map(|&v| v as f64).collect();
    assert!(ga.iter().all(|v| v.is_finite()), "{what}: analytic gradient has non-finite values");
    let diff: Vec<f64> = ga.iter().zip(gfd).map(|(a, b)| a - b).collect();
    let scale = norm(&ga).max(norm(gfd)).max(1e-6);
    let rel = norm(&diff) / scale;
    let gmax = ga.iter().chain(gfd).fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
    let (imax, dmax) = diff
        .iter()
        .enumerate()
        .fold((0, 0.0f64), |(bi, bm), (i, d)| if d.abs() > bm { (i, d.abs()) } else { (bi, bm) });
    assert!(
        rel < rel_tol,
        "{what}: relative error {rel:.3e} ≥ {rel_tol:e} (‖g‖ = {scale:.4e}); worst element {imax}: analytic {}, numeric {}",
        ga[imax], gfd[imax]
    );
    assert!(
        dmax < elem_tol * gmax,
        "{what}: element {imax}: analytic {}, numeric {} (|diff| {dmax:.3e} ≥ {elem_tol:e}·max|g| = {:.3e})",
        ga[imax],
        gfd[imax],
        elem_tol * gmax
    );
    // The gradient is not trivially zero (that would make the comparison vacuous).
    assert!(norm(&ga) > 1e-4, "{what}: analytic gradient is (nearly) zero: the check would be vacuous");
}

struct Tol {
    eps: f32,
    rel: f64,
    elem: f64,
}

const SMOOTH: Tol = Tol { eps: 1e-2, rel: 1e-2, elem: 1e-2 };

/// Check the gradient of every tensor in `inputs` (all tracked) for the op `f`, which reads
/// them (and is re-run after each perturbation). Returns the analytic gradients.
fn gradcheck(
    name: &str,
    inputs: &[(&str, &Tensor)],
    seed: u64,
    tol: &Tol,
    f: impl Fn() -> Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    for (n, t) in inputs {
        assert!(t.is_tracked(), "{name}: input {n} must be a tracked parameter");
    }
    // Without a tape nothing is tracked.
    let y0 = f()?;
    assert!(!y0.is_tracked(), "{name}: output tracked although no tape records");
    let mut rng = Rng::new(seed);
    let r = randn(&mut rng, y0.numel(), 1.0);

    let tape = Tape::start()?;
    let y = f()?;
    assert!(y.is_tracked(), "{name}: output of tracked inputs under a tape is not tracked");
    assert_eq!(y.shape(), y0.shape(), "{name}: shape differs with a tape");
    assert_eq!(y.to_vec()?, y0.to_vec()?, "{name}: forward differs with a tape");
    let l = weighted_sum(&y, &r)?;
    let grads = tape.backward(&l)?;
    assert!(!is_recording(), "{name}: the tape still records after backward");
    // Only the tracked leaves keep a gradient; every intermediate one was consumed.
    assert_eq!(grads.len(), inputs.len(), "{name}: gradients held after backward (expected one per input)");

    let mut out = Vec::new();
    for (iname, t) in inputs {
        let what = format!("{name}: d/d{iname}");
        let g = grads.get(t).with_context(|| format!("{what}: no gradient"))?;
        assert_eq!(g.shape(), t.shape(), "{what}: gradient shape");
        let ga = g.to_vec()?;
        let mut data = t.to_vec()?;
        let mut gfd = vec![0.0f64; data.len()];
        for i in 0..data.len() {
            let orig = data[i];
            let (hp, hm) = (orig + tol.eps, orig - tol.eps);
            data[i] = hp;
            t.copy_from_host(&data)?;
            let lp = host_loss(&f()?, &r)?;
            data[i] = hm;
            t.copy_from_host(&data)?;
            let lm = host_loss(&f()?, &r)?;
            data[i] = orig;
            gfd[i] = (lp - lm) / (hp as f64 - hm as f64);
        }
        t.copy_from_host(&data)?;
        compare(&what, &ga, &gfd, tol.rel, tol.elem);
        out.push(ga);
    }
    Ok(out)
}

// --- convolution and linear ------------------------------------------------------------------

#[test]
fn conv2d_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(100);
    // (n, c_in, h, w, c_out, (kh, kw), stride, pad, bias)
    let cases: &[(usize, usize, usize, usize, usize, (usize, usize), usize, usize, bool)] = &[
        (2, 2, 7, 9, 3, (3, 3), 1, 1, true),
        (2, 3, 7, 9, 4, (3, 3), 2, 1, false),
        (2, 2, 7, 9, 3, (5, 5), 1, 2, true),
        (3, 2, 9, 7, 3, (5, 5), 2, 2, false),
        (2, 3, 6, 5, 4, (1, 1), 1, 0, true), // pointwise path
        (2, 2, 7, 9, 3, (1, 1), 2, 1, true), // 1×1 strided and padded: im2col path
        (2, 2, 5, 4, 3, (1, 1), 1, 1, true), // 1×1 padded: im2col path, bias-only border
        (2, 2, 7, 9, 3, (3, 3), 1, 0, true),
        (2, 2, 8, 7, 3, (3, 2), 2, 1, true),  // non-square kernel
        (10, 2, 5, 6, 3, (3, 3), 2, 0, true), // 10 images: backward-weight chunks of 8
        (11, 2, 4, 3, 5, (1, 1), 1, 0, true), // 11 images, pointwise
    ];
    for (ci, &(n, c_in, h, w, c_out, (kh, kw), s, p, with_bias)) in cases.iter().enumerate() {
        let x = param(&b, &[n, c_in, h, w], &randn(&mut rng, n * c_in * h * w, 1.0));
        let wt = param(&b, &[c_out, c_in, kh, kw], &randn(&mut rng, c_out * c_in * kh * kw, 0.5));
        let bias = param(&b, &[c_out], &randn(&mut rng, c_out, 1.0));
        let name = format!("conv2d n={n} c_in={c_in} {h}x{w} c_out={c_out} k={kh}x{kw} s={s} p={p} bias={with_bias}");
        let mut inputs = vec![("x", &x), ("weight", &wt)];
        if with_bias {
            inputs.push(("bias", &bias));
        }
        gradcheck(&name, &inputs, 1000 + ci as u64, &SMOOTH, || {
            ops::conv2d(&x, &wt, with_bias.then_some(&bias), s, p)
        })?;
    }
    Ok(())
}

#[test]
fn conv2d_gradients_thin_input() -> Result<()> {
    // A one-pixel-wide input under a 5×5 kernel with padding 2 (valid: the padded width is 5).
    let b = cpu();
    let mut rng = Rng::new(99);
    let x = param(&b, &[2, 2, 4, 1], &randn(&mut rng, 16, 1.0));
    let w = param(&b, &[3, 2, 5, 5], &randn(&mut rng, 150, 0.5));
    let bias = param(&b, &[3], &randn(&mut rng, 3, 1.0));
    gradcheck(
        "conv2d 4x1 input, 5x5 kernel, pad 2",
        &[("x", &x), ("weight", &w), ("bias", &bias)],
        999,
        &SMOOTH,
        || ops::conv2d(&x, &w, Some(&bias), 1, 2),
    )?;
    Ok(())
}

#[test]
fn conv2d_gradient_of_weight_only_when_input_is_data() -> Result<()> {
    // The first layer's input is untracked: only weight and bias get gradients.
    let b = cpu();
    let mut rng = Rng::new(101);
    let x = Tensor::from_vec(&b, &[9, 2, 5, 5], &randn(&mut rng, 9 * 50, 1.0))?;
    let w = param(&b, &[4, 2, 3, 3], &randn(&mut rng, 72, 0.5));
    let bias = param(&b, &[4], &randn(&mut rng, 4, 1.0));
    gradcheck("conv2d, data input", &[("weight", &w), ("bias", &bias)], 1011, &SMOOTH, || {
        ops::conv2d(&x, &w, Some(&bias), 1, 1)
    })?;
    Ok(())
}

#[test]
fn linear_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(102);
    // (n rows, k in, m out, bias): 40 rows and 35 outputs cross the 32-row chunks.
    for (ci, &(n, k, m, with_bias)) in
        [(40usize, 7usize, 35usize, true), (40, 6, 35, false), (3, 5, 4, true), (3, 5, 4, false), (1, 3, 1, true)]
            .iter()
            .enumerate()
    {
        let x = param(&b, &[n, k], &randn(&mut rng, n * k, 1.0));
        let w = param(&b, &[m, k], &randn(&mut rng, m * k, 0.5));
        let bias = param(&b, &[m], &randn(&mut rng, m, 1.0));
        let mut inputs = vec![("x", &x), ("weight", &w)];
        if with_bias {
            inputs.push(("bias", &bias));
        }
        gradcheck(&format!("linear n={n} k={k} m={m} bias={with_bias}"), &inputs, 1020 + ci as u64, &SMOOTH, || {
            ops::linear(&x, &w, with_bias.then_some(&bias))
        })?;
    }
    Ok(())
}

/// conv2d_act / linear_act with the fused ReLU. Biases of ±3 against small weights keep every
/// pre-activation far from the kink (so central differences are exact there), with half the
/// channels on each side: the identity side and the zero side of the ReLU both get checked.
/// Element-wise mixing at kinks is covered by tests/models.rs (fused = unfused, bit for bit).
#[test]
fn fused_relu_conv_and_linear_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(106);
    let signs = |m: usize| (0..m).map(|i| if i % 2 == 0 { 3.0 } else { -3.0 }).collect::<Vec<f32>>();
    let x = param(&b, &[2, 2, 6, 7], &randn(&mut rng, 168, 1.0));
    let w = param(&b, &[4, 2, 3, 3], &randn(&mut rng, 72, 0.1));
    let bias = param(&b, &[4], &signs(4));
    let inputs = [("x", &x), ("weight", &w), ("bias", &bias)];
    let relu = rotvar::backend::Activation::Relu;
    let g = gradcheck("conv2d+relu", &inputs, 1060, &SMOOTH, || ops::conv2d_act(&x, &w, Some(&bias), 1, 1, relu))?;
    // Channels 1 and 3 are all below zero: no gradient reaches their weights or bias.
    assert!(g[2][1] == 0.0 && g[2][3] == 0.0 && g[2][0] != 0.0 && g[2][2] != 0.0, "bias gradient {:?}", g[2]);
    let y = ops::conv2d(&x, &w, Some(&bias), 1, 1)?.to_vec()?;
    let margin = y.iter().fold(f32::INFINITY, |m, v| m.min(v.abs()));
    assert!(margin > 0.5, "pre-activations within {margin} of the kink");

    let x = param(&b, &[5, 7], &randn(&mut rng, 35, 1.0));
    let w = param(&b, &[6, 7], &randn(&mut rng, 42, 0.1));
    let bias = param(&b, &[6], &signs(6));
    let inputs = [("x", &x), ("weight", &w), ("bias", &bias)];
    let g = gradcheck("linear+relu", &inputs, 1061, &SMOOTH, || ops::linear_act(&x, &w, Some(&bias), relu))?;
    assert!(g[2].iter().enumerate().all(|(i, &v)| (v == 0.0) == (i % 2 == 1)), "bias gradient {:?}", g[2]);
    Ok(())
}

// --- pooling ---------------------------------------------------------------------------------

#[test]
fn max_pool_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(103);
    // Values 0.05 apart and a perturbation of 0.01: no maximum ever changes.
    let tol = Tol { eps: 1e-2, ..SMOOTH };
    for (ci, &(shape, k, s, p)) in
        [([2usize, 3usize, 6usize, 7usize], 2usize, 2usize, 0usize), ([2, 2, 7, 9], 3, 2, 1), ([1, 2, 5, 5], 3, 1, 1)]
            .iter()
            .enumerate()
    {
        let len = shape.iter().product();
        let x = param(&b, &shape, &distinct(&mut rng, len, 0.05));
        gradcheck(&format!("max_pool2d {shape:?} k={k} s={s} p={p}"), &[("x", &x)], 1030 + ci as u64, &tol, || {
            ops::max_pool2d(&x, k, s, p)
        })?;
        gradcheck(&format!("pool2d(Max) {shape:?} k={k} s={s} p={p}"), &[("x", &x)], 1035 + ci as u64, &tol, || {
            ops::pool2d(PoolKind::Max, &x, k, s, p)
        })?;
    }
    Ok(())
}

#[test]
fn avg_pool_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(104);
    for (ci, &(shape, k, s, p)) in [
        ([2usize, 3usize, 6usize, 7usize], 2usize, 2usize, 0usize),
        ([2, 2, 7, 9], 3, 2, 1),
        ([1, 2, 5, 5], 3, 1, 1),
        ([2, 1, 6, 6], 4, 2, 2),
    ]
    .iter()
    .enumerate()
    {
        let len = shape.iter().product();
        let x = param(&b, &shape, &randn(&mut rng, len, 1.0));
        gradcheck(&format!("avg_pool2d {shape:?} k={k} s={s} p={p}"), &[("x", &x)], 1040 + ci as u64, &SMOOTH, || {
            ops::avg_pool2d(&x, k, s, p)
        })?;
    }
    let x = param(&b, &[3, 4, 5, 5], &randn(&mut rng, 300, 1.0));
    let g = gradcheck("global_avg_pool", &[("x", &x)], 1049, &SMOOTH, || ops::global_avg_pool(&x))?;
    assert_eq!(ops::global_avg_pool(&x)?.shape(), [3, 4]);
    // Each input's gradient is its channel's weight divided by the 25 positions.
    assert!(g[0].iter().all(|v| v.is_finite()));
    Ok(())
}

// --- activations -----------------------------------------------------------------------------

#[test]
fn relu_and_elu_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(105);
    // Inputs at least 0.05 from 0 and a perturbation of 0.01: no kink is crossed.
    let x = param(&b, &[4, 3, 5, 5], &away_from_zero(&mut rng, 300, 0.05));
    let g = gradcheck("relu", &[("x", &x)], 1050, &SMOOTH, || ops::relu(&x))?;
    let xv = x.to_vec()?;
    assert!(g[0].iter().zip(&xv).all(|(g, x)| *x > 0.0 || *g == 0.0), "relu: gradient leaks through negative inputs");
    for (i, alpha) in [1.0f32, 0.7].into_iter().enumerate() {
        gradcheck(&format!("elu alpha={alpha}"), &[("x", &x)], 1051 + i as u64, &SMOOTH, || ops::elu(&x, alpha))?;
    }
    Ok(())
}

// --- batch norm ------------------------------------------------------------------------------

#[test]
fn batch_norm_training_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(106);
    for (ci, shape) in [vec![4usize, 3, 5, 5], vec![6, 5], vec![3, 2, 3, 4]].into_iter().enumerate() {
        let c = shape[1];
        let len: usize = shape.iter().product();
        let x = param(&b, &shape, &randn(&mut rng, len, 1.5).iter().map(|v| v + 0.7).collect::<Vec<_>>());
        let gamma = param(&b, &[c], &(0..c).map(|_| rng.uniform(0.5, 1.5)).collect::<Vec<_>>());
        let beta = param(&b, &[c], &randn(&mut rng, c, 1.0));
        let (rm, rv) = (Tensor::zeros(&b, &[c])?, Tensor::full(&b, &[c], 1.0)?);
        let state = BatchNormState {
            gamma: &gamma,
            beta: &beta,
            running_mean: &rm,
            running_var: &rv,
            momentum: 0.1,
            eps: 1e-5,
        };
        gradcheck(
            &format!("batch_norm (train) {shape:?}"),
            &[("x", &x), ("gamma", &gamma), ("beta", &beta)],
            1060 + ci as u64,
            &Tol { eps: 5e-3, ..SMOOTH },
            || ops::batch_norm(&x, &state, true),
        )?;
        // Eval mode records nothing (documented): the output is never tracked.
        let tape = Tape::start()?;
        let y = ops::batch_norm(&x, &state, false)?;
        assert!(!y.is_tracked(), "batch_norm eval: output tracked");
        drop(tape);
    }
    Ok(())
}

// --- dropout ---------------------------------------------------------------------------------

#[test]
fn dropout_gradient_is_the_mask() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(107);
    let (p, seed) = (0.3f32, 0xDEAD_BEEFu64);
    let keep = 1.0 / (1.0 - p);
    let x = param(&b, &[4, 6, 5, 5], &randn(&mut rng, 600, 1.0));
    // The mask is deterministic for a fixed seed, so finite differences apply.
    let g = gradcheck("dropout", &[("x", &x)], 1070, &SMOOTH, || ops::dropout(&x, p, true, seed))?;

    // The mask itself: dropout of ones, untracked.
    let ones = Tensor::full(&b, &[600], 1.0)?;
    let mask = ops::dropout(&ones, p, true, seed)?.to_vec()?;
    assert!(mask.iter().all(|&m| m == 0.0 || m == keep), "dropout: mask values other than 0 and 1/(1-p)");
    let y = ops::dropout(&x, p, true, seed)?.to_vec()?;
    let xv = x.to_vec()?;
    for i in 0..600 {
        assert_eq!(y[i], xv[i] * mask[i], "dropout: y ≠ x·mask at {i}");
    }
    // backward = mask · dy exactly, with dy = R (the weights of the weighted sum).
    let tape = Tape::start()?;
    let r = randn(&mut Rng::new(1070), 600, 1.0);
    let yt = ops::dropout(&x, p, true, seed)?;
    let grads = tape.backward(&weighted_sum(&yt, &r)?)?;
    let gx = grads.get(&x).context("dropout: no gradient")?.to_vec()?;
    for i in 0..600 {
        assert_eq!(gx[i], mask[i] * r[i], "dropout: dx ≠ mask·dy at {i}");
    }
    assert_eq!(gx, g[0]);

    // A large tensor (several parallel chunks): the mask is the documented pure function of
    // (seed, index), and the fraction dropped is p.
    let n = 300_000;
    let big = Tensor::full(&b, &[n], 1.0)?;
    let m = ops::dropout(&big, p, true, seed)?.to_vec()?;
    for (i, &v) in m.iter().enumerate() {
        assert_eq!(v, dropout_keep_scale(seed, i as u64, p), "dropout: mask at {i} is not a function of (seed, index)");
    }
    let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
    let sd = (p as f64 * (1.0 - p as f64) / n as f64).sqrt();
    assert!((dropped - p as f64).abs() < 5.0 * sd, "dropout: dropped {dropped}, expected {p} ± {sd:.1e}");
    // Another seed, another mask; the same seed, the same mask.
    let m2 = ops::dropout(&big, p, true, seed + 1)?.to_vec()?;
    assert!(m.iter().zip(&m2).filter(|(a, b)| a != b).count() > n / 10, "dropout: seed does not change the mask");
    assert_eq!(ops::dropout(&big, p, true, seed)?.to_vec()?, m);
    // Eval mode and p = 0 are the identity.
    assert_eq!(ops::dropout(&x, p, false, seed)?.to_vec()?, xv);
    assert_eq!(ops::dropout(&x, 0.0, true, seed)?.to_vec()?, xv);
    assert!(ops::dropout(&x, 1.0, true, seed).is_err());
    Ok(())
}

// --- shapes, elementwise, losses, reductions -------------------------------------------------

#[test]
fn reshape_flatten_add_scale_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(108);
    let x = param(&b, &[2, 3, 4, 5], &randn(&mut rng, 120, 1.0));
    let y = param(&b, &[2, 3, 4, 5], &randn(&mut rng, 120, 1.0));
    gradcheck("flatten", &[("x", &x)], 1080, &SMOOTH, || ops::flatten(&x))?;
    assert_eq!(ops::flatten(&x)?.shape(), [2, 60]);
    gradcheck("reshape", &[("x", &x)], 1081, &SMOOTH, || ops::reshape(&x, &[6, 20]))?;
    assert!(ops::reshape(&x, &[7, 20]).is_err());
    gradcheck("add", &[("a", &x), ("b", &y)], 1082, &SMOOTH, || ops::add(&x, &y))?;
    // The same tensor twice: both contributions accumulate (gradient 2·R).
    let g = gradcheck("add(x, x)", &[("x", &x)], 1083, &SMOOTH, || ops::add(&x, &x))?;
    let r = randn(&mut Rng::new(1083), 120, 1.0);
    assert!(g[0].iter().zip(&r).all(|(g, r)| *g == 2.0 * r), "add(x, x): gradient is not exactly 2·dy");
    gradcheck("scale", &[("x", &x)], 1084, &SMOOTH, || ops::scale(&x, -1.7))?;
    // Branches and views: a reshaped input feeding a sum with itself through another op.
    gradcheck("add(relu(x), scale(reshape(x)))", &[("x", &x)], 1085, &SMOOTH, || {
        let v = ops::reshape(&ops::reshape(&x, &[120])?, x.shape())?;
        ops::add(&ops::scale(&v, 0.5)?, &ops::elu(&x, 1.0)?)
    })?;
    Ok(())
}

#[test]
fn add_with_an_untracked_operand() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(109);
    let x = param(&b, &[3, 4], &randn(&mut rng, 12, 1.0));
    let c = Tensor::from_vec(&b, &[3, 4], &randn(&mut rng, 12, 1.0))?;
    gradcheck("add(x, const)", &[("x", &x)], 1090, &SMOOTH, || ops::add(&x, &c))?;
    gradcheck("add(const, x)", &[("x", &x)], 1091, &SMOOTH, || ops::add(&c, &x))?;
    let tape = Tape::start()?;
    let grads = tape.backward(&ops::sum(&ops::add(&c, &x)?)?)?;
    assert!(grads.get(&c).is_none(), "an untracked tensor got a gradient");
    assert_eq!(grads.get(&x).context("no gradient for x")?.to_vec()?, vec![1.0; 12]);
    assert!(ops::add(&x, &Tensor::zeros(&b, &[4, 3])?).is_err(), "add of different shapes must fail");
    Ok(())
}

#[test]
fn log_softmax_and_loss_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(110);
    let x = param(&b, &[5, 7], &randn(&mut rng, 35, 2.0));
    gradcheck("log_softmax", &[("x", &x)], 1100, &SMOOTH, || ops::log_softmax(&x))?;

    let labels = Tensor::from_vec(&b, &[5], &[0.0, 6.0, 3.0, 3.0, 1.0])?;
    let logp = param(&b, &[5, 7], &randn(&mut rng, 35, 1.0));
    let g = gradcheck("nll_loss", &[("logp", &logp)], 1101, &SMOOTH, || ops::nll_loss(&logp, &labels))?;
    // Only the label entries carry gradient.
    let lv = labels.to_vec()?;
    for (i, v) in g[0].iter().enumerate() {
        assert!((lv[i / 7] as usize == i % 7) || *v == 0.0, "nll_loss: gradient at a non-label entry {i}");
    }

    let logits = param(&b, &[6, 10], &randn(&mut rng, 60, 2.0));
    let labels6 = Tensor::from_vec(&b, &[6], &[9.0, 0.0, 4.0, 4.0, 7.0, 2.0])?;
    gradcheck("cross_entropy", &[("logits", &logits)], 1102, &SMOOTH, || ops::cross_entropy(&logits, &labels6))?;
    // Directly: d(mean CE)/dlogits = (softmax − onehot) / N.
    let tape = Tape::start()?;
    let loss = ops::cross_entropy(&logits, &labels6)?;
    let gl = tape.backward(&loss)?.get(&logits).context("no gradient")?.to_vec()?;
    let lv = logits.to_vec()?;
    let l6 = labels6.to_vec()?;
    for r in 0..6 {
        let row = &lv[r * 10..(r + 1) * 10];
        let mx = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let z: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
        for j in 0..10 {
            let want = ((row[j] as f64 - mx).exp() / z - if l6[r] as usize == j { 1.0 } else { 0.0 }) / 6.0;
            assert!(
                (gl[r * 10 + j] as f64 - want).abs() < 1e-6,
                "cross_entropy: dlogits[{r},{j}] = {}, want {want}",
                gl[r * 10 + j]
            );
        }
    }
    assert!(ops::nll_loss(&logp, &Tensor::from_vec(&b, &[4], &[0.0; 4])?).is_err(), "label count mismatch must fail");
    Ok(())
}

#[test]
fn mean_and_sum_gradients() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(111);
    let x = param(&b, &[3, 4, 5], &randn(&mut rng, 60, 1.0));
    let gs = gradcheck("sum", &[("x", &x)], 1110, &SMOOTH, || ops::sum(&x))?;
    let gm = gradcheck("mean", &[("x", &x)], 1111, &SMOOTH, || ops::mean(&x))?;
    let r = randn(&mut Rng::new(1110), 1, 1.0)[0];
    assert!(gs[0].iter().all(|&g| g == r), "sum: gradient is not dy everywhere");
    let r = randn(&mut Rng::new(1111), 1, 1.0)[0];
    assert!(gm[0].iter().all(|&g| (g - r / 60.0).abs() <= 1e-7 * r.abs()), "mean: gradient is not dy/N everywhere");
    let xv = x.to_vec()?;
    let s: f64 = xv.iter().map(|&v| v as f64).sum();
    assert!((ops::sum(&x)?.scalar()? as f64 - s).abs() < 1e-5 * s.abs().max(1.0));
    assert!((ops::mean(&x)?.scalar()? as f64 - s / 60.0).abs() < 1e-5 * (s / 60.0).abs().max(1.0));
    Ok(())
}

// --- a small composite network and LeNet -----------------------------------------------------

#[test]
fn composite_network_gradients() -> Result<()> {
    // conv (no bias: batch norm would cancel it) → batch norm → elu → avg pool → (+ residual conv) → max pool → flatten → dropout →
    // linear → cross-entropy: every parameter, every entry.
    let b = cpu();
    let mut rng = Rng::new(112);
    let x = Tensor::from_vec(&b, &[3, 2, 6, 6], &randn(&mut rng, 216, 1.0))?;
    let labels = Tensor::from_vec(&b, &[3], &[1.0, 0.0, 2.0])?;
    let w1 = param(&b, &[4, 2, 3, 3], &randn(&mut rng, 72, 0.4));
    let gamma = param(&b, &[4], &(0..4).map(|_| rng.uniform(0.5, 1.5)).collect::<Vec<_>>());
    let beta = param(&b, &[4], &randn(&mut rng, 4, 0.3));
    let w2 = param(&b, &[4, 4, 1, 1], &randn(&mut rng, 16, 0.4));
    let b2 = param(&b, &[4], &randn(&mut rng, 4, 0.1));
    let wl = param(&b, &[3, 36], &randn(&mut rng, 108, 0.3));
    let bl = param(&b, &[3], &randn(&mut rng, 3, 0.1));
    let (rm, rv) = (Tensor::zeros(&b, &[4])?, Tensor::full(&b, &[4], 1.0)?);
    let bn =
        BatchNormState { gamma: &gamma, beta: &beta, running_mean: &rm, running_var: &rv, momentum: 0.1, eps: 1e-5 };
    let net = || -> Result<Tensor> {
        let h = ops::conv2d(&x, &w1, None, 1, 1)?;
        let h = ops::elu(&ops::batch_norm(&h, &bn, true)?, 1.0)?;
        let h = ops::avg_pool2d(&h, 3, 1, 1)?;
        let h = ops::add(&h, &ops::conv2d(&h, &w2, Some(&b2), 1, 0)?)?;
        let h = ops::max_pool2d(&h, 2, 2, 0)?;
        let h = ops::dropout(&ops::flatten(&h)?, 0.25, true, 7)?;
        ops::cross_entropy(&ops::linear(&h, &wl, Some(&bl))?, &labels)
    };
    let inputs = [
        ("conv1.weight", &w1),
        ("bn.gamma", &gamma),
        ("bn.beta", &beta),
        ("conv2.weight", &w2),
        ("conv2.bias", &b2),
        ("fc.weight", &wl),
        ("fc.bias", &bl),
    ];
    // A max-pool in the middle: a smaller perturbation keeps every window's maximum in place.
    gradcheck("composite", &inputs, 1120, &Tol { eps: 2e-3, rel: 1e-2, elem: 2e-2 }, net)?;
    Ok(())
}

/// Mean cross-entropy of [rows, classes] logits, on the host in f64.
fn host_cross_entropy(logits: &[f32], labels: &[usize]) -> f64 {
    let cols = logits.len() / labels.len();
    let mut s = 0.0f64;
    for (r, &l) in labels.iter().enumerate() {
        let row = &logits[r * cols..(r + 1) * cols];
        let mx = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
        s += lse - row[l] as f64;
    }
    s / labels.len() as f64
}

#[test]
fn lenet_gradients_match_finite_differences() -> Result<()> {
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    model_gradients_match_finite_differences(&Model::build("lenet", spec, &cpu(), 42)?, 10, "fc2", 4)
}

/// ResNet's basic block, both kinds (identity shortcut 3→3, then 1×1 conv + batch norm shortcut
/// 3→4 with stride 2), batch norm in training mode, under a pooling + fc head. (A whole
/// ResNet-20 is too deep for f32 central differences to resolve 2%.)
#[test]
fn residual_block_gradients_match_finite_differences() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(130);
    let mut net = Sequential::new();
    net.push("block1", Layer::Residual(Box::new(BasicBlock::new(&b, &mut rng, 3, 3, 1)?)))
        .push("block2", Layer::Residual(Box::new(BasicBlock::new(&b, &mut rng, 3, 4, 2)?)))
        .push("avgpool", Layer::GlobalAvgPool)
        .push("fc", Layer::Linear(Linear::new(&b, &mut rng, 4, 10)?))
        .push("log_softmax", Layer::LogSoftmax);
    let input = InputSpec { channels: 3, height: 8, width: 8, classes: 10 };
    let model = Model { arch: "two basic blocks".into(), input, net };
    model_gradients_match_finite_differences(&model, 6 + 9 + 2, "fc", 6)
}

/// Batch norm after every conv, a ReLU'd class conv and global average pooling.
#[test]
fn allconv_gradients_match_finite_differences() -> Result<()> {
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    model_gradients_match_finite_differences(&Model::build("allconv", spec, &cpu(), 42)?, 26, "avgpool", 2)
}

/// A whole model's parameter gradients (Forward::train + nll_loss on the tape) against central
/// differences of the loss: `per_tensor` entries of each of its `n_params` parameter tensors.
/// `logits` names the intermediate the f64 loss is computed from.
fn model_gradients_match_finite_differences(
    model: &Model,
    n_params: usize,
    logits: &str,
    per_tensor: usize,
) -> Result<()> {
    let b = cpu();
    let arch = model.arch.as_str();
    let s = model.input;
    let mut rng = Rng::new(113);
    let x = Tensor::from_vec(
        &b,
        &[3, s.channels, s.height, s.width],
        &randn(&mut rng, 3 * s.channels * s.height * s.width, 1.0),
    )?;
    let label_idx = [3usize, 7, 0];
    let labels = Tensor::from_vec(&b, &[3], &label_idx.map(|l| l as f32))?;

    // The analytic gradient: Forward::train + nll_loss on the tape.
    let params = model.parameters();
    assert_eq!(params.len(), n_params, "{arch}: parameter tensors");
    let tape = Tape::start()?;
    let loss = ops::nll_loss(&model.forward(&x, &mut Forward::train(0))?, &labels)?;
    let grads = tape.backward(&loss)?;
    assert_eq!(grads.len(), params.len(), "{arch}: one gradient per parameter, nothing else kept");

    // The numeric one: the same loss, computed in f64 from the logits (the output of fc2,
    // seen by an observer). An f32 loss near 2.3 moves in steps of 2.4e-7, which would drown
    // the differences; logits near 0.1 resolve steps 30 times finer.
    let loss_f64 = || -> Result<f64> {
        let mut logits_seen = None;
        {
            let mut obs = |name: &str, t: &Tensor| -> Result<()> {
                if name == logits {
                    logits_seen = Some(t.to_vec()?);
                }
                Ok(())
            };
            model.forward(&x, &mut Forward { train: true, seed: 0, observer: Some(&mut obs), fed_seed: None })?;
        }
        Ok(host_cross_entropy(
            &logits_seen.with_context(|| format!("{arch}: no {logits} output observed"))?,
            &label_idx,
        ))
    };
    let l0 = loss_f64()?;
    assert!((l0 - loss.scalar()? as f64).abs() < 1e-5, "{arch}: host loss {l0} vs nll_loss {}", loss.scalar()?);

    // A ReLU network is only piecewise smooth, and with many units some pre-activation always
    // lies within any step of a kink (in LeNet one conv3 unit sits at -7e-6). There the central
    // difference averages two slopes and matches neither; the analytic derivative is the slope
    // on the side the point lies on, so it must match one of the one-sided differences instead
    // (which resolve these slopes to ~0.3% at this step).
    let eps = 3e-4f32;
    let (mut checked, mut at_kinks) = (0usize, 0usize);
    for p in &params {
        let ga = grads.get(&p.tensor).with_context(|| format!("{}: no gradient", p.name))?.to_vec()?;
        assert_eq!(ga.len(), p.tensor.numel());
        assert!(ga.iter().all(|v| v.is_finite()), "{}: non-finite gradient", p.name);
        let gmax = ga.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(gmax > 1e-4, "{}: gradient is (nearly) zero", p.name);
        // Random entries among those whose gradient is not negligible (many are exactly 0:
        // dead units), so that a relative comparison means something.
        let mut candidates: Vec<usize> = (0..ga.len()).filter(|&i| ga[i].abs() >= 0.2 * gmax).collect();
        rng.shuffle(&mut candidates);
        let mut data = p.tensor.to_vec()?;
        let (mut va, mut vfd) = (Vec::new(), Vec::new());
        for &i in candidates.iter().take(per_tensor) {
            let orig = data[i];
            let (hp, hm) = (orig + eps, orig - eps);
            data[i] = hp;
            p.tensor.copy_from_host(&data)?;
            let lp = loss_f64()?;
            data[i] = hm;
            p.tensor.copy_from_host(&data)?;
            let lm = loss_f64()?;
            data[i] = orig;
            p.tensor.copy_from_host(&data)?;
            let fwd = (lp - l0) / (hp - orig) as f64;
            let bwd = (l0 - lm) / (orig - hm) as f64;
            let g = ga[i] as f64;
            let numeric = if (fwd - bwd).abs() > 0.02 * g.abs() + 5e-5 {
                at_kinks += 1;
                if (fwd - g).abs() < (bwd - g).abs() {
                    fwd
                } else {
                    bwd
                }
            } else {
                (lp - lm) / (hp as f64 - hm as f64)
            };
            va.push(ga[i]);
            vfd.push(numeric);
        }
        checked += va.len();
        eprintln!("{arch} {}: analytic {va:?}, numeric {vfd:?}", p.name);
        // f32 forward passes resolve these differences to ~0.3% (and the kinks add their
        // share), so the whole-model tolerance is 2%, twice the per-op one.
        compare(&format!("{arch} {}", p.name), &va, &vfd, 2e-2, 3e-2);
    }
    eprintln!("{arch}: {checked} entries checked, {at_kinks} of them at a kink (against a one-sided difference)");
    assert!(checked >= params.len(), "{arch}: only {checked} entries checked");
    Ok(())
}

// --- the tape itself -------------------------------------------------------------------------

#[test]
fn without_a_tape_nothing_is_recorded() -> Result<()> {
    let b = cpu();
    let mut rng = Rng::new(114);
    assert!(!is_recording());
    let x = param(&b, &[2, 3, 4, 4], &randn(&mut rng, 96, 1.0));
    let w = param(&b, &[2, 3, 3, 3], &randn(&mut rng, 54, 1.0));
    let wl = param(&b, &[5, 8], &randn(&mut rng, 40, 1.0));
    let labels = Tensor::from_vec(&b, &[2], &[1.0, 4.0])?;
    let h = ops::conv2d(&x, &w, None, 1, 1)?;
    let h = ops::relu(&h)?;
    let h = ops::max_pool2d(&h, 2, 2, 0)?;
    let h = ops::flatten(&h)?;
    let y = ops::linear(&h, &wl, None)?;
    let loss = ops::cross_entropy(&y, &labels)?;
    for (name, t) in [
        ("conv", &ops::conv2d(&x, &w, None, 1, 1)?),
        ("relu", &ops::relu(&x)?),
        ("flatten", &h),
        ("linear", &y),
        ("loss", &loss),
        ("sum", &ops::sum(&x)?),
        ("reshape", &ops::reshape(&x, &[96])?),
        ("add", &ops::add(&x, &x)?),
    ] {
        assert!(!t.is_tracked(), "{name}: output tracked without a tape");
    }
    // A tape started afterwards sees none of it: backward of the untracked loss is empty.
    let tape = Tape::start()?;
    let grads = tape.backward(&loss)?;
    assert!(grads.is_empty(), "gradients from ops run before the tape started");

    // Under a tape, ops over untracked tensors record nothing either.
    let c = Tensor::from_vec(&b, &[4], &[1.0, -2.0, 3.0, -4.0])?;
    let tape = Tape::start()?;
    let r = ops::relu(&c)?;
    assert!(!r.is_tracked(), "relu of an untracked input is tracked");
    assert!(tape.backward(&ops::sum(&r)?)?.is_empty());
    // The detached copy of a parameter is untracked.
    let tape = Tape::start()?;
    assert!(!ops::relu(&x.detach())?.is_tracked());
    drop(tape);
    Ok(())
}

#[test]
fn a_second_tape_on_one_thread_is_an_error() -> Result<()> {
    let b = cpu();
    let x = param(&b, &[3], &[1.0, 2.0, 3.0]);
    let tape = Tape::start()?;
    assert!(is_recording());
    assert!(Tape::start().is_err(), "a second Tape::start on the same thread must fail");
    // The failed start does not disturb the first tape.
    assert!(is_recording());
    let g = tape.backward(&ops::sum(&ops::scale(&x, 3.0)?)?)?;
    assert_eq!(g.get(&x).context("no gradient")?.to_vec()?, vec![3.0; 3]);
    assert!(!is_recording());
    // After backward (or a drop) a new tape can start.
    let t2 = Tape::start()?;
    drop(t2);
    assert!(!is_recording());
    let t3 = Tape::start()?;
    // Tapes are per thread: another thread can record at the same time.
    std::thread::spawn(|| {
        let t = Tape::start().expect("a tape on another thread");
        drop(t);
    })
    .join()
    .unwrap();
    drop(t3);
    // backward needs a scalar loss.
    let t4 = Tape::start()?;
    let y = ops::scale(&x, 2.0)?;
    assert!(t4.backward(&y).is_err(), "backward of a non-scalar must fail");
    assert!(!is_recording());
    Ok(())
}
