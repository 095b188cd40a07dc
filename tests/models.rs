//! The model zoo of docs/protocol.md beyond LeNet and SimpleConv: AllConv, VGG-like, VGG16,
//! ResNet-18/20. Shapes, parameter counts against PyTorch's for the identical definitions,
//! state-dict names, the intermediates the measure sees, the residual wiring, and training.

use rotvar::autograd::Tape;
use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::BackendRef;
use rotvar::models::{InputSpec, Model, MODELS};
use rotvar::nn::{BasicBlock, Forward, Layer, Sequential};
use rotvar::ops;
use rotvar::optim::{OptimConfig, Optimizer, OptimizerKind};
use rotvar::rng::Rng;
use rotvar::tensor::Tensor;

const MNIST: InputSpec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
const CIFAR: InputSpec = InputSpec { channels: 3, height: 32, width: 32, classes: 10 };

fn cpu() -> BackendRef {
    CpuBackend::shared()
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// Parameter counts (values, tensors) of PyTorch modules built to the same definitions
/// (nn.Conv2d/BatchNorm2d/Linear with the same shapes and bias choices); ResNet-18's CIFAR count
/// is the published 11,173,962.
const PYTORCH_COUNTS: &[(&str, InputSpec, usize, usize)] = &[
    ("allconv", MNIST, 38_778, 26),
    ("allconv", CIFAR, 610_890, 26),
    ("vgg", MNIST, 303_226, 38),
    ("vgg", CIFAR, 4_953_034, 38),
    ("vgg16", CIFAR, 14_728_266, 54),
    ("resnet18", MNIST, 11_172_810, 62),
    ("resnet18", CIFAR, 11_173_962, 62),
    ("resnet20", MNIST, 272_186, 65),
    ("resnet20", CIFAR, 272_474, 65),
    // By hand, as PyTorch counts nn.Conv2d(bias=True), nn.BatchNorm2d and nn.Linear: six convs
    // (287,008 values on CIFAR, 576 fewer for one input channel), six batch norms (896),
    // fc1 from 128·4·4 (CIFAR) or 128·3·3 (MNIST) features to 1024, fc2 1024 → 10.
    ("convbn", MNIST, 1_478_250, 28),
    ("convbn", CIFAR, 2_396_330, 28),
];

#[test]
fn parameter_counts_match_pytorch() {
    for &(arch, spec, values, tensors) in PYTORCH_COUNTS {
        let m = Model::build(arch, spec, &cpu(), 0).unwrap();
        assert_eq!(m.num_parameters(), values, "{arch} {spec:?}: parameter values");
        assert_eq!(m.parameters().len(), tensors, "{arch} {spec:?}: parameter tensors");
    }
}

/// Every model on both input shapes: log-probabilities of the right shape, the intermediates
/// reported in the order `intermediate_names` promises, unique state names.
#[test]
fn every_model_runs_and_reports_its_intermediates() {
    let b = cpu();
    let mut rng = Rng::new(5);
    for &arch in MODELS {
        for spec in [MNIST, CIFAR] {
            let m = match Model::build(arch, spec, &b, 1) {
                Ok(m) => m,
                Err(e) => {
                    // Only VGG16 refuses, and says why.
                    assert!(arch == "vgg16" && spec.height < 32, "{arch} {spec:?}: {e}");
                    assert!(e.to_string().contains("32x32"), "{e}");
                    continue;
                }
            };
            let n = 2;
            let x = Tensor::from_vec(
                &b,
                &[n, spec.channels, spec.height, spec.width],
                &randn(&mut rng, n * spec.channels * spec.height * spec.width),
            )
            .unwrap();
            let mut seen = Vec::new();
            let mut obs = |name: &str, t: &Tensor| -> anyhow::Result<()> {
                assert_eq!(t.dim(0), n, "{name}: batch dimension");
                seen.push(name.to_string());
                Ok(())
            };
            let y = m.forward(&x, &mut Forward::observe(&mut obs)).unwrap();
            assert_eq!(y.shape(), [n, 10], "{arch} {spec:?}");
            let y = y.to_vec().unwrap();
            for row in y.chunks(10) {
                let total: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
                assert!((total - 1.0).abs() < 1e-4, "{arch}: probabilities sum to {total}");
            }
            assert_eq!(seen, m.intermediate_names(), "{arch} {spec:?}: reported intermediates");
            assert_eq!(seen.last().map(String::as_str), Some("log_softmax"));
            let names: Vec<String> = m.state().into_iter().map(|(k, _)| k).collect();
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), names.len(), "{arch}: duplicate state names");
        }
    }
}

