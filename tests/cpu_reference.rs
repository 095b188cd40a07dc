//! The CPU backend against direct, obviously-correct loop implementations (f64 accumulation).
//!
//! Every output buffer is poisoned before the call (once with NaN, once with 1e30), so an op
//! that forgets to write an element, or that reads its output before writing it, fails.
//! Tolerances: elementwise ops 1e-5 relative per element; GEMM, convolution and reductions
//! 1e-4 relative to the largest magnitude of the reference.

use anyhow::Result;
use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::{Activation, AdamParams, BackendRef, ConvGeom, NormGeom, PoolGeom, PoolKind, SgdParams, Storage};
use rotvar::rng::Rng;

const POISONS: [f32; 2] = [f32::NAN, 1e30];

fn cpu() -> BackendRef {
    CpuBackend::shared()
}

fn up(b: &BackendRef, v: &[f32]) -> Storage {
    b.upload(v).unwrap()
}

fn poisoned(b: &BackendRef, len: usize, value: f32) -> Storage {
    b.upload(&vec![value; len]).unwrap()
}

fn down(b: &BackendRef, s: &Storage) -> Vec<f32> {
    b.download(s).unwrap()
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// max |got - want| / max |want| < tol, every element finite, and the lengths equal.
fn assert_close_scaled(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g} (reference {w}): never written?");
        let e = (g as f64 - w).abs() / scale;
        if e > worst.0 {
            worst = (e, i);
        }
    }
    assert!(
        worst.0 < tol,
        "{what}: relative error {:.3e} at element {} (got {}, want {}), tolerance {tol:e}",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1]
    );
}

/// |got - want| <= tol * max(|want|, floor) for every element.
fn assert_close_elementwise(what: &str, got: &[f32], want: &[f64], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g} (reference {w}): never written?");
        let e = (g as f64 - w).abs() / w.abs().max(floor);
        assert!(e < tol, "{what}: element {i}: got {g}, want {w} (relative error {e:.3e}, tolerance {tol:e})");
    }
}

// --- convolution -----------------------------------------------------------------------------

fn x_at(x: &[f32], g: &ConvGeom, n: usize, c: usize, iy: isize, ix: isize) -> f64 {
    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
        0.0
    } else {
        x[((n * g.c_in + c) * g.h + iy as usize) * g.w + ix as usize] as f64
    }
}

/// y[n, co, oy, ox] = b[co] + Σ_{ci, ky, kx} x[n, ci, oy·s − p + ky, ox·s − p + kx] · w[co, ci, ky, kx]
fn naive_conv_fwd(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &ConvGeom) -> Vec<f64> {
    let mut y = vec![0.0f64; g.out_len()];
    for n in 0..g.n {
        for co in 0..g.c_out {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut s = b.map_or(0.0, |b| b[co] as f64);
                    for ci in 0..g.c_in {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                let wv = w[((co * g.c_in + ci) * g.kh + ky) * g.kw + kx] as f64;
                                s += wv * x_at(x, g, n, ci, iy, ix);
                            }
                        }
                    }
                    y[((n * g.c_out + co) * g.oh + oy) * g.ow + ox] = s;
                }
            }
        }
    }
    y
}

/// dx[n, ci, iy, ix] = Σ over (co, ky, kx) and the output (oy, ox) that read x[iy, ix] through
/// tap (ky, kx), i.e. oy·s = iy + p − ky, of dy[n, co, oy, ox] · w[co, ci, ky, kx]. Written as a
/// gather over input positions (the GEMM path scatters with col2im), so the two differ in form.
fn naive_conv_bwd_data(dy: &[f32], w: &[f32], g: &ConvGeom) -> Vec<f64> {
    let mut dx = vec![0.0f64; g.in_len()];
    for n in 0..g.n {
        for ci in 0..g.c_in {
            for iy in 0..g.h {
                for ix in 0..g.w {
                    let mut s = 0.0f64;
                    for ky in 0..g.kh {
                        let ty = iy as isize + g.pad as isize - ky as isize;
                        if ty < 0 || ty % g.stride as isize != 0 || (ty / g.stride as isize) >= g.oh as isize {
                            continue;
                        }
                        let oy = (ty / g.stride as isize) as usize;
                        for kx in 0..g.kw {
                            let tx = ix as isize + g.pad as isize - kx as isize;
                            if tx < 0 || tx % g.stride as isize != 0 || (tx / g.stride as isize) >= g.ow as isize {
                                continue;
                            }
                            let ox = (tx / g.stride as isize) as usize;
                            for co in 0..g.c_out {
                                s += dy[((n * g.c_out + co) * g.oh + oy) * g.ow + ox] as f64
                                    * w[((co * g.c_in + ci) * g.kh + ky) * g.kw + kx] as f64;
                            }
                        }
                    }
                    dx[((n * g.c_in + ci) * g.h + iy) * g.w + ix] = s;
                }
            }
        }
    }
    dx
}

/// dw[co, ci, ky, kx] = Σ_{n, oy, ox} dy[n, co, oy, ox] · x[n, ci, oy·s − p + ky, ox·s − p + kx];
/// db[co] = Σ_{n, oy, ox} dy[n, co, oy, ox].
fn naive_conv_bwd_weight(x: &[f32], dy: &[f32], g: &ConvGeom) -> (Vec<f64>, Vec<f64>) {
    let mut dw = vec![0.0f64; g.weight_len()];
    let mut db = vec![0.0f64; g.c_out];
    for co in 0..g.c_out {
        for n in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let d = dy[((n * g.c_out + co) * g.oh + oy) * g.ow + ox] as f64;
                    db[co] += d;
                    for ci in 0..g.c_in {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                dw[((co * g.c_in + ci) * g.kh + ky) * g.kw + kx] += d * x_at(x, g, n, ci, iy, ix);
                            }
                        }
                    }
                }
            }
        }
    }
    (dw, db)
}

/// (n, c_in, h, w, c_out, (kh, kw), stride, pad)
type ConvCase = (usize, usize, usize, usize, usize, (usize, usize), usize, usize);

