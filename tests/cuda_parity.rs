//! Every op of the CUDA backend, with its real launch code, run on the kernel emulator and
//! compared with the CPU reference backend: what `rotvar selftest` checks on a GPU.

mod common;

use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::cuda::{ConvTiles, CudaBackend};
use rotvar::backend::{BackendRef, Precision};
use rotvar::selftest::{
    kernel_checks, precision_checks, reference_drift, training_curves, Check, CurveCheck, Scale, DRIFT_FACTOR,
    EARLY_FLOOR,
};

/// Every check passed, or the list of those that did not, against `what`.
fn assert_all_pass(checks: &[Check], what: &str) {
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| format!("{} [{}]: error {:.3e} > {:.1e}", c.op, c.shape, c.max_rel_err, c.tolerance))
        .collect();
    assert!(failed.is_empty(), "ops that disagree with {what}:\n{}", failed.join("\n"));
}

#[test]
fn every_op_matches_the_cpu_reference_under_emulation() {
    let cpu: BackendRef = CpuBackend::shared();
    let emu: BackendRef = CudaBackend::emulated();
    let checks = kernel_checks(&cpu, &emu, Scale::Small, 42).expect("all ops run");
    assert!(checks.len() > 40, "only {} checks ran", checks.len());
    assert_all_pass(&checks, "the CPU reference");
}

/// ROTVAR_CONV_TILES=v4 and v5: every convolution and dense GEMM on the 128 × 128 kernels
/// (strided backward-data on v3), with the backend's own grids and split-K, against the CPU
/// reference.
#[test]
fn v4_and_v5_kernels_match_the_cpu_reference_under_emulation() {
    let cpu: BackendRef = CpuBackend::shared();
    for tiles in [ConvTiles::V4, ConvTiles::V5] {
        let emu: BackendRef = CudaBackend::emulated_with_tiles(Precision::Fp32, tiles);
        let checks = kernel_checks(&cpu, &emu, Scale::Small, 43).expect("all ops run");
        let convs: Vec<_> = checks.iter().filter(|c| c.op.starts_with("conv2d")).collect();
        assert!(convs.len() >= 20, "{tiles:?}: only {} conv checks ran", convs.len());
        assert_all_pass(&checks, &format!("the CPU reference ({tiles:?})"));
    }
}

/// The dense layers and convolutions in TF32, 3xTF32 and BF16: the emulated tensor-core kernels
/// with the backend's own launch code against the CPU backend's twin of each precision (the
/// same rounded operands). The control: the same ops of an fp32 CPU backend stray from the BF16
/// results by more than the tolerance, so the comparison can tell the precisions apart.
#[test]
fn every_precision_matches_its_cpu_twin_under_emulation() {
    for p in [Precision::Tf32, Precision::Tf32x3, Precision::Bf16] {
        let (cpu, emu): (BackendRef, BackendRef) = (CpuBackend::with_precision(p), CudaBackend::emulated_with(p));
        assert_eq!((cpu.precision(), emu.precision()), (p, p));
        assert!(emu.describe().contains(p.name()), "{}", emu.describe());
        let checks = precision_checks(&cpu, &emu, Scale::Small, 7).expect("all ops run");
        assert!(checks.len() >= 30, "only {} checks ran", checks.len());
        assert_all_pass(&checks, &format!("the {p} CPU twin"));
    }
    let (fp32, bf16): (BackendRef, BackendRef) = (CpuBackend::shared(), CudaBackend::emulated_with(Precision::Bf16));
    let checks = precision_checks(&fp32, &bf16, Scale::Small, 7).expect("all ops run");
    let strays = checks.iter().filter(|c| c.op.contains("conv2d_fwd") && !c.passed()).count();
    assert!(strays > 0, "bf16 convolutions agree with fp32 to within the tolerance: the checks cannot see precision");
}

