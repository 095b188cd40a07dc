//! ROTVAR_LAUNCH_LOG through the backend's own launch path (`Exec::launch`): what
//! benches/kernel_report.py relies on to find the launch configurations. Its own test binary,
//! because the log is read from the environment once per process.

use rotvar::backend::cuda::launch_log::ENV;
use rotvar::backend::cuda::CudaBackend;
use rotvar::backend::BackendRef;

#[test]
fn backend_launches_are_logged_once_per_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("launches.txt");
    // The only test of this binary: no other thread reads the environment meanwhile.
    std::env::set_var(ENV, &path);
    let emu: BackendRef = CudaBackend::emulated();
    let x = emu.upload(&[-1.0, 2.0, -3.0, 4.0]).unwrap();
    let mut y = emu.zeros(4).unwrap();
    for _ in 0..3 {
        emu.relu_fwd(&x, &mut y).unwrap();
    }
    assert_eq!(emu.download(&y).unwrap(), vec![0.0, 2.0, 0.0, 4.0]);
    let text = std::fs::read_to_string(&path).expect("the log was written");
    let relu: Vec<&str> = text.lines().filter(|l| l.starts_with("relu_fwd_f32 ")).collect();
    assert_eq!(relu, ["relu_fwd_f32 256 1 1 0"], "log:\n{text}");
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 5, "{line}");
        assert!(rotvar::backend::cuda::emu::find_kernel(f[0]).is_some(), "{line}");
        assert!(f[1..].iter().all(|v| v.parse::<u32>().is_ok()), "{line}");
    }
}