const CONV_CASES: &[ConvCase] = &[
    (2, 3, 7, 9, 5, (3, 3), 1, 1),   // same padding, odd non-square input
    (3, 2, 8, 8, 7, (1, 1), 1, 0),   // pointwise: the no-im2col path
    (2, 3, 7, 9, 4, (1, 1), 2, 0),   // 1×1 but strided: im2col path
    (2, 2, 6, 5, 3, (1, 1), 1, 1),   // 1×1 with padding: the border is bias only
    (2, 2, 11, 9, 3, (5, 5), 2, 2),  // 5×5 stride 2 pad 2
    (4, 3, 9, 7, 6, (3, 3), 2, 0),   // stride 2, no padding, odd sizes
    (2, 2, 10, 8, 5, (3, 2), 3, 1),  // non-square kernel, stride 3 with a floor remainder
    (2, 1, 5, 5, 4, (5, 5), 1, 0),   // kernel as large as the input: 1×1 output
    (2, 4, 3, 4, 2, (5, 5), 1, 2),   // kernel larger than the input, padding makes it fit
    (19, 3, 7, 6, 5, (3, 3), 1, 1),  // 19 images: backward-weight chunks of 8 (8 + 8 + 3)
    (17, 5, 4, 4, 13, (1, 1), 1, 0), // 17 images, pointwise backward-weight across chunks
    (1, 3, 6, 6, 2, (3, 3), 1, 0),   // a single image
];

fn conv_geom(c: &ConvCase) -> ConvGeom {
    let &(n, c_in, h, w, c_out, k, s, p) = c;
    ConvGeom::new(n, c_in, h, w, c_out, k, s, p).unwrap()
}

#[test]
fn conv2d_forward_matches_naive() {
    let b = cpu();
    let mut rng = Rng::new(1);
    for case in CONV_CASES {
        let g = conv_geom(case);
        let x = randn(&mut rng, g.in_len());
        let w = randn(&mut rng, g.weight_len());
        let bias = randn(&mut rng, g.c_out);
        for with_bias in [true, false] {
            let bias = with_bias.then_some(&bias[..]);
            let want = naive_conv_fwd(&x, &w, bias, &g);
            for poison in POISONS {
                let mut y = poisoned(&b, g.out_len(), poison);
                let bs = bias.map(|v| up(&b, v));
                b.conv2d_fwd(&up(&b, &x), &up(&b, &w), bs.as_ref(), Activation::Identity, &mut y, &g).unwrap();
                let y = down(&b, &y);
                assert_close_scaled(&format!("conv fwd {g:?} bias={with_bias} poison={poison}"), &y, &want, 1e-4);
                // The fused ReLU: the activation of the same bits.
                let mut yr = poisoned(&b, g.out_len(), poison);
                b.conv2d_fwd(&up(&b, &x), &up(&b, &w), bs.as_ref(), Activation::Relu, &mut yr, &g).unwrap();
                assert_eq!(bits(&down(&b, &yr)), bits(&y.iter().map(|&v| v.max(0.0)).collect::<Vec<_>>()));
            }
        }
    }
}

#[test]
fn conv2d_backward_data_matches_naive() {
    let b = cpu();
    let mut rng = Rng::new(2);
    for case in CONV_CASES {
        let g = conv_geom(case);
        let dy = randn(&mut rng, g.out_len());
        let w = randn(&mut rng, g.weight_len());
        let want = naive_conv_bwd_data(&dy, &w, &g);
        for poison in POISONS {
            let mut dx = poisoned(&b, g.in_len(), poison);
            b.conv2d_bwd_data(&up(&b, &dy), &up(&b, &w), &mut dx, &g).unwrap();
            assert_close_scaled(&format!("conv bwd data {g:?} poison={poison}"), &down(&b, &dx), &want, 1e-4);
        }
    }
}

#[test]
fn conv2d_backward_weight_matches_naive() {
    let b = cpu();
    let mut rng = Rng::new(3);
    for case in CONV_CASES {
        let g = conv_geom(case);
        let x = randn(&mut rng, g.in_len());
        let dy = randn(&mut rng, g.out_len());
        let (want_w, want_b) = naive_conv_bwd_weight(&x, &dy, &g);
        for poison in POISONS {
            let mut dw = poisoned(&b, g.weight_len(), poison);
            let mut db = poisoned(&b, g.c_out, poison);
            b.conv2d_bwd_weight(&up(&b, &x), &up(&b, &dy), &mut dw, Some(&mut db), &g).unwrap();
            assert_close_scaled(&format!("conv dw {g:?} poison={poison}"), &down(&b, &dw), &want_w, 1e-4);
            assert_close_scaled(&format!("conv db {g:?} poison={poison}"), &down(&b, &db), &want_b, 1e-4);
            // Without a bias gradient the weight gradient is the same.
            let mut dw2 = poisoned(&b, g.weight_len(), poison);
            b.conv2d_bwd_weight(&up(&b, &x), &up(&b, &dy), &mut dw2, None, &g).unwrap();
            assert_close_scaled(&format!("conv dw (no db) {g:?} poison={poison}"), &down(&b, &dw2), &want_w, 1e-4);
        }
    }
}

/// Kernels that reach past the padded border on one side only: a 1-pixel-wide input under a
/// 5×5 kernel with padding 2 (PyTorch accepts these: the padded input is 5 wide). For such a
/// kernel column every output column reads padding, which im2col/col2im must handle.
#[test]
fn conv2d_thin_inputs_match_naive() {
    let b = cpu();
    let mut rng = Rng::new(13);
    let cases: &[ConvCase] = &[
        (2, 3, 1, 1, 4, (5, 5), 1, 2), // 1×1 input, 5×5 kernel, padding 2: 1×1 output
        (2, 2, 6, 1, 3, (5, 5), 1, 2), // one column wide
        (2, 2, 1, 6, 3, (5, 5), 1, 2), // one row high
        (2, 2, 2, 1, 3, (3, 5), 1, 2), // non-square kernel over a single column
    ];
    for case in cases {
        let g = conv_geom(case);
        let x = randn(&mut rng, g.in_len());
        let w = randn(&mut rng, g.weight_len());
        let bias = randn(&mut rng, g.c_out);
        let dy = randn(&mut rng, g.out_len());
        let what = format!("{g:?}");
        let mut y = poisoned(&b, g.out_len(), f32::NAN);
        b.conv2d_fwd(&up(&b, &x), &up(&b, &w), Some(&up(&b, &bias)), Activation::Identity, &mut y, &g).unwrap();
        assert_close_scaled(&format!("conv fwd {what}"), &down(&b, &y), &naive_conv_fwd(&x, &w, Some(&bias), &g), 1e-4);
        let mut dx = poisoned(&b, g.in_len(), f32::NAN);
        b.conv2d_bwd_data(&up(&b, &dy), &up(&b, &w), &mut dx, &g).unwrap();
        assert_close_scaled(&format!("conv bwd data {what}"), &down(&b, &dx), &naive_conv_bwd_data(&dy, &w, &g), 1e-4);
        let (want_w, want_b) = naive_conv_bwd_weight(&x, &dy, &g);
        let (mut dw, mut db) = (poisoned(&b, g.weight_len(), f32::NAN), poisoned(&b, g.c_out, f32::NAN));
        b.conv2d_bwd_weight(&up(&b, &x), &up(&b, &dy), &mut dw, Some(&mut db), &g).unwrap();
        assert_close_scaled(&format!("conv dw {what}"), &down(&b, &dw), &want_w, 1e-4);
        assert_close_scaled(&format!("conv db {what}"), &down(&b, &db), &want_b, 1e-4);
    }
}

