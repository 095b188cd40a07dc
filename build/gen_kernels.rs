//! Writes kernels/generated/ (per module: PTX, sm_90 cubin; manifest.txt) with the same
//! compiler calls as build.rs, so a machine without nvcc can still build GPU kernels.
//! Run through .ci/gen-kernels.sh, which compiles this file with a bare rustc.
//!
//! Usage: gen_kernels <kernels dir> <output dir>   (nvcc: see nvcc::find_nvcc)

#[path = "nvcc.rs"]
mod nvcc;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn run(kdir: &Path, out: &Path) -> Result<(), String> {
    // The manifest's hashes are this file's own SHA-256: check it on the standard vector first.
    if nvcc::sha256_hex(b"abc") != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" {
        return Err("built-in SHA-256 is wrong".into());
    }
    let kdir = kdir.canonicalize().map_err(|e| format!("{}: {e}", kdir.display()))?;
    let (nvcc_path, from) =
        nvcc::find_nvcc()?.ok_or("nvcc not found ($NVCC, $CUDA_PATH, $CUDA_HOME, /usr/local/cuda/bin, PATH)")?;
    let version = nvcc::nvcc_version(&nvcc_path)?;
    eprintln!("gen_kernels: nvcc {} (from {from}): {version}", nvcc_path.display());
    let names: Vec<String> = nvcc::kernel_sources(&kdir)?
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| p.file_stem().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    let work = out.join(".work");
    let results: Vec<Result<nvcc::Compiled, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = names
            .iter()
            .map(|n| {
                let (nv, kd, w) = (&nvcc_path, &kdir, work.join(n));
                s.spawn(move || nvcc::compile_module(nv, kd, n, &w))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("compiler worker panicked".into()))).collect()
    });
    let _ = fs::remove_dir_all(&work);
    let mut compiled = Vec::new();
    for (n, r) in names.iter().zip(results) {
        let c = r?;
        if !c.messages.trim().is_empty() {
            eprintln!("{n}: {}", c.messages.trim());
        }
        compiled.push((n.clone(), c));
    }
    for (n, c) in &compiled {
        write(&out.join(format!("{n}.ptx")), c.ptx.as_bytes())?;
        write(&out.join(format!("{n}.sm_90.cubin")), &c.cubin)?;
    }
    let manifest = nvcc::Manifest::new(nvcc::source_hash(&kdir)?, version, &compiled);
    write(&out.join(nvcc::MANIFEST), manifest.render().as_bytes())
}

fn write(p: &Path, bytes: &[u8]) -> Result<(), String> {
    fs::write(p, bytes).map_err(|e| format!("writing {}: {e}", p.display()))
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [kdir, out] = &args[..] else {
        eprintln!("usage: gen_kernels <kernels dir> <output dir>");
        return ExitCode::from(2);
    };
    if let Err(e) =
        fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display())).and_then(|_| run(kdir, out))
    {
        eprintln!("gen_kernels: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