/// ROTVAR_CONV_TILES=v5 in TF32, 3xTF32 and BF16: the convolutions and unsplit dense layers on
/// the tensor-core v5 kernels (128 × 128 tiles, 64 × 32 warp tiles, cp.async), with the
/// backend's own grids and split-K, against the CPU twin of each precision.
#[test]
fn v5_tensor_core_kernels_match_their_cpu_twins_under_emulation() {
    for p in [Precision::Tf32, Precision::Tf32x3, Precision::Bf16] {
        let cpu: BackendRef = CpuBackend::with_precision(p);
        let emu: BackendRef = CudaBackend::emulated_with_tiles(p, ConvTiles::V5);
        let checks = precision_checks(&cpu, &emu, Scale::Small, 9).expect("all ops run");
        let convs = checks.iter().filter(|c| c.op.contains("conv2d")).count();
        assert!(convs >= 6, "{p}: only {convs} conv checks ran");
        assert_all_pass(&checks, &format!("the {p} CPU twin (v5 tiles)"));
    }
}

#[test]
fn lenet_training_follows_the_cpu_loss_curve_under_emulation() {
    let cpu: BackendRef = CpuBackend::shared();
    let emu: BackendRef = CudaBackend::emulated();
    let (a, b) = training_curves(&cpu, &emu, 4, 8).expect("training runs on both");
    assert_eq!(a.len(), 4);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x.is_finite() && y.is_finite(), "step {i}: {x} vs {y}");
        assert!((x - y).abs() <= 1e-3 * x.abs().max(1.0), "step {i}: cpu loss {x}, cuda-emu loss {y}");
    }
}

/// The training-curve verdict scales with the CPU's own drift between its two GEMM families:
/// deviations a few times that drift pass, a jump far beyond it, a NaN or a different end fail.
#[test]
fn curve_check_is_measured_against_the_cpu_drift() {
    let cpu: BackendRef = CpuBackend::shared();
    let before = rotvar::backend::cpu::isa::active();
    let drift = reference_drift(&cpu, 6, 8).expect("two CPU runs");
    assert_eq!(rotvar::backend::cpu::isa::active(), before, "the process-wide GEMM choice is restored");
    assert_eq!(drift.len(), 6);
    assert_eq!(drift[0], 0.0, "the first loss is computed before any update: no drift yet");
    assert!(drift.iter().all(|d| d.is_finite() && *d < 1e-3), "drift {drift:?}");

    let reference: Vec<f32> = (0..60).map(|i| 2.3 - 0.03 * i as f32).collect();
    let flat = vec![2e-4f32; 20];
    let tol = EARLY_FLOOR.max(DRIFT_FACTOR * 2e-4);
    let shifted = |by: f32, at: usize| {
        let mut g = reference.clone();
        g[at] += by * reference[at].abs().max(1.0);
        g
    };
    let ok = CurveCheck::new(&reference, &shifted(0.5 * tol, 7), &flat);
    assert!(ok.passed(), "{ok:?}");
    assert!((ok.early_tol - tol).abs() < 1e-9);
    let jump = CurveCheck::new(&reference, &shifted(2.0 * tol, 7), &flat);
    assert!(!jump.passed(), "{jump:?}");
    // A larger drift widens the bound, by the stated factor.
    let wide = CurveCheck::new(&reference, &shifted(2.0 * tol, 7), &[1e-3f32; 20]);
    assert!(wide.passed(), "{wide:?}");
    assert!(!CurveCheck::new(&reference, &shifted(f32::NAN, 30), &flat).passed());
    let mut late = reference.clone();
    for v in &mut late[10..] {
        *v *= 1.2;
    }
    assert!(!CurveCheck::new(&reference, &late, &flat).passed(), "the end of the run differs by 20%");
}