// --- linear ----------------------------------------------------------------------------------

/// (n rows, k inputs, m outputs)
const LINEAR_CASES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 5, 4),
    (32, 16, 32), // exactly one chunk of rows
    (33, 7, 10),  // one row past a chunk
    (70, 37, 45), // 32 + 32 + 6 rows; 32 + 13 output features
    (5, 19, 97),  // many output features (backward-weight chunks over them)
    (130, 64, 3), // many rows, few outputs
];

#[test]
fn linear_forward_and_backward_match_naive() {
    let b = cpu();
    let mut rng = Rng::new(4);
    for &(n, k, m) in LINEAR_CASES {
        let x = randn(&mut rng, n * k);
        let w = randn(&mut rng, m * k);
        let bias = randn(&mut rng, m);
        let dy = randn(&mut rng, n * m);
        let mut y_ref = vec![0.0f64; n * m];
        let mut dx_ref = vec![0.0f64; n * k];
        let mut dw_ref = vec![0.0f64; m * k];
        let mut db_ref = vec![0.0f64; m];
        for i in 0..n {
            for j in 0..m {
                for t in 0..k {
                    y_ref[i * m + j] += x[i * k + t] as f64 * w[j * k + t] as f64;
                    dx_ref[i * k + t] += dy[i * m + j] as f64 * w[j * k + t] as f64;
                    dw_ref[j * k + t] += dy[i * m + j] as f64 * x[i * k + t] as f64;
                }
                db_ref[j] += dy[i * m + j] as f64;
            }
        }
        let y_ref_b: Vec<f64> = y_ref.iter().enumerate().map(|(i, v)| v + bias[i % m] as f64).collect();
        for poison in POISONS {
            let what = format!("linear n={n} k={k} m={m} poison={poison}");
            let mut y = poisoned(&b, n * m, poison);
            b.linear_fwd(&up(&b, &x), &up(&b, &w), Some(&up(&b, &bias)), Activation::Identity, &mut y, n, k, m)
                .unwrap();
            assert_close_scaled(&format!("{what}: y"), &down(&b, &y), &y_ref_b, 1e-4);
            let mut y = poisoned(&b, n * m, poison);
            b.linear_fwd(&up(&b, &x), &up(&b, &w), None, Activation::Identity, &mut y, n, k, m).unwrap();
            assert_close_scaled(&format!("{what}: y (no bias)"), &down(&b, &y), &y_ref, 1e-4);
            for bias_arg in [Some(up(&b, &bias)), None] {
                let mut y = poisoned(&b, n * m, poison);
                b.linear_fwd(&up(&b, &x), &up(&b, &w), bias_arg.as_ref(), Activation::Identity, &mut y, n, k, m)
                    .unwrap();
                let mut yr = poisoned(&b, n * m, poison);
                b.linear_fwd(&up(&b, &x), &up(&b, &w), bias_arg.as_ref(), Activation::Relu, &mut yr, n, k, m).unwrap();
                let want: Vec<f32> = down(&b, &y).iter().map(|&v| v.max(0.0)).collect();
                assert_eq!(bits(&down(&b, &yr)), bits(&want), "{what}: fused relu");
            }

            let mut dx = poisoned(&b, n * k, poison);
            b.linear_bwd_data(&up(&b, &dy), &up(&b, &w), &mut dx, n, k, m).unwrap();
            assert_close_scaled(&format!("{what}: dx"), &down(&b, &dx), &dx_ref, 1e-4);

            let mut dw = poisoned(&b, m * k, poison);
            let mut db = poisoned(&b, m, poison);
            b.linear_bwd_weight(&up(&b, &x), &up(&b, &dy), &mut dw, Some(&mut db), n, k, m).unwrap();
            assert_close_scaled(&format!("{what}: dw"), &down(&b, &dw), &dw_ref, 1e-4);
            assert_close_scaled(&format!("{what}: db"), &down(&b, &db), &db_ref, 1e-4);
            let mut dw = poisoned(&b, m * k, poison);
            b.linear_bwd_weight(&up(&b, &x), &up(&b, &dy), &mut dw, None, n, k, m).unwrap();
            assert_close_scaled(&format!("{what}: dw (no db)"), &down(&b, &dw), &dw_ref, 1e-4);
        }
    }
}

// --- pooling ---------------------------------------------------------------------------------

/// Max over the window's positions inside the image (padding never wins), or the sum over
/// them divided by k·k (padding counts as zeros, count_include_pad=True).
fn naive_pool_fwd(kind: PoolKind, x: &[f32], g: &PoolGeom) -> Vec<f64> {
    let mut y = vec![0.0f64; g.out_len()];
    for plane in 0..g.n * g.c {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let mut mx = f64::NEG_INFINITY;
                let mut sum = 0.0f64;
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                            continue; // a padded position: 0 for the average, ignored by max
                        }
                        let v = x[plane * g.h * g.w + iy as usize * g.w + ix as usize] as f64;
                        mx = mx.max(v);
                        sum += v;
                    }
                }
                y[plane * g.oh * g.ow + oy * g.ow + ox] = match kind {
                    PoolKind::Max => mx,
                    PoolKind::Avg => sum / (g.k * g.k) as f64,
                };
            }
        }
    }
    y
}

/// Average: each window spreads dy/(k·k) over its in-image positions. Max: dy goes to the
/// (first) position holding the window's maximum.
fn naive_pool_bwd(kind: PoolKind, x: &[f32], dy: &[f32], g: &PoolGeom) -> Vec<f64> {
    let mut dx = vec![0.0f64; g.in_len()];
    for plane in 0..g.n * g.c {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let d = dy[plane * g.oh * g.ow + oy * g.ow + ox] as f64;
                let mut best: Option<(f32, usize)> = None;
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                            continue;
                        }
                        let idx = plane * g.h * g.w + iy as usize * g.w + ix as usize;
                        match kind {
                            PoolKind::Avg => dx[idx] += d / (g.k * g.k) as f64,
                            PoolKind::Max => {
                                if best.is_none_or(|(v, _)| x[idx] > v) {
                                    best = Some((x[idx], idx));
                                }
                            }
                        }
                    }
                }
                if let Some((_, idx)) = best {
                    dx[idx] += d;
                }
            }
        }
    }
    dx
}