#[test]
fn resnet_state_names_follow_pytorch() {
    let m = Model::build("resnet20", MNIST, &cpu(), 0).unwrap();
    let names: Vec<String> = m.state().into_iter().map(|(k, _)| k).collect();
    for want in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.2.bn2.bias",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.running_mean",
        "layer3.2.conv2.weight",
        "fc.bias",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    assert!(!names.iter().any(|n| n == "conv1.bias" || n == "layer1.0.shortcut.0.weight"), "{names:?}");
    let inter = m.intermediate_names();
    let block: Vec<&str> = inter.iter().filter(|n| n.starts_with("layer2.0")).map(String::as_str).collect();
    assert_eq!(
        block,
        [
            "layer2.0.conv1",
            "layer2.0.bn1",
            "layer2.0.relu1",
            "layer2.0.conv2",
            "layer2.0.bn2",
            "layer2.0.shortcut",
            "layer2.0.add",
            "layer2.0"
        ]
    );
}

/// The block's output against the formula built from single ops, with and without a conv
/// shortcut, in evaluation and then training mode.
#[test]
fn basic_block_computes_its_formula() {
    let b = cpu();
    let mut rng = Rng::new(21);
    for (c_in, c_out, stride) in [(4, 4, 1), (3, 6, 2)] {
        let mut net = Sequential::new();
        net.push("block", Layer::Residual(Box::new(BasicBlock::new(&b, &mut rng, c_in, c_out, stride).unwrap())));
        let Layer::Residual(block) = &net.layers[0].1 else { unreachable!() };
        assert_eq!(block.shortcut.is_some(), stride != 1 || c_in != c_out);
        // Non-trivial batch-norm parameters and running statistics.
        for bn in [&block.bn1, &block.bn2].into_iter().chain(block.shortcut.as_ref().map(|s| &s.1)) {
            let mut draw = |lo: f32, hi: f32| (0..c_out).map(|_| rng.uniform(lo, hi)).collect::<Vec<_>>();
            bn.weight.copy_from_host(&draw(0.5, 1.5)).unwrap();
            bn.bias.copy_from_host(&draw(-0.5, 0.5)).unwrap();
            bn.running_mean.copy_from_host(&draw(-0.2, 0.2)).unwrap();
            bn.running_var.copy_from_host(&draw(0.5, 2.0)).unwrap();
        }
        let x = Tensor::from_vec(&b, &[3, c_in, 9, 9], &randn(&mut rng, 3 * c_in * 81)).unwrap();
        // Evaluation first: the training pass updates the running statistics afterwards.
        for train in [false, true] {
            let bn = |t: &Tensor, n: &rotvar::nn::BatchNorm| {
                // Momentum 0: this reference pass leaves the running statistics alone.
                let s = ops::BatchNormState {
                    gamma: &n.weight,
                    beta: &n.bias,
                    running_mean: &n.running_mean,
                    running_var: &n.running_var,
                    momentum: 0.0,
                    eps: n.eps,
                };
                ops::batch_norm(t, &s, train).unwrap()
            };
            let conv = |t: &Tensor, c: &rotvar::nn::Conv2d| ops::conv2d(t, &c.weight, None, c.stride, c.pad).unwrap();
            let h = ops::relu(&bn(&conv(&x, &block.conv1), &block.bn1)).unwrap();
            let h = bn(&conv(&h, &block.conv2), &block.bn2);
            let short = match &block.shortcut {
                Some((c, n)) => bn(&conv(&x, c), n),
                None => x.clone(),
            };
            let want = ops::relu(&ops::add(&h, &short).unwrap()).unwrap().to_vec().unwrap();
            let got = net
                .forward(&x, &mut Forward { train, seed: 0, observer: None, fed_seed: None })
                .unwrap()
                .to_vec()
                .unwrap();
            assert_eq!(got.len(), want.len());
            assert!(want.iter().any(|&v| v > 0.1), "a block output that is all zero tests nothing");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{c_in}->{c_out} train={train} [{i}]: {g} vs {w}");
            }
        }
    }
}

