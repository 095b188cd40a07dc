//! Benchmarks behind `rotvar bench`: the same measurement the PyTorch reference scripts under
//! `benches/` make, printed in the same JSON-lines format so the two can be compared side by
//! side in one run (benches/run_train_throughput.sh).

use crate::autograd::Tape;
use crate::backend::{Activation, BackendRef};
use crate::models::{InputSpec, Model};
use crate::nn::Forward;
use crate::ops;
use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
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
    /// Wall-clock seconds of the timed steps divided by their number.
    pub mean_step_seconds: f64,
    /// Kernels the host launched per training step (CUDA backend only): 0 when every step
    /// is a graph replay.
    pub kernel_launches_per_step: Option<f64>,
    /// Graph replays per training step (CUDA backend only; ROTVAR_CUDA_GRAPHS=0 turns them off).
    pub graph_replays_per_step: Option<f64>,
    /// Kernels one replay runs: the step's kernel count when it is a graph.
    pub kernels_per_replay: Option<usize>,
}

/// Time full training steps (forward, backward, Adam) of `arch` on random MNIST-shaped data,
/// the way `benches/torch_reference.py` times PyTorch: `steps` steps back to back after
/// `warmup`, one synchronize at the end, so a GPU overlaps a step's launches with the previous
/// step's kernels (as `rotvar train` does).
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
    if b.graph_replays().is_some() {
        return fed_throughput(b, arch, model, opt, (&xs, &ys), batch, warmup, steps);
    }
    let x = Tensor::from_vec(b, &[batch, 1, 28, 28], &xs)?;
    let y = Tensor::from_vec(b, &[batch], &ys)?;
    let timing = time_steps(b, warmup, steps, |i| {
        let tape = Tape::start()?;
        let loss = ops::nll_loss(&model.forward(&x, &mut Forward::train(i as u64))?, &y)?;
        let grads = tape.backward(&loss)?;
        opt.step(&grads)
    })?;
    Ok(TrainThroughput::measured(b, arch, batch, steps, timing, None))
}

/// Seconds of `steps` timed steps after `warmup` untimed ones, between synchronizations, and per
/// timed step the kernels the host launched and the graph replays (where the backend counts them).
struct StepTiming {
    seconds: f64,
    launches: Option<f64>,
    replays: Option<f64>,
}

fn time_steps(
    b: &BackendRef,
    warmup: usize,
    steps: usize,
    mut step: impl FnMut(usize) -> Result<()>,
) -> Result<StepTiming> {
    for i in 0..warmup {
        step(i)?;
    }
    b.synchronize()?;
    let (launches, replays) = (b.kernel_launches(), b.graph_replays());
    let t = Instant::now();
    for i in warmup..warmup + steps {
        step(i)?;
    }
    b.synchronize()?;
    let seconds = t.elapsed().as_secs_f64();
    let per_step =
        |before: Option<u64>, after: Option<u64>| before.zip(after).map(|(x, y)| (y - x) as f64 / steps.max(1) as f64);
    Ok(StepTiming {
        seconds,
        launches: per_step(launches, b.kernel_launches()),
        replays: per_step(replays, b.graph_replays()),
    })
}

impl TrainThroughput {
    fn measured(
        b: &BackendRef,
        arch: &str,
        batch: usize,
        steps: usize,
        t: StepTiming,
        kernels_per_replay: Option<usize>,
    ) -> Self {
        TrainThroughput {
            implementation: "rotvar".into(),
            model: arch.into(),
            device: b.describe(),
            threads: rayon::current_num_threads(),
            batch_size: batch,
            steps,
            images_per_second: (batch * steps) as f64 / t.seconds,
            mean_step_seconds: t.seconds / steps as f64,
            kernel_launches_per_step: t.launches,
            graph_replays_per_step: t.replays,
            kernels_per_replay,
        }
    }
}