/// (n, c, h, w, k, stride, pad)
const POOL_CASES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
    (2, 3, 8, 8, 2, 2, 0),
    (2, 3, 7, 9, 2, 2, 0), // odd sizes: the last row/column is dropped (floor)
    (2, 2, 7, 9, 3, 2, 1), // padded windows at every border
    (1, 3, 6, 5, 3, 1, 1),
    (3, 2, 5, 5, 5, 1, 0), // a global window
    (2, 2, 6, 7, 4, 3, 2), // pad = k/2, stride 3
    (2, 1, 4, 4, 1, 1, 0), // identity
];

#[test]
fn pool2d_forward_and_backward_match_naive() {
    let b = cpu();
    let mut rng = Rng::new(5);
    for &(n, c, h, w, k, s, p) in POOL_CASES {
        let g = PoolGeom::new(n, c, h, w, k, s, p).unwrap();
        // All-negative inputs make a max that wrongly included padding (as 0) visible.
        let mut x = randn(&mut rng, g.in_len());
        for v in x.iter_mut().step_by(2) {
            *v = -v.abs() - 0.5;
        }
        let x_neg: Vec<f32> = x.iter().map(|v| -v.abs() - 0.1).collect();
        let dy = randn(&mut rng, g.out_len());
        for kind in [PoolKind::Max, PoolKind::Avg] {
            for xs in [&x, &x_neg] {
                let want = naive_pool_fwd(kind, xs, &g);
                let want_dx = naive_pool_bwd(kind, xs, &dy, &g);
                for poison in POISONS {
                    let what = format!("{kind:?} pool {g:?} poison={poison}");
                    let mut y = poisoned(&b, g.out_len(), poison);
                    b.pool2d_fwd(kind, &up(&b, xs), &mut y, &g).unwrap();
                    assert_close_elementwise(&format!("{what}: y"), &down(&b, &y), &want, 1e-5, 1e-3);
                    let mut dx = poisoned(&b, g.in_len(), poison);
                    b.pool2d_bwd(kind, &up(&b, xs), &up(&b, &dy), &mut dx, &g).unwrap();
                    assert_close_scaled(&format!("{what}: dx"), &down(&b, &dx), &want_dx, 1e-5);
                }
            }
        }
    }
}