/// The device-memory counts behind `rotvar bench measure`: buffers handed out and returned,
/// the peak and its reset, and reuse from the pool (which holds memory without using it).
#[test]
fn memory_stats_count_device_buffers() {
    let emu: BackendRef = CudaBackend::emulated();
    assert!(CpuBackend::shared().memory_stats().is_none(), "the CPU does not track memory");
    let s0 = emu.memory_stats().expect("the CUDA backend tracks memory");
    let a = emu.alloc(1000).unwrap();
    let b = emu.alloc(2000).unwrap();
    let s1 = emu.memory_stats().unwrap();
    assert_eq!(s1.in_use_bytes, s0.in_use_bytes + 12_000);
    assert_eq!(s1.held_bytes, s0.held_bytes + 12_000);
    assert!(s1.peak_in_use_bytes >= s1.in_use_bytes);
    drop(b);
    let s2 = emu.memory_stats().unwrap();
    assert_eq!(s2.in_use_bytes, s0.in_use_bytes + 4_000);
    assert_eq!(s2.peak_in_use_bytes, s1.peak_in_use_bytes, "the peak stays after a free");
    assert_eq!(s2.held_bytes, s1.held_bytes, "a freed buffer is kept for reuse");
    emu.reset_peak_memory();
    assert_eq!(emu.memory_stats().unwrap().peak_in_use_bytes, s2.in_use_bytes);
    let b = emu.alloc(2000).unwrap();
    let s3 = emu.memory_stats().unwrap();
    assert_eq!(s3.held_bytes, s2.held_bytes, "the same length comes back from the pool");
    assert_eq!(s3.in_use_bytes, s1.in_use_bytes);
    drop((a, b));
}

/// The measure streams: its device memory on top of the model and the data is the same for
/// a test set four times larger (both made of full batches).
#[test]
fn measure_memory_does_not_grow_with_the_number_of_samples() {
    let emu: BackendRef = CudaBackend::emulated();
    let r = rotvar::bench::measure_cost(&emu, "lenet", 8, 2, rotvar::measure::Per::Map, 2).expect("measure runs");
    let (all, quarter) = (r.peak_extra_bytes.expect("tracked"), r.peak_extra_bytes_quarter.expect("tracked"));
    assert!(all > 0, "the measure used no device memory at all?");
    assert_eq!(all, quarter, "8 images needed {all} extra bytes, 2 images {quarter}");
    assert!(r.forward_seconds > 0.0 && r.measure_seconds > 0.0);
}

/// A training step takes every buffer from the pool once warmed up: after two epochs, two more
/// (the whole `fit` loop: the epoch's feed tables, gather, augmentation, forward with a fused
/// conv + ReLU, backward, Adam, graph replays, the grouped loss readback, evaluation) leave the
/// bytes held from the driver unchanged.
/// A small network on 10×10 images keeps the emulator fast.
#[test]
fn training_steps_allocate_nothing_new_after_warm_up() {
    use rotvar::models::{InputSpec, Model};
    use rotvar::nn::{Conv2d, Layer, Linear, Sequential};
    use rotvar::optim::{OptimConfig, OptimizerKind};
    use rotvar::train::{fit, DeviceDataset, Session, TrainConfig};
    let emu: BackendRef = CudaBackend::emulated();
    let ds = common::random_dataset(24, 10, 4);
    let mut rng = rotvar::rng::Rng::new(5);
    let data = DeviceDataset::upload(&ds, &ds.channel_stats(), &emu).expect("upload");
    let mut net = Sequential::new();
    net.push("conv1", Layer::Conv2d(Conv2d::new(&emu, &mut rng, 1, 4, 3, 1, 1, true).unwrap()))
        .push("conv1.act", Layer::Relu)
        .push("pool1", Layer::MaxPool { k: 2, stride: 2, pad: 0 })
        .push("flatten", Layer::Flatten)
        .push("fc", Layer::Linear(Linear::new(&emu, &mut rng, 100, 10).unwrap()))
        .push("log_softmax", Layer::LogSoftmax);
    let model =
        Model { arch: "tiny".into(), input: InputSpec { channels: 1, height: 10, width: 10, classes: 10 }, net };
    let cfg = |epochs| TrainConfig {
        model: "tiny".into(),
        dataset: "synthetic".into(),
        epochs,
        batch_size: 8,
        optim: OptimConfig::new(OptimizerKind::Adam, 1e-3, 0.0),
        seed: 1,
        augment: "rotate".parse().unwrap(),
    };
    let mut session = Session::new(&model, &cfg(4)).expect("session");
    let mut held = Vec::new();
    let history = fit(&model, &data, Some(&data), &cfg(4), true, &mut session, |_, _| {
        held.push(emu.memory_stats().expect("tracked").held_bytes);
        Ok(())
    })
    .expect("four epochs");
    assert_eq!(history.len(), 4);
    assert!(history.iter().all(|m| m.train_loss.is_finite()));
    assert!(held[0] > 0);
    // The first epoch warms the pool and captures the step's graph, which keeps its own
    // temporaries; the second may still replace buffers the graph took; from then on, nothing.
    assert_eq!(held[2], held[1], "epoch 3 allocated from the driver: {held:?}");
    assert_eq!(held[3], held[1], "epoch 4 allocated from the driver: {held:?}");
}

