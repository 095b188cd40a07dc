//! The commands about rotvar itself rather than a study: `info`, `models`, `bench` and
//! `selftest`.

use super::{open_backend, open_backend_with, precision, BenchArgs, ModelsArgs, SelftestArgs};
use crate::backend::{self, DeviceRequest, Precision};
use crate::data;
use crate::models::{InputSpec, MODELS};
use crate::run;
use anyhow::{bail, Context, Result};
use std::time::Instant;

pub(super) fn cmd_info() -> Result<()> {
    println!("rotvar {}", env!("CARGO_PKG_VERSION"));
    println!("cpu backend: {} (rayon threads)", rayon::current_num_threads());
    println!("cpu: {}, conv: {}", backend::cpu::isa::describe(), backend::cpu::conv::algo_name());
    for (i, line) in backend::cuda::kernels::describe().iter().enumerate() {
        println!("{}{line}", if i == 0 { "cuda kernels: " } else { "  " });
    }
    match backend::cuda_devices() {
        Ok(gpus) => gpus.iter().for_each(|g| println!("gpu: {g}")),
        Err(why) => println!("gpu: none ({why})"),
    }
    println!("models: {}", MODELS.join(", "));
    println!("datasets: {}", data::DATASETS.join(", "));
    println!("data directory: {}", data::resolve_data_dir(None).display());
    Ok(())
}

pub(super) fn cmd_models(a: ModelsArgs) -> Result<()> {
    let names: Vec<String> = match &a.model {
        Some(m) => {
            run::check_model(m)?;
            vec![m.to_ascii_lowercase()]
        }
        None => MODELS.iter().map(|m| m.to_string()).collect(),
    };
    let b = backend::cpu::CpuBackend::shared();
    let inputs = [("MNIST", [1, 28, 28]), ("CIFAR-10", [3, 32, 32])];
    for name in &names {
        // A model that cannot take an input (VGG16's five poolings on 28x28) gets an empty
        // table for it and the reason.
        let results: Vec<Result<Vec<_>>> = inputs
            .iter()
            .map(|(_, [c, h, w])| {
                crate::models::summary(name, InputSpec { channels: *c, height: *h, width: *w, classes: 10 }, &b)
            })
            .collect();
        let totals: Vec<String> = results
            .iter()
            .map(|r| match r {
                Ok(rows) => format!("{} parameters", group(rows.iter().map(|r| r.parameters).sum())),
                Err(e) => format!("not buildable ({e})"),
            })
            .collect();
        if a.json {
            for ((label, _), r) in inputs.iter().zip(&results) {
                let v = match r {
                    Ok(rows) => serde_json::json!({ "model": name, "input": label,
                        "parameters": rows.iter().map(|r| r.parameters).sum::<usize>(), "layers": rows }),
                    Err(e) => serde_json::json!({ "model": name, "input": label, "error": format!("{e}") }),
                };
                println!("{v}");
            }
            continue;
        }
        println!("{name}: MNIST {}; CIFAR-10 {}", totals[0], totals[1]);
        let tables: Vec<&[crate::models::LayerSummary]> =
            results.iter().map(|r| r.as_ref().map_or(&[][..], |v| v.as_slice())).collect();
        let all = if tables[0].is_empty() { tables[1] } else { tables[0] };
        println!("  {:<22} {:>11} {:>14} {:>11} {:>14}", "layer", "MNIST par.", "MNIST out", "CIFAR par.", "CIFAR out");
        let shape = |v: &[usize]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        // Both inputs give the same layers in the same order; zip by name to be safe.
        for r in all {
            let cols: Vec<(String, String)> = tables
                .iter()
                .map(|t| {
                    t.iter()
                        .find(|x| x.name == r.name)
                        .map_or(("-".into(), "-".into()), |x| (group(x.parameters), shape(&x.output)))
                })
                .collect();
            println!("  {:<22} {:>11} {:>14} {:>11} {:>14}", r.name, cols[0].0, cols[0].1, cols[1].0, cols[1].1);
        }
        println!();
    }
    Ok(())
}