/// `train_throughput` on a backend with graphs: the step `rotvar train` runs there
/// (train/feed.rs), fed from device tables and, after its warm-up, one graph replay. Every step
/// trains on the same batch, as the PyTorch reference does.
#[allow(clippy::too_many_arguments)]
fn fed_throughput(
    b: &BackendRef,
    arch: &str,
    model: Model,
    mut opt: Optimizer,
    (xs, ys): (&[f32], &[f32]),
    batch: usize,
    warmup: usize,
    steps: usize,
) -> Result<TrainThroughput> {
    use crate::train::{feed::Feed, DeviceDataset, TrainConfig};
    let data = DeviceDataset {
        images: Tensor::from_vec(b, &[batch, 1, 28, 28], xs)?,
        labels: Tensor::from_vec(b, &[batch], ys)?,
        labels_host: ys.iter().map(|&v| v as u8).collect(),
        item_shape: [1, 28, 28],
        num_classes: 10,
        fill: vec![0.0],
    };
    let cfg = TrainConfig {
        model: arch.into(),
        dataset: "random".into(),
        epochs: 1,
        batch_size: batch,
        optim: OptimConfig::new(OptimizerKind::Adam, 1e-3, 0.0),
        seed: 0,
        augment: crate::augment::Augment::NONE,
    };
    let rows = warmup + steps;
    let mut feed = Feed::build(&data, &cfg, crate::train::feed::mode(), rows)?
        .ok_or_else(|| anyhow::anyhow!("internal: no feed on a backend with graphs"))?;
    let order: Vec<u32> = (0..rows).flat_map(|_| 0..batch as u32).collect();
    feed.begin_epoch(&order, &cfg, &mut Rng::new(0), &opt, |j| j as u64)?;
    let timing = time_steps(b, warmup, steps, |_| feed.step(&model, &data, &mut opt))?;
    Ok(TrainThroughput::measured(b, arch, batch, steps, timing, feed.graph_kernels()))
}

#[derive(Debug, Serialize)]
pub struct ConvTiming {
    pub layer: String,
    pub pass: String,
    pub shape: String,
    pub device: String,
    /// `--precision` of the pass (fp32, tf32, 3xtf32, bf16).
    pub precision: String,
    pub median_ms: f64,
    pub gflops: f64,
    /// The fp32 FMA ceiling measured on the same device in the same run (`Backend::peak_fma`),
    /// and this pass's share of it; GPU only (the CPU probe is not a meaningful ceiling).
    pub ceiling_gflops: Option<f64>,
    pub fraction_of_ceiling: Option<f64>,
}

/// Convolution shapes of the models rotvar trains (MNIST-sized SimpleConv and LeNet) and of a
/// CIFAR ResNet-18 (docs/protocol.md: 64/128/256/512 channels at 32/16/8/4 pixels), named
/// `model.layer`.
pub fn conv_shapes(batch: usize) -> Vec<(&'static str, crate::backend::ConvGeom)> {
    use crate::backend::ConvGeom;
    let g = |n, c, h, co, k, s, p| ConvGeom::new(n, c, h, h, co, (k, k), s, p).expect("valid shape");
    vec![
        ("simpleconv.conv1", g(batch, 1, 28, 32, 3, 1, 1)),
        ("simpleconv.conv2", g(batch, 32, 28, 32, 3, 1, 1)),
        ("simpleconv.conv3", g(batch, 32, 14, 64, 3, 1, 1)),
        ("simpleconv.conv4", g(batch, 64, 14, 64, 3, 1, 1)),
        ("simpleconv.conv5", g(batch, 64, 7, 128, 3, 1, 1)),
        ("lenet.conv1", g(batch, 1, 28, 6, 5, 1, 2)),
        ("lenet.conv2", g(batch, 6, 14, 16, 5, 1, 2)),
        ("lenet.conv3", g(batch, 16, 7, 120, 5, 1, 2)),
        ("resnet18.conv1", g(batch, 3, 32, 64, 3, 1, 1)),
        ("resnet18.layer1", g(batch, 64, 32, 64, 3, 1, 1)),
        ("resnet18.layer2.down", g(batch, 64, 32, 128, 3, 2, 1)),
        ("resnet18.layer2.shortcut", g(batch, 64, 32, 128, 1, 2, 0)),
        ("resnet18.layer2", g(batch, 128, 16, 128, 3, 1, 1)),
        ("resnet18.layer3", g(batch, 256, 8, 256, 3, 1, 1)),
        ("resnet18.layer4", g(batch, 512, 4, 512, 3, 1, 1)),
    ]
}

