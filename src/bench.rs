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
pub fn train_throughput(
    b: &BackendRef,
    arch: &str,
    batch: usize,
    warmup: usize,
    steps: usize,
) -> Result<TrainThroughput> {
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

#[derive(Debug, Serialize)]
pub struct ConvTiming {
    pub layer: String,
    pub pass: String,
    pub shape: String,
    pub device: String,
    pub median_ms: f64,
    pub gflops: f64,
}

/// Convolution shapes of the models rotvar trains (batch 256, MNIST-sized SimpleConv and LeNet).
pub fn conv_shapes(batch: usize) -> Vec<(&'static str, crate::backend::ConvGeom)> {
    use crate::backend::ConvGeom;
    let g = |n, c, h, co, k, s, p| ConvGeom::new(n, c, h, h, co, (k, k), s, p).expect("valid shape");
    vec![
        ("simpleconv.conv1", g(batch, 1, 28, 32, 3, 1, 1)),
        ("simpleconv.conv2", g(batch, 32, 28, 32, 3, 1, 1)),
        ("simpleconv.conv3", g(batch, 32, 14, 64, 3, 1, 1)),
        ("simpleconv.conv4", g(batch, 64, 14, 64, 3, 1, 1)),
        ("simpleconv.conv5", g(batch, 64, 7, 128, 3, 1, 1)),
        ("lenet.conv2", g(batch, 6, 14, 16, 5, 1, 2)),
        ("lenet.conv3", g(batch, 16, 7, 120, 5, 1, 2)),
    ]
}

fn median_ms(b: &BackendRef, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    b.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        b.synchronize()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Median time and GFLOP/s of each convolution pass at the shapes of `conv_shapes`.
pub fn conv_timings(b: &BackendRef, batch: usize, reps: usize) -> Result<Vec<ConvTiming>> {
    let mut rng = Rng::new(3);
    let mut out = Vec::new();
    for (layer, g) in conv_shapes(batch) {
        let mut rand = |n: usize| -> Result<crate::backend::Storage> {
            let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            b.upload(&v)
        };
        let (x, w, bias, dy) = (rand(g.in_len())?, rand(g.weight_len())?, rand(g.c_out)?, rand(g.out_len())?);
        let (mut y, mut dx, mut dw, mut db) =
            (b.zeros(g.out_len())?, b.zeros(g.in_len())?, b.zeros(g.weight_len())?, b.zeros(g.c_out)?);
        let shape = format!("n{} c{} {}x{} -> {} k{} s{} p{}", g.n, g.c_in, g.h, g.w, g.c_out, g.kh, g.stride, g.pad);
        let passes: [(&str, f64); 3] = [
            ("forward", median_ms(b, reps, || b.conv2d_fwd(&x, &w, Some(&bias), &mut y, &g))?),
            ("backward_data", median_ms(b, reps, || b.conv2d_bwd_data(&dy, &w, &mut dx, &g))?),
            ("backward_weight", median_ms(b, reps, || b.conv2d_bwd_weight(&x, &dy, &mut dw, Some(&mut db), &g))?),
        ];
        for (pass, ms) in passes {
            out.push(ConvTiming {
                layer: layer.into(),
                pass: pass.into(),
                shape: shape.clone(),
                device: b.describe(),
                median_ms: ms,
                gflops: g.flops() / (ms * 1e-3) / 1e9,
            });
        }
    }
    Ok(out)
}
