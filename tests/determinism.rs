//! Same seed, same device, same build: same numbers, whatever the thread count.

use rotvar::autograd::Tape;
use rotvar::backend::cpu::CpuBackend;
use rotvar::models::{InputSpec, Model};
use rotvar::nn::Forward;
use rotvar::ops;
use rotvar::optim::{OptimConfig, Optimizer, OptimizerKind};
use rotvar::rng::Rng;
use rotvar::tensor::Tensor;

/// Train `arch` for a few Adam steps on fixed random data and return every state tensor's bits.
fn train_bits(arch: &str, threads: usize, seed: u64) -> Vec<(String, Vec<u32>)> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let b = CpuBackend::shared();
        let input = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
        let model = Model::build(arch, input, &b, seed).unwrap();
        let mut opt = Optimizer::new(OptimConfig::new(OptimizerKind::Adam, 1e-3, 1e-4), model.parameters()).unwrap();
        let mut rng = Rng::new(99);
        // 19 images: not a multiple of any internal chunk size.
        let n = 19;
        let xs: Vec<f32> = (0..n * 784).map(|_| rng.normal()).collect();
        let ys: Vec<f32> = (0..n).map(|_| rng.below(10) as f32).collect();
        let x = Tensor::from_vec(&b, &[n, 1, 28, 28], &xs).unwrap();
        let y = Tensor::from_vec(&b, &[n], &ys).unwrap();
        for step in 0..3 {
            let tape = Tape::start().unwrap();
            let loss = ops::nll_loss(&model.forward(&x, &mut Forward::train(step)).unwrap(), &y).unwrap();
            let grads = tape.backward(&loss).unwrap();
            opt.step(&grads).unwrap();
        }
        model.state().into_iter().map(|(n, t)| (n, t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect())).collect()
    })
}

#[test]
fn training_is_bit_identical_across_thread_counts() {
    for arch in ["lenet", "simpleconv"] {
        let one = train_bits(arch, 1, 7);
        let three = train_bits(arch, 3, 7);
        assert_eq!(one.len(), three.len());
        for ((name, a), (_, b)) in one.iter().zip(&three) {
            assert!(a == b, "{arch}: {name} differs between 1 and 3 threads");
        }
    }
}

#[test]
fn different_seeds_give_different_weights() {
    let a = train_bits("lenet", 2, 1);
    let b = train_bits("lenet", 2, 2);
    assert!(a.iter().zip(&b).any(|((_, x), (_, y))| x != y), "seed has no effect");
}
