//! Every op of the CUDA backend, with its real launch code, run on the kernel emulator and
//! compared with the CPU reference backend: what `rotvar selftest` checks on a GPU.

use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::cuda::CudaBackend;
use rotvar::backend::BackendRef;
use rotvar::selftest::{kernel_checks, training_curves, Scale};

#[test]
fn every_op_matches_the_cpu_reference_under_emulation() {
    let cpu: BackendRef = CpuBackend::shared();
    let emu: BackendRef = CudaBackend::emulated();
    let checks = kernel_checks(&cpu, &emu, Scale::Small, 42).expect("all ops run");
    assert!(checks.len() > 40, "only {} checks ran", checks.len());
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| format!("{} [{}]: error {:.3e} > {:.1e}", c.op, c.shape, c.max_rel_err, c.tolerance))
        .collect();
    assert!(failed.is_empty(), "ops that disagree with the CPU reference:\n{}", failed.join("\n"));
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
