//! The CPU convolution algorithms in training: Winograd (the default) against im2col, and
//! Winograd's determinism over thread counts. The only test binary that switches the
//! process-wide algorithm, so its tests cannot race with others'.

mod common;

use common::training::adam_steps_bits;
use rotvar::backend::cpu::conv::{self, parse_algo};
use std::sync::Mutex;

/// The algorithm is process-wide: tests that switch it take turns.
static ALGO_LOCK: Mutex<()> = Mutex::new(());

fn train(algo: &str, threads: usize) -> Vec<(String, Vec<u32>)> {
    conv::choose_algo(parse_algo(algo).unwrap());
    adam_steps_bits("simpleconv", threads, 7, 21)
}

/// Three Adam steps of SimpleConv (four of its five convolutions go through Winograd; 21 images
/// fill one 16-image group and part of a second): Winograd gives the same bits on 1 and 2
/// threads, differs from im2col (so the test sees which ran), and stays within 1e-3 of it.
#[test]
fn winograd_training_is_deterministic_and_close_to_im2col() {
    let _turn = ALGO_LOCK.lock().unwrap();
    let one = train("winograd", 1);
    let two = train("winograd", 2);
    let f2 = train("winograd-f2", 2);
    let im2col = train("im2col", 2);
    conv::choose_algo(parse_algo("winograd").unwrap());
    assert!(one == two, "Winograd training differs between 1 and 2 threads");
    assert!(one != im2col, "Winograd and im2col gave identical bits: the switch did nothing");
    assert!(f2 != one, "F(2,3) and F(4,3) gave identical bits: the switch did nothing");
    for run in [&one, &f2] {
        for ((name, w), (_, r)) in run.iter().zip(&im2col) {
            let (w, r): (Vec<f32>, Vec<f32>) =
                (w.iter().map(|b| f32::from_bits(*b)).collect(), r.iter().map(|b| f32::from_bits(*b)).collect());
            let scale = r.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = w.iter().zip(&r).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-3 * scale, "{name}: Winograd is {err} from im2col (scale {scale})");
        }
    }
}

#[test]
fn unknown_algorithms_are_refused_by_name() {
    let err = parse_algo("fft").unwrap_err().to_string();
    assert!(err.contains("\"fft\"") && err.contains("winograd") && err.contains("im2col"), "{err}");
    assert!(parse_algo("Winograd-F2").is_ok() && parse_algo("im2col").unwrap().is_none());
}