/// 1234567 → "1,234,567".
pub(super) fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub(super) fn cmd_bench(a: BenchArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.what == "gemm" {
        let cuda = match a.device {
            DeviceRequest::Cuda(i) => backend::cuda::CudaBackend::open_with(i, precision())?,
            DeviceRequest::Auto => backend::cuda::CudaBackend::open_with(0, precision())
                .context("bench gemm times the CUDA GEMM kernels: no GPU (use --device cuda-emu to try it)")?,
            DeviceRequest::CudaEmulated => backend::cuda::CudaBackend::emulated_with(precision()),
            DeviceRequest::Cpu => {
                let models: Vec<&str> = a.models.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
                for t in crate::bench::cpu_gemm_timings(a.batch_size, a.steps, &models)? {
                    println!("{}", serde_json::to_string(&t)?);
                }
                return Ok(());
            }
        };
        let models: Vec<&str> = a.models.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        for t in crate::bench::gemm_timings(&cuda, a.batch_size, a.steps, &models)? {
            println!("{}", serde_json::to_string(&t)?);
        }
        return Ok(());
    }
    let b = open_backend(a.device)?;
    match a.what.as_str() {
        "train" => {}
        "conv" => {
            let models: Vec<&str> = a.models.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            for t in crate::bench::conv_timings(&b, a.batch_size, a.steps, &models)? {
                println!("{}", serde_json::to_string(&t)?);
            }
            return Ok(());
        }
        "rotate" => {
            let r = crate::bench::rotate_bandwidth(&b, a.images, a.steps)?;
            println!("{}", serde_json::to_string(&r)?);
            return Ok(());
        }
        "eval-angles" => {
            for arch in a.models.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let r = crate::bench::rotated_eval(&b, arch, a.images, a.angles, a.batch_size)?;
                println!("{}", serde_json::to_string(&r)?);
            }
            return Ok(());
        }
        "measure" => {
            for arch in a.models.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let r = crate::bench::measure_cost(&b, arch, a.images, a.angles, a.per, a.batch_size)?;
                println!("{}", serde_json::to_string(&r)?);
            }
            return Ok(());
        }
        other => bail!("unknown benchmark '{other}': available: train, conv, gemm, rotate, eval-angles, measure"),
    }
    for arch in a.models.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let r = crate::bench::train_throughput(&b, arch, a.batch_size, a.warmup, a.steps)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

pub(super) fn cmd_selftest(a: SelftestArgs) -> Result<()> {
    use crate::selftest::{
        deviations, kernel_checks, precision_checks, reference_drift, training_curves, CurveCheck, Scale, DRIFT_FACTOR,
        EARLY_FLOOR, TAIL_TOL,
    };
    if a.device == DeviceRequest::Cpu || a.device == DeviceRequest::Auto {
        bail!("selftest checks a GPU backend against the CPU reference: use --device cuda, cuda:N or cuda-emu");
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1: the training curves are compared step by step");
    }
    // fp32 whatever --precision says: the training curve is held to fp32's drift, and every
    // other precision is checked below anyway.
    let target = open_backend_with(a.device, Precision::Fp32)?;
    let cpu = backend::cpu::CpuBackend::shared();
    let emulated = a.device == DeviceRequest::CudaEmulated;
    let scale = if emulated || a.small { Scale::Small } else { Scale::Full };
    let start = Instant::now();
    let mut checks = kernel_checks(&cpu, &target, scale, a.seed ^ 0x5E1F)?;
    for p in [Precision::Tf32, Precision::Tf32x3, Precision::Bf16] {
        let (cpu_p, target_p) = (backend::cpu::CpuBackend::with_precision(p), backend::select(a.device, p)?.0);
        checks.extend(precision_checks(&cpu_p, &target_p, scale, a.seed ^ 0x7C0E)?);
    }
    println!("{:<28} {:<40} {:>10} {:>9}  result", "op", "shape", "rel.error", "tolerance");
    for c in &checks {
        let verdict = if c.passed() { "ok" } else { "MISMATCH" };
        println!("{:<28} {:<40} {:>10.2e} {:>9.0e}  {verdict}", c.op, c.shape, c.max_rel_err, c.tolerance);
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!("{} kernel checks, {failed} mismatches ({:.1}s)", checks.len(), start.elapsed().as_secs_f64());

    let (steps, batch) = match (emulated, a.small) {
        (true, _) => (a.steps.min(5), 8),
        (false, true) => (a.steps, 8),
        (false, false) => (a.steps, 64),
    };
    let (reference, got) = training_curves(&cpu, &target, steps, batch)?;
    let drift = reference_drift(&cpu, steps.min(20), batch)?;
    let curve = CurveCheck::new(&reference, &got, &drift);
    let curve_ok = curve.passed();
    println!(
        "lenet training, {steps} steps of batch {batch}: first loss cpu {:.5} / device {:.5}; \
         max deviation over the first {} steps {:.2e} (≤ {:.1e}: {DRIFT_FACTOR} × the CPU's own drift {:.2e} between its GEMMs, at least {EARLY_FLOOR:.0e}); \
         mean loss over the last {} steps cpu {:.4} / device {:.4}, deviation {:.2e} (≤ {TAIL_TOL:.0e}): {}",
        reference[0],
        got[0],
        curve.early_steps,
        curve.early_err,
        curve.early_tol,
        curve.drift,
        curve.tail_steps,
        curve.tail_ref,
        curve.tail_got,
        curve.tail_err,
        if curve_ok { "ok" } else { "MISMATCH" }
    );
    let show = |v: &[f32]| v.iter().take(20).map(|d| format!("{d:.1e}")).collect::<Vec<_>>().join(" ");
    println!("  deviation per step, device vs cpu: {}", show(&deviations(&reference, &got)));
    println!("  deviation per step, cpu vs cpu:    {}", show(&drift));
    if failed > 0 || !curve_ok {
        bail!(
            "selftest failed on {}: {failed} kernel mismatches{}",
            target.describe(),
            if curve_ok { "" } else { ", training curves differ" }
        );
    }
    println!("selftest passed on {}", target.describe());
    Ok(())
}