/// The fp32 FMA throughput of `b` in GFLOP/s, from `Backend::peak_fma`. The probe grows (more
/// threads, then longer chains) until one run takes at least 5 ms, so that launch overhead is
/// negligible on a GPU (about 4M threads × 16384 steps on an H100) while the kernel emulator
/// stops at the first, small size.
pub fn fma_ceiling_gflops(b: &BackendRef, reps: usize) -> Result<f64> {
    let (mut n, mut iters) = (1usize << 12, 256usize);
    loop {
        let mut out = b.alloc(n)?;
        let mut probe = || b.peak_fma(&mut out, 0.999, 0.001, iters);
        // One untimed call, one timed: the sizing needs no warm-up (the measurement below has it).
        probe()?;
        let ms = b.time_ms(&mut probe)?;
        if ms >= 5.0 || iters >= 1 << 16 {
            let ms = median_ms(b, reps, probe)?;
            return Ok(16.0 * iters as f64 * n as f64 / (ms * 1e-3) / 1e9);
        }
        if n < 1 << 22 {
            n *= 4;
        } else {
            iters *= 4;
        }
    }
}

/// How long [`median_ms`] runs a pass before timing it.
const WARMUP: std::time::Duration = std::time::Duration::from_millis(300);

/// Median over `reps` of the device time of `f` (CUDA events on a GPU), after warming up for
/// [`WARMUP`] (at least one call). On a 2-vCPU VM two threads were seen to run no faster than
/// one for the first few hundred milliseconds of a process: a pass timed then ran at the
/// one-thread speed (LeNet conv2's forward 1.5 ms, against 0.9 ms once warm).
fn median_ms(b: &BackendRef, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    loop {
        f()?;
        b.synchronize()?;
        if start.elapsed() >= WARMUP {
            break;
        }
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        t.push(b.time_ms(&mut f)?);
    }
    Ok(median(t))
}

/// Median time and GFLOP/s of each convolution pass at the shapes of `conv_shapes` whose model
/// (`lenet`) or layer (`lenet.conv2`) is one of `models`; on a GPU also the share of the
/// measured FMA ceiling.
pub fn conv_timings(b: &BackendRef, batch: usize, reps: usize, models: &[&str]) -> Result<Vec<ConvTiming>> {
    let shapes: Vec<_> = conv_shapes(batch)
        .into_iter()
        .filter(|(layer, _)| models.iter().any(|m| layer.split('.').next() == Some(*m) || layer == m))
        .collect();
    if shapes.is_empty() {
        let layers: Vec<_> = conv_shapes(batch).into_iter().map(|(l, _)| l).collect();
        bail!(
            "no convolution shapes for {models:?}: name a model (lenet, simpleconv, resnet18) or a layer ({})",
            layers.join(", ")
        );
    }
    let ceiling = match b.device() {
        crate::backend::Device::Cuda(_) => Some(fma_ceiling_gflops(b, reps)?),
        crate::backend::Device::Cpu => None,
    };
    let mut rng = Rng::new(3);
    let mut out = Vec::new();
    for (layer, g) in shapes {
        let mut rand = |n: usize| -> Result<crate::backend::Storage> {
            let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            b.upload(&v)
        };
        let (x, w, bias, dy) = (rand(g.in_len())?, rand(g.weight_len())?, rand(g.c_out)?, rand(g.out_len())?);
        let (mut y, mut dx, mut dw, mut db) =
            (b.zeros(g.out_len())?, b.zeros(g.in_len())?, b.zeros(g.weight_len())?, b.zeros(g.c_out)?);
        let shape = format!("n{} c{} {}x{} -> {} k{} s{} p{}", g.n, g.c_in, g.h, g.w, g.c_out, g.kh, g.stride, g.pad);
        let passes: [(&str, f64); 3] = [
            ("forward", median_ms(b, reps, || b.conv2d_fwd(&x, &w, Some(&bias), Activation::Identity, &mut y, &g))?),
            ("backward_data", median_ms(b, reps, || b.conv2d_bwd_data(&dy, &w, &mut dx, &g))?),
            ("backward_weight", median_ms(b, reps, || b.conv2d_bwd_weight(&x, &dy, &mut dw, Some(&mut db), &g))?),
        ];
        for (pass, ms) in passes {
            out.push(ConvTiming {
                layer: layer.into(),
                pass: pass.into(),
                shape: shape.clone(),
                device: b.describe(),
                precision: b.precision().name().into(),
                median_ms: ms,
                gflops: g.flops() / (ms * 1e-3) / 1e9,
                ceiling_gflops: ceiling,
                fraction_of_ceiling: ceiling.map(|c| g.flops() / (ms * 1e-3) / 1e9 / c),
            });
        }
    }
    Ok(out)
}