/// Multi-tensor Adam sends its address table to the device once per parameter set: the next
/// steps on the same tensors reuse it (and still match the CPU step for step), a new set sends
/// a new table.
#[test]
fn adam_table_is_uploaded_once_per_parameter_set() {
    use rotvar::backend::{AdamParams, AdamTensor, Backend, Storage};
    let emu = CudaBackend::emulated();
    let cpu = CpuBackend::shared();
    let mut rng = rotvar::rng::Rng::new(11);
    let mut vals = |n: usize| (0..n).map(|_| (rng.next_u64() % 2000) as f32 / 1000.0 - 1.0).collect::<Vec<f32>>();
    let host: Vec<[Vec<f32>; 2]> = [300usize, 7, 1100].iter().map(|&n| [vals(n), vals(n)]).collect();
    // (param, grad, m, v) per tensor, on one backend.
    let state = |b: &dyn Backend| -> Vec<[Storage; 4]> {
        host.iter()
            .map(|[p, g]| {
                [b.upload(p).unwrap(), b.upload(g).unwrap(), b.zeros(p.len()).unwrap(), b.zeros(p.len()).unwrap()]
            })
            .collect()
    };
    let step = |b: &dyn Backend, st: &mut [[Storage; 4]], t: u32| {
        let h = AdamParams { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: t };
        let mut ts: Vec<AdamTensor<'_>> = st
            .iter_mut()
            .enumerate()
            .map(|(i, [p, g, m, v])| AdamTensor { param: p, grad: &*g, m, v, weight_decay: 0.01 * i as f32 })
            .collect();
        b.adam_step_many(&mut ts, &h).expect("adam step");
    };
    let (mut on_emu, mut on_cpu) = (state(&*emu), state(&*cpu));
    for t in 1..=3 {
        step(&*emu, &mut on_emu, t);
        step(&*cpu, &mut on_cpu, t);
        assert_eq!(emu.adam_table_uploads(), 1, "step {t} sent the table again");
    }
    for (i, (a, b)) in on_emu.iter().zip(&on_cpu).enumerate() {
        let (got, want) = (emu.download(&a[0]).unwrap(), cpu.download(&b[0]).unwrap());
        let err = rotvar::selftest::rel_err(&want, &got);
        assert!(err <= rotvar::selftest::TOL_ELEMENTWISE, "tensor {i} after 3 steps: error {err:.2e}");
    }
    // Another parameter set (a subset, at other addresses for the first entry) needs its own table.
    step(&*emu, &mut on_emu[1..], 4);
    assert_eq!(emu.adam_table_uploads(), 2, "a new parameter set reused the old table");
}