/// A few Adam steps on one small batch lower the loss of every batch-normalized model (MNIST
/// shapes; ResNet-20 and AllConv at lr 1e-3 so the change is visible in a few steps).
#[test]
fn batch_norm_models_learn_a_small_batch() {
    let b = cpu();
    let mut rng = Rng::new(8);
    let n = 16;
    let x = Tensor::from_vec(&b, &[n, 1, 28, 28], &randn(&mut rng, n * 784)).unwrap();
    let labels = Tensor::from_vec(&b, &[n], &(0..n).map(|i| (i % 10) as f32).collect::<Vec<_>>()).unwrap();
    for arch in ["allconv", "vgg", "resnet20"] {
        let m = Model::build(arch, MNIST, &b, 3).unwrap();
        let mut opt = Optimizer::new(OptimConfig::new(OptimizerKind::Adam, 1e-3, 0.0), m.parameters()).unwrap();
        let mut losses = Vec::new();
        for step in 0..20 {
            let tape = Tape::start().unwrap();
            let loss = ops::nll_loss(&m.forward(&x, &mut Forward::train(step)).unwrap(), &labels).unwrap();
            losses.push(loss.scalar().unwrap());
            let grads = tape.backward(&loss).unwrap();
            opt.step(&grads).unwrap();
        }
        assert!(losses.iter().all(|l| l.is_finite()), "{arch}: {losses:?}");
        assert!(losses[19] < 0.7 * losses[0], "{arch}: loss {:.3} -> {:.3} ({losses:?})", losses[0], losses[19]);
    }
}

/// Without an observer, a conv, linear or batch-norm layer and the ReLU after it run as one fused kernel
/// (and a conv, its ReLU and a max pool as one node of the tape, whose backward pass the CPU
/// fuses); with one, separately (the measure must see the pre-activation). Both give the same bits,
/// forward and backward, on the CPU and through the emulated CUDA kernels, and the fused path
/// keeps less memory alive for the backward pass (no pre-activation), which shows it ran.
#[test]
fn fused_relu_layers_give_the_unfused_bits() -> anyhow::Result<()> {
    let emu: BackendRef = rotvar::backend::cuda::CudaBackend::emulated();
    // AllConv and ResNet-20 fuse batch norm with the ReLU after it (in blocks: bn1 + relu1).
    let cases = [
        (cpu(), "lenet"),
        (cpu(), "simpleconv"),
        (cpu(), "vgg"),
        (cpu(), "allconv"),
        (cpu(), "resnet20"),
        (emu.clone(), "lenet"),
    ];
    for (b, arch) in cases {
        let model = Model::build(arch, MNIST, &b, 7)?;
        let mut rng = Rng::new(8);
        let x = Tensor::from_vec(&b, &[3, 1, 28, 28], &randn(&mut rng, 3 * 28 * 28))?;
        let labels = Tensor::from_vec(&b, &[3], &[1.0, 4.0, 9.0])?;
        let run = |observe: bool| -> anyhow::Result<(Vec<f32>, Vec<Vec<f32>>, usize, Option<u64>)> {
            b.reset_peak_memory();
            let tape = Tape::start()?;
            let mut seen = 0usize;
            let mut obs = |_: &str, _: &Tensor| -> anyhow::Result<()> {
                seen += 1;
                Ok(())
            };
            let observer: Option<&mut dyn FnMut(&str, &Tensor) -> anyhow::Result<()>> =
                if observe { Some(&mut obs) } else { None };
            let out = model.forward(&x, &mut Forward { train: true, seed: 3, observer, fed_seed: None })?;
            let loss = ops::nll_loss(&out, &labels)?;
            let peak = b.memory_stats().map(|m| m.peak_in_use_bytes);
            let grads = tape.backward(&loss)?;
            let g = model.parameters().iter().map(|p| grads.get(&p.tensor).unwrap().to_vec().unwrap()).collect();
            Ok((out.to_vec()?, g, seen, peak))
        };
        let (out_f, grads_f, seen_f, peak_f) = run(false)?;
        let (out_u, grads_u, seen_u, peak_u) = run(true)?;
        assert_eq!(seen_f, 0);
        assert_eq!(seen_u, model.intermediate_names().len(), "{arch}: every intermediate observed");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out_f), bits(&out_u), "{arch} on {}: outputs differ", b.device());
        assert!(out_f.iter().all(|v| v.is_finite()));
        for (p, (gf, gu)) in model.parameters().iter().zip(grads_f.iter().zip(&grads_u)) {
            assert_eq!(bits(gf), bits(gu), "{arch} on {}: gradient of {} differs", b.device(), p.name);
            assert!(gf.iter().any(|&v| v != 0.0), "{arch}: gradient of {} is zero", p.name);
        }
        if let (Some(f), Some(u)) = (peak_f, peak_u) {
            assert!(f < u, "{arch} on {}: fused peak {f} bytes, unfused {u}", b.device());
        }
    }
    Ok(())
}