/// `(model.layer, outputs, inputs)` of every dense layer of the models named in `models` (as a
/// model, or by one of its layers: `lenet.conv2` names LeNet), each model once, built for MNIST's
/// 1×28×28 input.
fn dense_layers(b: &BackendRef, models: &[&str]) -> Result<Vec<(String, usize, usize)>> {
    let mut archs: Vec<&str> = Vec::new();
    for arch in models.iter().filter_map(|m| m.split('.').next()) {
        if !archs.contains(&arch) {
            archs.push(arch);
        }
    }
    let mut out = Vec::new();
    for arch in archs {
        let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
        let model = Model::build(arch, spec, b, 0)?;
        for (name, layer) in &model.net.layers {
            if let crate::nn::Layer::Linear(l) = layer {
                out.push((format!("{arch}.{name}"), l.weight.dim(0), l.weight.dim(1)));
            }
        }
    }
    Ok(out)
}

/// One GEMM variant of kernels/gemm.cu at one shape (`rotvar bench gemm`).
#[derive(Debug, Serialize)]
pub struct GemmTiming {
    /// `model.layer` of a dense layer's forward at the batch size, or `square`.
    pub shape: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `v1`, `v2`, `v3 split-K S` (S slices, as the backend splits this shape; 1: whole),
    /// `v3 split-K S +bias+relu`, `v2+bias+relu` (fused epilogue) or `v2+bias, relu kernel`
    /// (unfused).
    pub variant: String,
    pub device: String,
    /// The arithmetic of the variant: v1 is always fp32; the others follow `--precision` (the
    /// tensor-core kernels where it is not fp32).
    pub precision: String,
    pub median_ms: f64,
    pub gflops: f64,
    pub ceiling_gflops: Option<f64>,
    pub fraction_of_ceiling: Option<f64>,
}

