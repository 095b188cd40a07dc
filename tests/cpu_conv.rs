//! The CPU convolution algorithms in training: Winograd (the default) against im2col, and
//! Winograd's determinism over thread counts. The only test binary that switches the
//! process-wide algorithm, so its tests cannot race with others'.

mod common;

use common::training::adam_steps_bits;
use rotvar::autograd::Tape;
use rotvar::backend::cpu::conv::{self, parse_algo};
use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::BackendRef;
use rotvar::models::{InputSpec, Model};
use rotvar::nn::Forward;
use rotvar::ops;
use rotvar::rng::Rng;
use rotvar::tensor::Tensor;
use std::sync::Mutex;

/// The algorithm is process-wide: tests that switch it take turns.
static ALGO_LOCK: Mutex<()> = Mutex::new(());

/// The MNIST-shaped batch of `images` that `seed` draws: inputs and labels.
fn batch(b: &BackendRef, seed: u64, images: usize) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let xs: Vec<f32> = (0..images * 784).map(|_| rng.normal()).collect();
    let ys: Vec<f32> = (0..images).map(|_| rng.below(10) as f32).collect();
    (Tensor::from_vec(b, &[images, 1, 28, 28], &xs).unwrap(), Tensor::from_vec(b, &[images], &ys).unwrap())
}

fn model(arch: &str, b: &BackendRef) -> Model {
    let input = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    Model::build(arch, input, b, 3).unwrap()
}

/// Every parameter's gradient of one training step of `arch` (fixed weights, the batch of
/// `seed`) under the convolution algorithm `algo`, by name.
fn gradients(arch: &str, algo: &str, seed: u64, images: usize) -> Vec<(String, Vec<f32>)> {
    conv::choose_algo(parse_algo(algo).unwrap());
    let b = CpuBackend::shared();
    let model = model(arch, &b);
    let (x, y) = batch(&b, seed, images);
    let tape = Tape::start().unwrap();
    let loss = ops::nll_loss(&model.forward(&x, &mut Forward::train(0)).unwrap(), &y).unwrap();
    let grads = tape.backward(&loss).unwrap();
    model
        .parameters()
        .into_iter()
        .map(|p| (p.name.clone(), grads.get(&p.tensor).expect("every parameter has a gradient").to_vec().unwrap()))
        .collect()
}

/// Where the backward pass sends each gradient under `algo`: every ReLU's mask, and the winner
/// of every 2×2 max-pool window (read from the activations the pools take in).
fn routing(arch: &str, algo: &str, seed: u64, images: usize) -> Vec<usize> {
    conv::choose_algo(parse_algo(algo).unwrap());
    let b = CpuBackend::shared();
    let model = model(arch, &b);
    let (x, _) = batch(&b, seed, images);
    let mut route = Vec::new();
    let mut see = |name: &str, t: &Tensor| {
        if name.ends_with(".act") {
            let v = t.to_vec()?;
            route.extend(v.iter().map(|v| (*v > 0.0) as usize));
            if let [n, c, h, w] = *t.shape() {
                for plane in v.chunks_exact(h * w).take(n * c) {
                    for (y, x) in (0..h / 2).flat_map(|y| (0..w / 2).map(move |x| (2 * y, 2 * x))) {
                        let at = [(y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1)].map(|(y, x)| y * w + x);
                        route.push(at.into_iter().max_by(|a, b| plane[*a].total_cmp(&plane[*b])).unwrap());
                    }
                }
            }
        }
        Ok(())
    };
    model.forward(&x, &mut Forward::observe(&mut see)).unwrap();
    route
}

/// One step's gradients of SimpleConv (four of its five convolutions go through Winograd
/// F(4,3)) and LeNet (its conv3 through F(4,5)), Winograd against im2col: every parameter's
/// gradient within 1e-3 of its largest value. Parameters after several Adam steps are not
/// compared: Adam divides by the gradient's running RMS, so a parameter whose gradient is near
/// zero moves by ±lr on a rounding difference.
///
/// The gradient is discontinuous at ReLU's kink and where a max-pool's two largest inputs tie:
/// a pre-activation of −1e-7 under one algorithm and +3e-8 under the other (a rounding
/// difference, seen on LeNet's conv3) moves a whole upstream gradient value from one place to
/// another. So the batch is one on which both algorithms route every gradient alike (the first
/// of a few seeds); the comparison then measures the rounding of the convolutions alone.
#[test]
fn winograd_gradients_match_im2col() {
    let _turn = ALGO_LOCK.lock().unwrap();
    for arch in ["simpleconv", "lenet"] {
        for algo in ["winograd", "winograd-f2"] {
            let seeds = 17..25;
            let seed = seeds
                .clone()
                .find(|&s| routing(arch, "im2col", s, 21) == routing(arch, algo, s, 21))
                .unwrap_or_else(|| {
                    panic!("{arch} {algo}: ReLU masks or pool winners differ from im2col on every seed in {seeds:?}")
                });
            let reference = gradients(arch, "im2col", seed, 21);
            let got = gradients(arch, algo, seed, 21);
            let mut differs = false;
            for ((name, g), (_, r)) in got.iter().zip(&reference) {
                let scale = r.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let err = g.iter().zip(r).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    scale > 0.0 && err <= 1e-3 * scale,
                    "{arch} {algo} {name}: {err} from im2col (scale {scale}, seed {seed})"
                );
                differs |= g.iter().zip(r).any(|(a, b)| a.to_bits() != b.to_bits());
            }
            // A control: the comparison sees which algorithm ran.
            assert!(differs, "{arch}: {algo} and im2col gave identical bits; the switch did nothing");
        }
    }
    conv::choose_algo(parse_algo("winograd").unwrap());
}

/// Three Adam steps of SimpleConv under Winograd (21 images: one full 16-image group and part of
/// a second) give the same bits on 1 and 2 threads.
#[test]
fn winograd_training_is_deterministic_over_threads() {
    let _turn = ALGO_LOCK.lock().unwrap();
    conv::choose_algo(parse_algo("winograd").unwrap());
    let one = adam_steps_bits("simpleconv", 1, 7, 21);
    let two = adam_steps_bits("simpleconv", 2, 7, 21);
    assert!(one == two, "Winograd training differs between 1 and 2 threads");
}

#[test]
fn unknown_algorithms_are_refused_by_name() {
    let err = parse_algo("fft").unwrap_err().to_string();
    assert!(err.contains("\"fft\"") && err.contains("winograd") && err.contains("im2col"), "{err}");
    assert!(parse_algo("Winograd-F2").is_ok() && parse_algo("im2col").unwrap().is_none());
}
