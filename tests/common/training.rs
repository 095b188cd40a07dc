//! A few Adam steps of a model on fixed random data, as bits: the unit of the determinism tests.

use rotvar::autograd::Tape;
use rotvar::backend::cpu::CpuBackend;
use rotvar::models::{InputSpec, Model};
use rotvar::nn::Forward;
use rotvar::ops;
use rotvar::optim::{OptimConfig, Optimizer, OptimizerKind};
use rotvar::rng::Rng;
use rotvar::tensor::Tensor;

/// Train `arch` (weights from `seed`) for three Adam steps on `images` random MNIST-shaped
/// images, on `threads` CPU threads, and return every state tensor's bits by name.
pub fn adam_steps_bits(arch: &str, threads: usize, seed: u64, images: usize) -> Vec<(String, Vec<u32>)> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let b = CpuBackend::shared();
        let input = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
        let model = Model::build(arch, input, &b, seed).unwrap();
        let mut opt = Optimizer::new(OptimConfig::new(OptimizerKind::Adam, 1e-3, 1e-4), model.parameters()).unwrap();
        let mut rng = Rng::new(99);
        let xs: Vec<f32> = (0..images * 784).map(|_| rng.normal()).collect();
        let ys: Vec<f32> = (0..images).map(|_| rng.below(10) as f32).collect();
        let x = Tensor::from_vec(&b, &[images, 1, 28, 28], &xs).unwrap();
        let y = Tensor::from_vec(&b, &[images], &ys).unwrap();
        for step in 0..3 {
            let tape = Tape::start().unwrap();
            let loss = ops::nll_loss(&model.forward(&x, &mut Forward::train(step)).unwrap(), &y).unwrap();
            opt.step(&tape.backward(&loss).unwrap()).unwrap();
        }
        model.state().into_iter().map(|(n, t)| (n, t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect())).collect()
    })
}