/// The GEMM variants side by side: v1 against v2 (register prefetch), v3 (v2 with the
/// reduction split over more blocks, what the backend runs when v2's tiles cannot fill the GPU)
/// and v4 (128 × 128 tiles, 8 × 8 per thread; fp32)
/// on the dense layers' forward shapes of `models` at `batch` rows and on a 2048³ square, and
/// v2's fused bias + ReLU epilogue against the same GEMM followed by a separate ReLU kernel.
pub fn gemm_timings(
    cuda: &std::sync::Arc<crate::backend::cuda::CudaBackend>,
    batch: usize,
    reps: usize,
    models: &[&str],
) -> Result<Vec<GemmTiming>> {
    let b: BackendRef = cuda.clone();
    let mut shapes: Vec<_> =
        dense_layers(&b, models)?.into_iter().map(|(name, out, inp)| (name, batch, out, inp)).collect();
    let square = if cuda.is_emulated() { 96 } else { 2048 };
    shapes.push(("square".into(), square, square, square));
    let ceiling = if cuda.is_emulated() { None } else { Some(fma_ceiling_gflops(&b, reps)?) };
    let mut rng = Rng::new(5);
    let mut out = Vec::new();
    for (shape, m, n, k) in shapes {
        let mut rand = |len: usize| -> Result<crate::backend::Storage> {
            b.upload(&(0..len).map(|_| rng.normal()).collect::<Vec<f32>>())
        };
        let (x, w, bias) = (rand(m * k)?, rand(n * k)?, rand(n)?);
        let (mut y, mut z) = (b.zeros(m * n)?, b.zeros(m * n)?);
        let (id, relu) = (Activation::Identity, Activation::Relu);
        let dims = (m, n, k);
        let v3 = format!("v3 split-K {}", cuda.gemm_splits(m, n, k));
        let v3_epilogue = format!("{v3} +bias+relu");
        let mut rows: Vec<(&str, f64)> = vec![
            ("v1", median_ms(&b, reps, || cuda.gemm_variant(1, &x, &w, None, id, &mut y, dims))?),
            ("v2", median_ms(&b, reps, || cuda.gemm_variant(2, &x, &w, None, id, &mut y, dims))?),
            (&v3, median_ms(&b, reps, || cuda.gemm_variant(3, &x, &w, None, id, &mut y, dims))?),
            (&v3_epilogue, median_ms(&b, reps, || cuda.gemm_variant(3, &x, &w, Some(&bias), relu, &mut y, dims))?),
            ("v2+bias+relu", median_ms(&b, reps, || cuda.gemm_variant(2, &x, &w, Some(&bias), relu, &mut y, dims))?),
            (
                "v2+bias, relu kernel",
                median_ms(&b, reps, || {
                    cuda.gemm_variant(2, &x, &w, Some(&bias), id, &mut z, dims)?;
                    b.relu_fwd(&z, &mut y)
                })?,
            ),
        ];
        // v4 (128 × 128 tiles) has no tensor-core twin; v5 (v4 filled by cp.async) has one.
        if b.precision() == crate::backend::Precision::Fp32 {
            rows.push(("v4", median_ms(&b, reps, || cuda.gemm_variant(4, &x, &w, None, id, &mut y, dims))?));
        }
        rows.push(("v5", median_ms(&b, reps, || cuda.gemm_variant(5, &x, &w, None, id, &mut y, dims))?));
        let flops = 2.0 * (m * n * k) as f64;
        for (variant, ms) in rows {
            let gflops = flops / (ms * 1e-3) / 1e9;
            out.push(GemmTiming {
                shape: shape.clone(),
                m,
                n,
                k,
                variant: variant.into(),
                device: b.describe(),
                precision: if variant == "v1" { "fp32".into() } else { b.precision().name().into() },
                median_ms: ms,
                gflops,
                ceiling_gflops: ceiling,
                fraction_of_ceiling: ceiling.map(|c| gflops / c),
            });
        }
    }
    Ok(out)
}