#[test]
fn max_pool_ties_route_to_the_first_maximum() {
    let b = cpu();
    let g = PoolGeom::new(1, 1, 2, 4, 2, 2, 0).unwrap();
    let x = [1.0, 3.0, 2.0, 2.0, 3.0, 0.0, 2.0, 2.0];
    let mut dx = poisoned(&b, 8, f32::NAN);
    b.pool2d_bwd(PoolKind::Max, &up(&b, &x), &up(&b, &[10.0, 20.0]), &mut dx, &g).unwrap();
    assert_eq!(down(&b, &dx), vec![0.0, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
}

// --- batch norm ------------------------------------------------------------------------------

fn bn_stats(x: &[f32], g: &NormGeom) -> Vec<(f64, f64)> {
    (0..g.c)
        .map(|c| {
            let vals: Vec<f64> = (0..g.n)
                .flat_map(|n| (0..g.hw).map(move |i| (n, i)))
                .map(|(n, i)| x[(n * g.c + c) * g.hw + i] as f64)
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            (mean, var)
        })
        .collect()
}

#[test]
fn batchnorm_train_and_eval_match_naive() {
    let b = cpu();
    let mut rng = Rng::new(6);
    let (momentum, eps) = (0.1f32, 1e-5f32);
    // (n, c, hw): 2d inputs, a 1d input (hw = 1), ragged channel counts.
    for &(n, c, hw) in &[(4usize, 3usize, 25usize), (6, 5, 1), (2, 7, 9), (33, 2, 1), (3, 1, 49)] {
        let g = NormGeom { n, c, hw };
        let x: Vec<f32> = (0..g.len()).map(|i| 3.0 + 0.5 * rng.normal() + (i % 3) as f32 * 0.1).collect();
        let gamma: Vec<f32> = (0..c).map(|_| rng.uniform(0.5, 1.5)).collect();
        let beta = randn(&mut rng, c);
        let rm0 = randn(&mut rng, c);
        let rv0: Vec<f32> = (0..c).map(|_| rng.uniform(0.5, 2.0)).collect();
        let stats = bn_stats(&x, &g);
        let count = (n * hw) as f64;
        let mut y_ref = vec![0.0f64; g.len()];
        for ni in 0..n {
            for ci in 0..c {
                let (mean, var) = stats[ci];
                for i in 0..hw {
                    let j = (ni * c + ci) * hw + i;
                    y_ref[j] = (x[j] as f64 - mean) / (var + eps as f64).sqrt() * gamma[ci] as f64 + beta[ci] as f64;
                }
            }
        }
        let mean_ref: Vec<f64> = stats.iter().map(|s| s.0).collect();
        let invstd_ref: Vec<f64> = stats.iter().map(|s| 1.0 / (s.1 + eps as f64).sqrt()).collect();
        let m = momentum as f64;
        let rm_ref: Vec<f64> = (0..c).map(|ci| (1.0 - m) * rm0[ci] as f64 + m * stats[ci].0).collect();
        let rv_ref: Vec<f64> =
            (0..c).map(|ci| (1.0 - m) * rv0[ci] as f64 + m * stats[ci].1 * count / (count - 1.0)).collect();

        for poison in POISONS {
            let what = format!("batchnorm n={n} c={c} hw={hw} poison={poison}");
            let mut y = poisoned(&b, g.len(), poison);
            let (mut sm, mut si) = (poisoned(&b, c, poison), poisoned(&b, c, poison));
            let (mut rm, mut rv) = (up(&b, &rm0), up(&b, &rv0));
            b.batchnorm_fwd_train(
                &up(&b, &x),
                &up(&b, &gamma),
                &up(&b, &beta),
                Activation::Identity,
                &mut y,
                &mut sm,
                &mut si,
                &mut rm,
                &mut rv,
                momentum,
                eps,
                &g,
            )
            .unwrap();
            assert_close_scaled(&format!("{what}: train y"), &down(&b, &y), &y_ref, 1e-4);
            assert_close_elementwise(&format!("{what}: saved mean"), &down(&b, &sm), &mean_ref, 1e-5, 1e-3);
            assert_close_elementwise(&format!("{what}: saved invstd"), &down(&b, &si), &invstd_ref, 1e-5, 1e-3);
            assert_close_elementwise(&format!("{what}: running mean"), &down(&b, &rm), &rm_ref, 1e-5, 1e-3);
            assert_close_elementwise(&format!("{what}: running var (unbiased)"), &down(&b, &rv), &rv_ref, 1e-5, 1e-3);

            // Eval mode with the updated running statistics.
            let rm_now = down(&b, &rm);
            let rv_now = down(&b, &rv);
            let y_eval_ref: Vec<f64> = (0..g.len())
                .map(|j| {
                    let ci = (j / hw) % c;
                    (x[j] as f64 - rm_now[ci] as f64) / (rv_now[ci] as f64 + eps as f64).sqrt() * gamma[ci] as f64
                        + beta[ci] as f64
                })
                .collect();
            let (xs, gs, bs) = (up(&b, &x), up(&b, &gamma), up(&b, &beta));
            let mut ye = poisoned(&b, g.len(), poison);
            b.batchnorm_fwd_eval(&xs, &gs, &bs, &rm, &rv, Activation::Identity, &mut ye, eps, &g).unwrap();
            assert_close_scaled(&format!("{what}: eval y"), &down(&b, &ye), &y_eval_ref, 1e-5);
            // The fused ReLU, in both modes: the activation of the same bits.
            let relu_of = |v: Vec<f32>| bits(&v.iter().map(|&v| v.max(0.0)).collect::<Vec<_>>());
            let mut yr = poisoned(&b, g.len(), poison);
            b.batchnorm_fwd_eval(&xs, &gs, &bs, &rm, &rv, Activation::Relu, &mut yr, eps, &g).unwrap();
            assert_eq!(bits(&down(&b, &yr)), relu_of(down(&b, &ye)), "{what}: eval y + relu");
            let (mut rm2, mut rv2) = (up(&b, &rm0), up(&b, &rv0));
            let (mut sm2, mut si2) = (poisoned(&b, c, poison), poisoned(&b, c, poison));
            let mut yr = poisoned(&b, g.len(), poison);
            b.batchnorm_fwd_train(
                &xs,
                &gs,
                &bs,
                Activation::Relu,
                &mut yr,
                &mut sm2,
                &mut si2,
                &mut rm2,
                &mut rv2,
                momentum,
                eps,
                &g,
            )
            .unwrap();
            assert_eq!(bits(&down(&b, &yr)), relu_of(down(&b, &y)), "{what}: train y + relu");
        }
    }
}

#[test]
fn batchnorm_backward_matches_naive() {
    let b = cpu();
    let mut rng = Rng::new(7);
    let eps = 1e-5f64;
    for &(n, c, hw) in &[(4usize, 3usize, 25usize), (6, 5, 1), (2, 7, 9)] {
        let g = NormGeom { n, c, hw };
        let x = randn(&mut rng, g.len());
        let dy = randn(&mut rng, g.len());
        let gamma: Vec<f32> = (0..c).map(|_| rng.uniform(0.5, 1.5)).collect();
        let stats = bn_stats(&x, &g);
        let mean: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
        let invstd: Vec<f32> = stats.iter().map(|s| (1.0 / (s.1 + eps).sqrt()) as f32).collect();
        let cnt = (n * hw) as f64;
        let (mut dx_ref, mut dg_ref, mut db_ref) = (vec![0.0f64; g.len()], vec![0.0f64; c], vec![0.0f64; c]);
        for ci in 0..c {
            let idx: Vec<usize> = (0..n).flat_map(|ni| (0..hw).map(move |i| (ni * c + ci) * hw + i)).collect();
            let is = invstd[ci] as f64;
            let xhat = |j: usize| (x[j] as f64 - mean[ci] as f64) * is;
            let sdy: f64 = idx.iter().map(|&j| dy[j] as f64).sum();
            let sdyx: f64 = idx.iter().map(|&j| dy[j] as f64 * xhat(j)).sum();
            db_ref[ci] = sdy;
            dg_ref[ci] = sdyx;
            for &j in &idx {
                dx_ref[j] = gamma[ci] as f64 * is * (dy[j] as f64 - sdy / cnt - xhat(j) * sdyx / cnt);
            }
        }
        for poison in POISONS {
            let what = format!("batchnorm bwd n={n} c={c} hw={hw} poison={poison}");
            let (mut dx, mut dg, mut db) =
                (poisoned(&b, g.len(), poison), poisoned(&b, c, poison), poisoned(&b, c, poison));
            b.batchnorm_bwd(
                &up(&b, &x),
                &up(&b, &gamma),
                &up(&b, &mean),
                &up(&b, &invstd),
                &up(&b, &dy),
                &mut dx,
                &mut dg,
                &mut db,
                &g,
            )
            .unwrap();
            assert_close_scaled(&format!("{what}: dx"), &down(&b, &dx), &dx_ref, 1e-4);
            assert_close_scaled(&format!("{what}: dgamma"), &down(&b, &dg), &dg_ref, 1e-4);
            assert_close_scaled(&format!("{what}: dbeta"), &down(&b, &db), &db_ref, 1e-4);
        }
    }
}

// --- softmax, loss and reductions ------------------------------------------------------------

#[test]
fn log_softmax_and_nll_match_naive() {
    let b = cpu();
    let mut rng = Rng::new(8);
    for &(rows, cols) in &[(1usize, 1usize), (5, 7), (64, 10), (3, 1000)] {
        let mut x: Vec<f32> = (0..rows * cols).map(|_| 3.0 * rng.normal()).collect();
        // A row of huge logits: exp without the max subtracted overflows even in f64.
        for v in &mut x[..cols] {
            *v += 1000.0;
        }
        let mut y_ref = vec![0.0f64; rows * cols];
        // f32 holds a logit near 1000 only to ~6e-5, so each row's absolute tolerance grows
        // with its largest logit: 1e-5 for ordinary rows, 2e-7·max|x| for the huge one.
        let mut row_tol = vec![0.0f64; rows];
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let mx = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            for j in 0..cols {
                y_ref[r * cols + j] = row[j] as f64 - lse;
            }
            row_tol[r] = 1e-5f64.max(2e-7 * row.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs())));
        }
        let labels: Vec<f32> = (0..rows).map(|_| rng.below(cols as u64) as f32).collect();
        let nll_ref = -(0..rows).map(|r| y_ref[r * cols + labels[r] as usize]).sum::<f64>() / rows as f64;
        let dy = randn(&mut rng, rows * cols);
        for poison in POISONS {
            let what = format!("log_softmax {rows}x{cols} poison={poison}");
            let mut y = poisoned(&b, rows * cols, poison);
            b.log_softmax_fwd(&up(&b, &x), &mut y, rows, cols).unwrap();
            let yv = down(&b, &y);
            for (i, (&g, &w)) in yv.iter().zip(&y_ref).enumerate() {
                let tol = row_tol[i / cols] * w.abs().max(1.0);
                assert!(
                    g.is_finite() && (g as f64 - w).abs() <= tol,
                    "{what}: y[{i}] = {g}, want {w} (tolerance {tol:e})"
                );
            }
            for r in 0..rows {
                let s: f64 = yv[r * cols..(r + 1) * cols].iter().map(|&v| (v as f64).exp()).sum();
                assert!((s - 1.0).abs() < 2.0 * row_tol[r], "{what}: row {r} has Σ exp = {s}");
            }
            // Backward: dx = dy − softmax · Σ dy, from the (f32) output.
            let dx_ref: Vec<f64> = (0..rows * cols)
                .map(|i| {
                    let r = i / cols;
                    let s: f64 = dy[r * cols..(r + 1) * cols].iter().map(|&v| v as f64).sum();
                    dy[i] as f64 - (yv[i] as f64).exp() * s
                })
                .collect();
            let mut dx = poisoned(&b, rows * cols, poison);
            b.log_softmax_bwd(&y, &up(&b, &dy), &mut dx, rows, cols).unwrap();
            assert_close_scaled(&format!("{what}: dx"), &down(&b, &dx), &dx_ref, 1e-5);

            let mut loss = poisoned(&b, 1, poison);
            b.nll_fwd(&y, &up(&b, &labels), &mut loss, rows, cols).unwrap();
            assert_close_elementwise(&format!("{what}: nll"), &down(&b, &loss), &[nll_ref], 1e-5, 1e-3);
            let mut dl = poisoned(&b, rows * cols, poison);
            b.nll_bwd(&up(&b, &labels), &up(&b, &[2.5]), &mut dl, rows, cols).unwrap();
            let dl_ref: Vec<f64> = (0..rows * cols)
                .map(|i| if labels[i / cols] as usize == i % cols { -2.5 / rows as f64 } else { 0.0 })
                .collect();
            assert_close_elementwise(&format!("{what}: nll bwd"), &down(&b, &dl), &dl_ref, 1e-6, 1e-3);
        }
    }
    // A label out of range is an error, not a read past the row.
    let mut loss = b.zeros(1).unwrap();
    assert!(b.nll_fwd(&up(&b, &[0.0; 6]), &up(&b, &[1.0, 3.0]), &mut loss, 2, 3).is_err());
}

