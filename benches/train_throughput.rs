//! `cargo bench`: CPU training throughput of LeNet and SimpleConv (batch 256, Adam).
//! For the side-by-side comparison with PyTorch use benches/run_train_throughput.sh.

fn main() -> anyhow::Result<()> {
    let b = rotvar::backend::cpu::CpuBackend::shared();
    for arch in ["lenet", "simpleconv"] {
        let r = rotvar::bench::train_throughput(&b, arch, 256, 2, 10)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
