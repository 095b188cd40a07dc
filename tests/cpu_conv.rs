//! The CPU convolution algorithms in training: Winograd (the default) against im2col, and
//! Winograd's determinism over thread counts. The only test binary that switches the
//! process-wide algorithm, so its tests cannot race with others'.

mod common;

use common::training::adam_steps_bits;
use rotvar::autograd::Tape;
use rotvar::backend::cpu::conv::{self, parse_algo};
use rotvar::backend::cpu::CpuBackend;
use rotvar::models::{InputSpec, Model};
use rotvar::nn::Forward;
use rotvar::ops;
use rotvar::rng::Rng;
use rotvar::tensor::Tensor;
use std::sync::Mutex;

/// The algorithm is process-wide: tests that switch it take turns.
static ALGO_LOCK: Mutex<()> = Mutex::new(());

/// Every parameter's gradient of one training step of `arch` (fixed weights, fixed random
/// MNIST-shaped batch of `images`) under the convolution algorithm `algo`, by name.
fn gradients(arch: &str, algo: &str, images: usize) -> Vec<(String, Vec<f32>)> {
    conv::choose_algo(parse_algo(algo).unwrap());
    let b = CpuBackend::shared();
    let input = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let model = Model::build(arch, input, &b, 3).unwrap();
    let mut rng = Rng::new(17);
    let xs: Vec<f32> = (0..images * 784).map(|_| rng.normal()).collect();
    let ys: Vec<f32> = (0..images).map(|_| rng.below(10) as f32).collect();
    let x = Tensor::from_vec(&b, &[images, 1, 28, 28], &xs).unwrap();
    let y = Tensor::from_vec(&b, &[images], &ys).unwrap();
    let tape = Tape::start().unwrap();
    let loss = ops::nll_loss(&model.forward(&x, &mut Forward::train(0)).unwrap(), &y).unwrap();
    let grads = tape.backward(&loss).unwrap();
    model
        .parameters()
        .into_iter()
        .map(|p| (p.name.clone(), grads.get(&p.tensor).expect("every parameter has a gradient").to_vec().unwrap()))
        .collect()
}

/// One step's gradients of SimpleConv (four of its five convolutions go through Winograd
/// F(4,3)) and LeNet (its conv3 through F(4,5)), Winograd against im2col: every parameter's
/// gradient within 1e-3 of its largest value. Parameters after several Adam steps are not
/// compared: Adam divides by the gradient's running RMS, so a parameter whose gradient is near
/// zero moves by ±lr on a rounding difference.
#[test]
fn winograd_gradients_match_im2col() {
    let _turn = ALGO_LOCK.lock().unwrap();
    for arch in ["simpleconv", "lenet"] {
        let reference = gradients(arch, "im2col", 21);
        for algo in ["winograd", "winograd-f2"] {
            let got = gradients(arch, algo, 21);
            let mut differs = false;
            for ((name, g), (_, r)) in got.iter().zip(&reference) {
                let scale = r.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let err = g.iter().zip(r).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(scale > 0.0 && err <= 1e-3 * scale, "{arch} {algo} {name}: {err} from im2col (scale {scale})");
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