#[test]
fn elementwise_ops_match_naive() {
    let b = cpu();
    let mut rng = Rng::new(9);
    // Longer than one parallel chunk (1 << 14), and not a multiple of it.
    let len = (1 << 14) * 2 + 123;
    let x = randn(&mut rng, len);
    let y2 = randn(&mut rng, len);
    let dy = randn(&mut rng, len);
    let f = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    for poison in POISONS {
        let mut o = poisoned(&b, len, poison);
        b.add(&up(&b, &x), &up(&b, &y2), Activation::Identity, &mut o).unwrap();
        let want: Vec<f64> = x.iter().zip(&y2).map(|(&a, &c)| (a + c) as f64).collect();
        assert_close_elementwise("add", &down(&b, &o), &want, 1e-6, 1e-6);
        let sum = down(&b, &o);
        let mut o = poisoned(&b, len, poison);
        b.add(&up(&b, &x), &up(&b, &y2), Activation::Relu, &mut o).unwrap();
        assert_eq!(bits(&down(&b, &o)), bits(&sum.iter().map(|&v| v.max(0.0)).collect::<Vec<_>>()), "add + relu");
        let mut o = poisoned(&b, len, poison);
        b.mul(&up(&b, &x), &up(&b, &y2), &mut o).unwrap();
        let want: Vec<f64> = x.iter().zip(&y2).map(|(&a, &c)| a as f64 * c as f64).collect();
        assert_close_elementwise("mul", &down(&b, &o), &want, 1e-6, 1e-6);
        let mut o = poisoned(&b, len, poison);
        b.scale(&up(&b, &x), -1.75, &mut o).unwrap();
        let want: Vec<f64> = x.iter().map(|&a| a as f64 * -1.75).collect();
        assert_close_elementwise("scale", &down(&b, &o), &want, 1e-6, 1e-6);

        let mut o = poisoned(&b, len, poison);
        b.relu_fwd(&up(&b, &x), &mut o).unwrap();
        let relu_y = down(&b, &o);
        assert_close_elementwise(
            "relu",
            &relu_y,
            &x.iter().map(|&v| (v as f64).max(0.0)).collect::<Vec<_>>(),
            1e-6,
            1e-6,
        );
        // NaN propagates (as torch.relu and the kernel): a diverged run must not look healthy.
        let special = [f32::NAN, -0.0, 0.0, -1.0, 2.0, f32::NEG_INFINITY];
        let mut o = poisoned(&b, special.len(), 7.0);
        b.relu_fwd(&up(&b, &special), &mut o).unwrap();
        let got = down(&b, &o);
        assert!(got[0].is_nan(), "relu(NaN) = {}", got[0]);
        assert_eq!(
            got[1..].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            [0.0f32, 0.0, 0.0, 2.0, 0.0].map(f32::to_bits)
        );
        let mut o = poisoned(&b, len, poison);
        b.relu_bwd(&up(&b, &relu_y), &up(&b, &dy), &mut o).unwrap();
        let want: Vec<f64> = x.iter().zip(&dy).map(|(&v, &d)| if v > 0.0 { d as f64 } else { 0.0 }).collect();
        assert_close_elementwise("relu bwd", &down(&b, &o), &want, 1e-6, 1e-6);

        let alpha = 0.7f32;
        let mut o = poisoned(&b, len, poison);
        b.elu_fwd(&up(&b, &x), alpha, &mut o).unwrap();
        let elu_y = down(&b, &o);
        let want: Vec<f64> =
            x.iter().map(|&v| if v > 0.0 { v as f64 } else { alpha as f64 * ((v as f64).exp() - 1.0) }).collect();
        assert_close_elementwise("elu", &elu_y, &want, 1e-5, 1e-6);
        let mut o = poisoned(&b, len, poison);
        b.elu_bwd(&up(&b, &x), &up(&b, &elu_y), &up(&b, &dy), alpha, &mut o).unwrap();
        let want: Vec<f64> = x
            .iter()
            .zip(&dy)
            .map(|(&v, &d)| if v > 0.0 { d as f64 } else { d as f64 * alpha as f64 * (v as f64).exp() })
            .collect();
        assert_close_elementwise("elu bwd", &down(&b, &o), &want, 1e-5, 1e-6);

        // Dropout: mask[i] = dropout_keep_scale(seed, i, p), y = x·mask, over several chunks.
        let (p, seed) = (0.4f32, 77u64);
        let (mut o, mut mask) = (poisoned(&b, len, poison), poisoned(&b, len, poison));
        b.dropout_fwd(&up(&b, &x), p, seed, &mut o, &mut mask).unwrap();
        let (ov, mv) = (down(&b, &o), down(&b, &mask));
        for i in 0..len {
            let want = rotvar::backend::cpu::dropout_keep_scale(seed, i as u64, p);
            assert_eq!(mv[i], want, "dropout mask at {i}");
            assert_eq!(ov[i], x[i] * want, "dropout output at {i}");
        }

        let mut acc = up(&b, &x);
        b.accumulate(&mut acc, &up(&b, &y2)).unwrap();
        let want: Vec<f64> = x.iter().zip(&y2).map(|(&a, &c)| (a + c) as f64).collect();
        assert_close_elementwise("accumulate", &down(&b, &acc), &want, 1e-6, 1e-6);

        let mut o = poisoned(&b, 1, poison);
        b.sum(&up(&b, &x), &mut o).unwrap();
        let want: f64 = f(&x).iter().sum();
        assert_close_scaled("sum", &down(&b, &o), &[want], 1e-6);
        let mut o = poisoned(&b, 77, poison);
        b.broadcast_scalar(&up(&b, &[3.0]), 0.25, &mut o).unwrap();
        assert_eq!(down(&b, &o), vec![0.75f32; 77]);

        let mut o = poisoned(&b, 4, poison);
        let xs = [
            1.0, 5.0, 5.0, -1.0, /**/ -3.0, -2.0, -9.0, -2.0, /**/ 0.0, 0.0, 0.0, 0.0, /**/ 1.0, 2.0,
            3.0, 4.0,
        ];
        b.argmax_rows(&up(&b, &xs), &mut o, 4, 4).unwrap();
        assert_eq!(down(&b, &o), vec![1.0, 1.0, 0.0, 3.0], "argmax: first maximum of each row");
    }
}

