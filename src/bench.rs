//! Benchmarks behind `rotvar bench`: the same measurement the PyTorch reference scripts under
//! `benches/` make, printed in the same JSON-lines format so the two can be compared side by
//! side in one run (benches/run_train_throughput.sh).

use crate::autograd::Tape;
use crate::backend::BackendRef;
use crate::models::{InputSpec, Model};
use crate::nn::Forward;
use crate::ops;
use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct TrainThroughput {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub model: String,
    pub device: String,
    pub threads: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub images_per_second: f64,
    /// Median seconds per training step.
    pub median_step_seconds: f64,
}

/// Time full training steps (forward, backward, Adam) of `arch` on random MNIST-shaped data.
pub fn train_throughput(b: &BackendRef, arch: &str, batch: usize, warmup: usize, steps: usize) -> Result<TrainThroughput> {
    let input = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let model = Model::build(arch, input, b, 0)?;
    let mut opt = Optimizer::new(OptimConfig::new(OptimizerKind::Adam, 1e-3, 0.0), model.parameters())?;
    let mut rng = Rng::new(1);
    let xs: Vec<f32> = (0..batch * 28 * 28).map(|_| rng.normal()).collect();
    let ys: Vec<f32> = (0..batch).map(|_| rng.below(10) as f32).collect();
    let x = Tensor::from_vec(b, &[batch, 1, 28, 28], &xs)?;
    let y = Tensor::from_vec(b, &[batch], &ys)?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t = Instant::now();
        let tape = Tape::start()?;
        let loss = ops::nll_loss(&model.forward(&x, &mut Forward::train(i as u64))?, &y)?;
        let grads = tape.backward(&loss)?;
        opt.step(&grads)?;
        b.synchronize()?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let total: f64 = times.iter().sum();
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(TrainThroughput {
        implementation: "rotvar".into(),
        model: arch.into(),
        device: b.describe(),
        threads: rayon::current_num_threads(),
        batch_size: batch,
        steps,
        images_per_second: (batch * steps) as f64 / total,
        median_step_seconds: times[times.len() / 2],
    })
}