/// The rotation kernel's effective bandwidth next to the driver's device-to-device copy of the
/// same bytes (each reads and writes every value once), on `images` MNIST-sized images.
#[derive(Debug, Serialize)]
pub struct RotateBandwidth {
    pub device: String,
    pub images: usize,
    pub megabytes_moved: f64,
    pub rotate_gb_per_s: f64,
    pub copy_gb_per_s: f64,
    /// rotate / copy.
    pub ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn rotate_bandwidth(b: &BackendRef, images: usize, reps: usize) -> Result<RotateBandwidth> {
    use crate::backend::{rotation_matrix, Interp, RotateGeom};
    let g = RotateGeom { n: images, c: 1, h: 28, w: 28 };
    let mut rng = Rng::new(5);
    let x = b.upload(&(0..g.len()).map(|_| rng.normal()).collect::<Vec<f32>>())?;
    let mats: Vec<crate::backend::Affine> = (0..images).map(|i| rotation_matrix(i as f32 * 7.3)).collect();
    let mut y = b.alloc(g.len())?;
    let (mut t_rot, mut t_copy) = (Vec::new(), Vec::new());
    // Alternating, so drift in clocks or load hits both alike; two warm-up rounds.
    for i in 0..reps + 2 {
        let r = b.time_ms(&mut || b.warp(&x, &mats, Interp::Bilinear, &[-0.42], &mut y, &g))?;
        let c = b.time_ms(&mut || b.copy(&x, &mut y, g.len()))?;
        if i >= 2 {
            t_rot.push(r);
            t_copy.push(c);
        }
    }
    let bytes = 2.0 * 4.0 * g.len() as f64;
    let (rot, copy) = (bytes / (median(t_rot) * 1e-3) / 1e9, bytes / (median(t_copy) * 1e-3) / 1e9);
    Ok(RotateBandwidth {
        device: b.describe(),
        images,
        megabytes_moved: bytes / 1e6,
        rotate_gb_per_s: rot,
        copy_gb_per_s: copy,
        ratio: rot / copy,
    })
}

/// A test set of random MNIST-shaped images with balanced labels, on `b` (benchmarks only).
fn random_test_set(b: &BackendRef, images: usize) -> Result<crate::train::DeviceDataset> {
    let mut rng = Rng::new(9);
    let pixels: Vec<u8> = (0..images * 784).map(|_| (rng.next_u64() >> 56) as u8).collect();
    let ds = crate::data::Dataset {
        name: "random".into(),
        split: crate::data::Split::Test,
        images: pixels,
        labels: (0..images).map(|i| (i % 10) as u8).collect(),
        n: images,
        channels: 1,
        height: 28,
        width: 28,
        class_names: (0..10).map(|c| c.to_string()).collect(),
    };
    crate::train::DeviceDataset::upload(&ds, &ds.channel_stats(), b)
}

#[derive(Debug, Serialize)]
pub struct RotatedEval {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub model: String,
    pub device: String,
    pub images: usize,
    pub angles: usize,
    pub seconds: f64,
    pub rotated_images_per_second: f64,
}

/// `eval --angles` of `arch` (random weights) over `images` test images × `angles` angles: the
/// same work as benches/torch_rotated_eval.py (affine_grid + grid_sample + the same model).
pub fn rotated_eval(b: &BackendRef, arch: &str, images: usize, angles: usize, batch: usize) -> Result<RotatedEval> {
    let model = Model::build(arch, InputSpec { channels: 1, height: 28, width: 28, classes: 10 }, b, 0)?;
    let data = random_test_set(b, images)?;
    let set: Vec<f32> = (0..angles).map(|i| 360.0 * i as f32 / angles as f32).collect();
    let names: Vec<String> = (0..10).map(|c| c.to_string()).collect();
    // Warm-up on a slice, then the timed run.
    crate::angle_eval::evaluate_angles(&model, &random_test_set(b, batch.min(images))?, &set, batch, 0, &names, true)?;
    b.synchronize()?;
    let t = Instant::now();
    crate::angle_eval::evaluate_angles(&model, &data, &set, batch, 0, &names, true)?;
    b.synchronize()?;
    let seconds = t.elapsed().as_secs_f64();
    Ok(RotatedEval {
        implementation: "rotvar".into(),
        model: arch.into(),
        device: b.describe(),
        images,
        angles,
        seconds,
        rotated_images_per_second: (images * angles) as f64 / seconds,
    })
}

#[derive(Debug, Serialize)]
pub struct MeasureCost {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub model: String,
    pub device: String,
    pub images: usize,
    pub rotations: usize,
    pub per: String,
    /// The rotated forward passes alone (same batches, same rotations, no measure).
    pub forward_seconds: f64,
    /// The whole streaming measure, stratified and not.
    pub measure_seconds: f64,
    /// measure / forward − 1. Where the backend has graphs the measure replays its full-batch
    /// passes (`graph_replays`) while the forward passes here run plain launches, so this
    /// includes what the graphs save.
    pub overhead: f64,
    /// Graph replays during one whole measure (`None` where there are no graphs).
    pub graph_replays: Option<u64>,
    /// Device memory the measure needs on top of what was in use before it started (the model
    /// and the resident test set), at its peak: over all `images`, and over a quarter of them.
    /// Equal when the measure's memory does not grow with the number of samples. Absent on the
    /// CPU, whose memory is not tracked.
    pub peak_extra_bytes: Option<u64>,
    pub peak_extra_bytes_quarter: Option<u64>,
}

/// The variance measure's cost over the rotated forward passes it rides on.
pub fn measure_cost(
    b: &BackendRef,
    arch: &str,
    images: usize,
    rotations: usize,
    per: crate::measure::Per,
    batch: usize,
) -> Result<MeasureCost> {
    use crate::backend::Interp;
    let model = Model::build(arch, InputSpec { channels: 1, height: 28, width: 28, classes: 10 }, b, 0)?;
    let data = random_test_set(b, images)?;
    let cfg = crate::measure::MeasureConfig {
        transforms: crate::transform::TransformSet::rotations(&crate::measure::rotation_angles(rotations)),
        fill: data.fill.clone(),
        per,
        reduce: crate::backend::MapReduce::Mean,
        batch,
    };
    let forward = || -> Result<f64> {
        b.synchronize()?;
        let t = Instant::now();
        let order: Vec<u32> = (0..images as u32).collect();
        for idx in order.chunks(batch) {
            let (x, _) = data.batch(idx)?;
            for m in cfg.transforms.matrices() {
                let xr = ops::warp(&x, &vec![m; idx.len()], Interp::Bilinear, &cfg.fill)?;
                let mut sink = |_: &str, _: &Tensor| -> Result<()> { Ok(()) };
                model.forward(&xr, &mut Forward::observe(&mut sink))?;
            }
        }
        b.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    };
    // Seconds and peak extra device bytes of the measure over `data`.
    let measure = |data: &crate::train::DeviceDataset| -> Result<(f64, Option<u64>)> {
        b.synchronize()?;
        b.reset_peak_memory();
        let before = b.memory_stats();
        let t = Instant::now();
        crate::measure::measure(&model, data, &cfg, &mut |_, _| {})?;
        b.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        let extra = before.zip(b.memory_stats()).map(|(a, z)| z.peak_in_use_bytes.saturating_sub(a.in_use_bytes));
        Ok((secs, extra))
    };
    forward()?;
    let f = forward()?;
    let replays_before = b.graph_replays();
    let (m, peak) = measure(&data)?;
    let graph_replays = replays_before.zip(b.graph_replays()).map(|(a, z)| z - a);
    let (_, peak_quarter) = measure(&random_test_set(b, (images / 4).max(1))?)?;
    Ok(MeasureCost {
        implementation: "rotvar".into(),
        model: arch.into(),
        device: b.describe(),
        images,
        rotations,
        per: format!("{per:?}").to_lowercase(),
        forward_seconds: f,
        measure_seconds: m,
        overhead: m / f - 1.0,
        graph_replays,
        peak_extra_bytes: peak,
        peak_extra_bytes_quarter: peak_quarter,
    })
}

/// The CPU GEMM on one core, each instruction-set path next to the `gemm` crate (the baseline),
/// at the GEMM shapes of the convolution passes of `models` (per image, or per group of images
/// where the backend groups them) and on a 512³ square.
pub fn cpu_gemm_timings(batch: usize, reps: usize, models: &[&str]) -> Result<Vec<GemmTiming>> {
    use crate::backend::cpu::gemm::{crate_sgemm, sgemm_with, Mat};
    use crate::backend::cpu::isa::{self, Isa};
    let mut shapes: Vec<(String, usize, usize, usize, bool)> = Vec::new();
    let wanted: Vec<_> =
        conv_shapes(batch).into_iter().filter(|(n, _)| models.iter().any(|m| n.starts_with(m))).collect();
    for (name, g) in wanted {
        let p = g.oh * g.ow;
        let cols = if p < 100 { 8 * p } else { p };
        shapes.push((format!("{name}.forward"), g.c_out, cols, g.k(), false));
        shapes.push((format!("{name}.backward_weight"), g.c_out, g.k(), cols, true));
    }
    shapes.push(("square".into(), 512, 512, 512, false));
    let mut rng = Rng::new(5);
    let mut out = Vec::new();
    let device = format!("cpu: {}, 1 thread", isa::cpu_model());
    for (shape, m, n, k, b_transposed) in shapes {
        let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal()).collect() };
        let (a, b) = (rand(m * k), rand(k * n));
        let mut c = vec![f32::NAN; m * n];
        let lb = if b_transposed { Mat::transposed(k) } else { Mat::rows(n) };
        let time = |f: &mut dyn FnMut()| -> f64 {
            f();
            let mut t: Vec<f64> = (0..reps.max(1))
                .map(|_| {
                    let s = std::time::Instant::now();
                    f();
                    s.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        let mut rows: Vec<(String, f64)> = Vec::new();
        for i in Isa::ALL.into_iter().filter(|i| i.supported() && *i != Isa::Portable) {
            rows.push((
                format!("rotvar {i}"),
                time(&mut || sgemm_with(i, m, n, k, &a, Mat::rows(k), &b, lb, &mut c, Mat::rows(n), false)),
            ));
        }
        let crate_ms = time(&mut || crate_sgemm(m, n, k, &a, Mat::rows(k), &b, lb, &mut c, Mat::rows(n), false));
        rows.push(("gemm crate".into(), crate_ms));
        let flops = 2.0 * (m * n * k) as f64;
        for (variant, ms) in rows {
            out.push(GemmTiming {
                shape: shape.clone(),
                m,
                n,
                k,
                variant,
                device: device.clone(),
                precision: "fp32".into(),
                median_ms: ms,
                gflops: flops / (ms * 1e-3) / 1e9,
                ceiling_gflops: None,
                fraction_of_ceiling: None,
            });
        }
    }
    out.extend(cpu_dense_timings(batch, reps, models)?);
    Ok(out)
}

/// Each dense layer of `models`, its three passes whole through the CPU backend (every thread,
/// the weight packed as training packs it) on each of rotvar's vector paths and on the crate:
/// `model.layer.pass` rows next to the single-core GEMM rows of [`cpu_gemm_timings`]. The
/// process-wide GEMM choice is restored afterwards.
fn cpu_dense_timings(batch: usize, reps: usize, models: &[&str]) -> Result<Vec<GemmTiming>> {
    use crate::backend::cpu::{isa, CpuBackend};
    let b = CpuBackend::shared();
    let chosen = isa::active();
    let paths: Vec<Option<isa::Isa>> = isa::Isa::ALL
        .into_iter()
        .filter(|i| i.supported() && *i != isa::Isa::Portable)
        .map(Some)
        .chain([None])
        .collect();
    let device = format!("cpu: {}, {} threads, whole layer", isa::cpu_model(), rayon::current_num_threads());
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    for (layer, m, k) in dense_layers(&b, models)? {
        let n = batch;
        let mut rand = |len: usize| b.upload(&(0..len).map(|_| rng.normal()).collect::<Vec<f32>>());
        let (x, w, bias, dy) = (rand(n * k)?, rand(m * k)?, rand(m)?, rand(n * m)?);
        let (mut y, mut dx, mut dw, mut db) = (b.zeros(n * m)?, b.zeros(n * k)?, b.zeros(m * k)?, b.zeros(m)?);
        let passes = [("forward", (n, m, k)), ("backward_data", (n, k, m)), ("backward_weight", (m, k, n))];
        for (pass, (pm, pn, pk)) in passes {
            for &path in &paths {
                isa::choose(path)?;
                let ms = median_ms(&b, reps, || match pass {
                    "forward" => b.linear_fwd(&x, &w, Some(&bias), Activation::Relu, &mut y, n, k, m),
                    "backward_data" => b.linear_bwd_data(&dy, &w, &mut dx, n, k, m),
                    _ => b.linear_bwd_weight(&x, &dy, &mut dw, Some(&mut db), n, k, m),
                });
                isa::choose(chosen)?;
                let ms = ms?;
                out.push(GemmTiming {
                    shape: format!("{layer}.{pass}"),
                    m: pm,
                    n: pn,
                    k: pk,
                    variant: path.map_or("gemm crate".into(), |i| format!("rotvar {i}")),
                    device: device.clone(),
                    precision: "fp32".into(),
                    median_ms: ms,
                    gflops: 2.0 * (pm * pn * pk) as f64 / (ms * 1e-3) / 1e9,
                    ceiling_gflops: None,
                    fraction_of_ceiling: None,
                });
            }
        }
    }
    Ok(out)
}