#[test]
fn gather_rows_copies_the_indexed_rows() {
    let b = cpu();
    let src: Vec<f32> = (0..5 * 3).map(|v| v as f32).collect();
    let mut dst = poisoned(&b, 4 * 3, f32::NAN);
    b.gather_rows(&up(&b, &src), 3, &[4, 0, 2, 4], &mut dst).unwrap();
    assert_eq!(down(&b, &dst), vec![12.0, 13.0, 14.0, 0.0, 1.0, 2.0, 6.0, 7.0, 8.0, 12.0, 13.0, 14.0]);
    assert!(b.gather_rows(&up(&b, &src), 3, &[5], &mut b.zeros(3).unwrap()).is_err());
}

// --- optimizers ------------------------------------------------------------------------------

/// torch.optim.Adam's single-tensor update, transcribed in f64 (weight decay as an L2 term):
///   grad = grad + wd·param
///   exp_avg.lerp_(grad, 1 − β1);  exp_avg_sq = β2·exp_avg_sq + (1 − β2)·grad²
///   step_size = lr / (1 − β1^t);  denom = sqrt(exp_avg_sq) / sqrt(1 − β2^t) + eps
///   param −= step_size · exp_avg / denom
struct TorchAdam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    wd: f64,
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl TorchAdam {
    fn step(&mut self, t: u32, g: &[f32]) {
        let bc1 = 1.0 - self.beta1.powi(t as i32);
        let bc2 = 1.0 - self.beta2.powi(t as i32);
        for i in 0..g.len() {
            let gi = g[i] as f64 + self.wd * self.p[i];
            self.m[i] += (gi - self.m[i]) * (1.0 - self.beta1);
            self.v[i] = self.v[i] * self.beta2 + (1.0 - self.beta2) * gi * gi;
            let denom = self.v[i].sqrt() / bc2.sqrt() + self.eps;
            self.p[i] -= self.lr / bc1 * self.m[i] / denom;
        }
    }
}

#[test]
fn adam_step_matches_torch_adam() {
    let b = cpu();
    let mut rng = Rng::new(10);
    let len = (1 << 14) + 1000;
    let h0 = AdamParams { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, step: 0 };
    let lr = h0.lr as f64;
    // Small parameters, so that f32 resolves an update of size ~lr to about 1e-6 of itself.
    let p0: Vec<f32> = (0..len).map(|_| 1e-2 * rng.normal()).collect();
    let (mut p, mut m, mut v) = (up(&b, &p0), b.zeros(len).unwrap(), b.zeros(len).unwrap());
    let zeros = vec![0.0f64; len];
    let p64: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    // The hyperparameters the backend receives (f32), exactly: torch.optim.Adam given these.
    let hyper = |p: Vec<f64>, m: Vec<f64>, v: Vec<f64>| TorchAdam {
        lr,
        beta1: h0.beta1 as f64,
        beta2: h0.beta2 as f64,
        eps: h0.eps as f64,
        wd: h0.weight_decay as f64,
        p,
        m,
        v,
    };
    let mut exact = hyper(p64.clone(), zeros.clone(), zeros.clone());
    // The decimal hyperparameters a PyTorch user writes (betas=(0.9, 0.999) as doubles).
    let mut decimal =
        TorchAdam { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, wd: 1e-2, p: p64, m: zeros.clone(), v: zeros };
    for step in 1..=6u32 {
        let g = randn(&mut rng, len);
        let (p_prev, m_prev, v_prev) = (down(&b, &p), down(&b, &m), down(&b, &v));
        // (a) One step from the backend's own state: no drift, so the tolerance can be tight.
        let mut one = hyper(f64s(&p_prev), f64s(&m_prev), f64s(&v_prev));
        one.step(step, &g);
        exact.step(step, &g);
        decimal.step(step, &g);
        b.adam_step(&mut p, &up(&b, &g), &mut m, &mut v, &AdamParams { step, ..h0 }).unwrap();
        let (pv, mv, vv) = (down(&b, &p), down(&b, &m), down(&b, &v));
        let mut worst = (0.0f64, 0usize);
        for i in 0..len {
            assert!(pv[i].is_finite(), "adam step {step}: param {i} is {}", pv[i]);
            // Relative to the update (at least lr, the update's natural scale).
            let upd = (one.p[i] - p_prev[i] as f64).abs().max(lr);
            let e = (pv[i] as f64 - one.p[i]).abs() / upd;
            if e > worst.0 {
                worst = (e, i);
            }
        }
        let i = worst.1;
        eprintln!("adam step {step}: worst param error {:.3e} of the update", worst.0);
        assert!(
            worst.0 < 1e-5,
            "adam step {step}: param {i}: got {}, torch.optim.Adam gives {} from the same state ({} before); \
             error {:.2e} of the update",
            pv[i],
            one.p[i],
            p_prev[i],
            worst.0
        );
        // Floors: f32 rounding is relative to the operands (|grad| ~ 1), not to a result that
        // happens to be near zero.
        assert_close_elementwise(&format!("adam step {step}: exp_avg"), &mv, &one.m, 1e-5, 1e-2);
        assert_close_elementwise(&format!("adam step {step}: exp_avg_sq"), &vv, &one.v, 1e-5, 1e-8);

        // (b) The whole trajectory from the start.
        assert_close_elementwise(&format!("adam step {step}: exp_avg (trajectory)"), &mv, &exact.m, 1e-5, 1e-2);
        assert_close_elementwise(&format!("adam step {step}: exp_avg_sq (trajectory)"), &vv, &exact.v, 1e-5, 1e-8);
        for (what, r) in [("trajectory", &exact), ("trajectory, decimal betas", &decimal)] {
            for i in 0..len {
                let e = (pv[i] as f64 - r.p[i]).abs();
                assert!(e < 1e-4 * lr, "adam step {step} ({what}): param {i}: got {}, want {}", pv[i], r.p[i]);
            }
        }
        // The params moved by about lr each step (so the comparison is not vacuous).
        let moved = pv.iter().zip(&p_prev).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / len as f64;
        assert!(moved > 0.2 * lr, "adam step {step}: params barely moved ({moved})");
    }
}

#[test]
fn sgd_step_matches_torch_sgd() {
    let b = cpu();
    let mut rng = Rng::new(11);
    let len = (1 << 14) + 777;
    for &(lr32, mom32, wd32) in &[(0.05f32, 0.9f32, 5e-4f32), (0.1, 0.0, 0.0), (0.01, 0.5, 0.1)] {
        let (lr, momentum, wd) = (lr32 as f64, mom32 as f64, wd32 as f64);
        let p0 = randn(&mut rng, len);
        let (mut p, mut vel) = (up(&b, &p0), b.zeros(len).unwrap());
        let mut pr: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut buf: Option<Vec<f64>> = None;
        for step in 1..=5 {
            let g = randn(&mut rng, len);
            // torch.optim.SGD (dampening 0, nesterov off): d_p = grad + wd·param;
            // buf = d_p on the first step, then buf = momentum·buf + d_p; param −= lr·buf.
            let d: Vec<f64> = (0..len).map(|i| g[i] as f64 + wd * pr[i]).collect();
            let bnew: Vec<f64> = match &buf {
                None => d.clone(),
                Some(bv) => (0..len).map(|i| momentum * bv[i] + d[i]).collect(),
            };
            let upd = if momentum != 0.0 { bnew.clone() } else { d };
            for i in 0..len {
                pr[i] -= lr * upd[i];
            }
            buf = Some(bnew);
            let h = SgdParams { lr: lr32, momentum: mom32, weight_decay: wd32 };
            b.sgd_step(&mut p, &up(&b, &g), &mut vel, &h).unwrap();
            assert_close_elementwise(
                &format!("sgd lr={lr} mom={momentum} wd={wd} step {step}"),
                &down(&b, &p),
                &pr,
                1e-5,
                1e-2,
            );
        }
    }
}

// --- determinism -----------------------------------------------------------------------------

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Conv forward/backward and linear forward/backward on inputs that span several chunks,
/// returned as raw bits.
fn chunked_results() -> Vec<Vec<u32>> {
    let b = cpu();
    let mut rng = Rng::new(12);
    // 101 images: 13 backward-weight chunks, enough for any reduction tree to show.
    let g = ConvGeom::new(101, 6, 9, 11, 10, (3, 3), 1, 1).unwrap();
    let x = up(&b, &randn(&mut rng, g.in_len()));
    let w = up(&b, &randn(&mut rng, g.weight_len()));
    let dy = up(&b, &randn(&mut rng, g.out_len()));
    let (mut y, mut dx, mut dw, mut db) = (
        b.zeros(g.out_len()).unwrap(),
        b.zeros(g.in_len()).unwrap(),
        b.zeros(g.weight_len()).unwrap(),
        b.zeros(g.c_out).unwrap(),
    );
    b.conv2d_fwd(&x, &w, None, Activation::Identity, &mut y, &g).unwrap();
    b.conv2d_bwd_data(&dy, &w, &mut dx, &g).unwrap();
    b.conv2d_bwd_weight(&x, &dy, &mut dw, Some(&mut db), &g).unwrap();

    let gp = ConvGeom::new(75, 16, 5, 5, 12, (1, 1), 1, 0).unwrap();
    let xp = up(&b, &randn(&mut rng, gp.in_len()));
    let dyp = up(&b, &randn(&mut rng, gp.out_len()));
    let mut dwp = b.zeros(gp.weight_len()).unwrap();
    b.conv2d_bwd_weight(&xp, &dyp, &mut dwp, None, &gp).unwrap();

    let (n, k, m) = (150, 300, 70);
    let lx = up(&b, &randn(&mut rng, n * k));
    let lw = up(&b, &randn(&mut rng, m * k));
    let ldy = up(&b, &randn(&mut rng, n * m));
    let (mut ly, mut ldx, mut ldw, mut ldb) =
        (b.zeros(n * m).unwrap(), b.zeros(n * k).unwrap(), b.zeros(m * k).unwrap(), b.zeros(m).unwrap());
    b.linear_fwd(&lx, &lw, None, Activation::Identity, &mut ly, n, k, m).unwrap();
    b.linear_bwd_data(&ldy, &lw, &mut ldx, n, k, m).unwrap();
    b.linear_bwd_weight(&lx, &ldy, &mut ldw, Some(&mut ldb), n, k, m).unwrap();

    [&y, &dx, &dw, &db, &dwp, &ly, &ldx, &ldw, &ldb].iter().map(|s| bits(&down(&b, s))).collect()
}

#[test]
fn results_are_bit_identical_across_thread_counts() -> Result<()> {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?.install(chunked_results);
    let four = rayon::ThreadPoolBuilder::new().num_threads(4).build()?.install(chunked_results);
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build()?.install(chunked_results);
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build()?.install(chunked_results);
    let names = [
        "conv y",
        "conv dx",
        "conv dw",
        "conv db",
        "pointwise conv dw",
        "linear y",
        "linear dx",
        "linear dw",
        "linear db",
    ];
    for (i, name) in names.iter().enumerate() {
        assert!(one[i].iter().any(|&b| b != 0), "{name}: all zero, the comparison would be vacuous");
        assert!(one[i] == four[i], "{name}: 1 thread and 4 threads differ in some bits");
        assert!(one[i] == three[i], "{name}: 1 thread and 3 threads differ in some bits");
        assert!(one[i] == two[i], "{name}: 1 thread and 2 threads differ in some bits");
    }
    Ok(())
}
