//! The command line as a user meets it: clear errors and non-zero exits on bad input, files
//! written on success.

use std::path::Path;
use std::process::{Command, Output};

fn rotvar(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rotvar")).args(args).env_remove("ROTVAR_DATA").output().expect("run rotvar")
}

/// Run rotvar and require success, showing its stderr otherwise.
fn rotvar_ok(args: &[&str]) -> Output {
    let o = rotvar(args);
    assert!(o.status.success(), "rotvar {}: {}", args.join(" "), stderr(&o));
    o
}

fn read_json(path: impl AsRef<Path>) -> serde_json::Value {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn unknown_model_is_a_clear_error() {
    let o = rotvar(&["train", "--model", "alexnet", "--dataset", "mnist-sample", "--epochs", "1"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("unknown model 'alexnet'") && e.contains("lenet"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn missing_mnist_names_the_files_and_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let o = rotvar(&["train", "--model", "lenet", "--dataset", "mnist", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    assert!(e.contains("rotvar fetch mnist") || e.contains("mnist-sample"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn bad_device_is_rejected() {
    let o = rotvar(&["train", "--device", "tpu", "--dataset", "mnist-sample"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown device 'tpu'"), "{}", stderr(&o));
}

#[test]
fn corrupt_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("model.safetensors");
    std::fs::write(&ck, b"this is not a safetensors file").unwrap();
    let o = rotvar(&["eval", "--checkpoint", ck.to_str().unwrap(), "--device", "cpu"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("model.safetensors") && e.contains("not a usable rotvar checkpoint"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn train_then_eval_on_the_bundled_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    rotvar_ok(&[
        "train",
        "--model",
        "lenet",
        "--dataset",
        "mnist-sample",
        "--epochs",
        "2",
        "--limit",
        "1200",
        "--test-limit",
        "300",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    let ck = out.join("model.safetensors");
    assert!(ck.exists());
    let metrics = read_json(out.join("metrics.json"));
    let epochs = metrics["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    let acc = epochs[1]["test_accuracy"].as_f64().unwrap();
    // 2 epochs on 1,200 images: far above chance (10%), if far from converged.
    assert!(acc > 0.5, "test accuracy {acc}");
    assert!(epochs[1]["train_loss"].as_f64().unwrap() < epochs[0]["train_loss"].as_f64().unwrap());
    assert!(epochs[0]["images_per_second"].as_f64().unwrap() > 0.0);

    let json = dir.path().join("eval.json");
    rotvar_ok(&[
        "eval",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--limit",
        "300",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    let e = read_json(&json);
    // The checkpoint reproduces the accuracy measured at the end of training.
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9, "{e} vs {acc}");
    assert_eq!(e["total"].as_u64().unwrap(), 300);
}

#[test]
fn measure_every_records_what_a_separate_measure_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let train = |epochs: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            "lenet",
            "--dataset",
            "mnist-sample",
            "--epochs",
            epochs,
            "--limit",
            "600",
            "--test-limit",
            "200",
            "--device",
            "cpu",
            "--quiet",
            "--measure-every",
            "2",
            "--measure-limit",
            "60",
        ];
        args.extend_from_slice(extra);
        rotvar_ok(&args)
    };
    train("3", &["--out", out.to_str().unwrap()]);
    let metrics = read_json(out.join("metrics.json"));
    let track = metrics["variance"].as_array().unwrap();
    // Every 2nd epoch and the last.
    assert_eq!(track.iter().map(|s| s["epoch"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!((track[1]["samples"].as_u64(), track[1]["transforms"].as_u64()), (Some(60), Some(16)));
    assert!(out.join("variance_during_training.png").exists());
    // The last snapshot is V of the saved checkpoint: `measure` on the same 60 images agrees
    // to the last bit.
    let m = dir.path().join("measure");
    let ck = out.join("model.safetensors");
    rotvar_ok(&[
        "measure",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--device",
        "cpu",
        "--limit",
        "60",
        "--quiet",
        "--out",
        m.to_str().unwrap(),
    ]);
    let v = read_json(m.join("variance.json"));
    let layers = v["layers"].as_array().unwrap();
    let snap = track[1]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), snap.len());
    assert!(layers.len() >= 5, "{layers:?}");
    for (l, s) in layers.iter().zip(snap) {
        assert_eq!(l["name"], s["name"]);
        for key in ["mean_v_all", "mean_v_stratified"] {
            assert_eq!(l[key], s[key], "{} {key}", l["name"]);
            assert!(l[key].as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "{} {key}: {}", l["name"], l[key]);
        }
    }
    assert_eq!(v["global_mean_v_stratified"], track[1]["global_mean_v_stratified"]);
    // Resuming keeps the earlier snapshots and adds the new epochs'.
    rotvar_ok(&[
        "train",
        "--resume",
        out.to_str().unwrap(),
        "--epochs",
        "4",
        "--device",
        "cpu",
        "--quiet",
        "--measure-every",
        "2",
        "--measure-limit",
        "60",
    ]);
    let metrics = read_json(out.join("metrics.json"));
    let epochs: Vec<u64> =
        metrics["variance"].as_array().unwrap().iter().map(|s| s["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, vec![2, 3, 4]);
    // --measure-limit alone is a usage error.
    let o = rotvar(&["train", "--dataset", "mnist-sample", "--measure-limit", "10"]);
    assert!(!o.status.success() && stderr(&o).contains("--measure-every"), "{}", stderr(&o));
}

#[test]
fn rank_runs_from_the_command_line_and_refuses_a_backbone_without_held_out_images() {
    let dir = tempfile::tempdir().unwrap();
    let train = |name: &str, limit: &str| {
        let out = dir.path().join(name);
        rotvar_ok(&[
            "train",
            "--model",
            "lenet",
            "--dataset",
            "mnist-sample",
            "--epochs",
            "1",
            "--limit",
            limit,
            "--test-limit",
            "50",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        out.join("model.safetensors")
    };
    let held = train("held", "4900");
    let all = train("all", "5000");
    let out = dir.path().join("rank");
    let o = rotvar_ok(&[
        "rank",
        "--backbone",
        held.to_str().unwrap(),
        "--layers",
        "pool1,fc1.act",
        "--head-epochs",
        "1",
        "--test-limit",
        "40",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(printed.contains("chance is 50%") && printed.contains("| pool1 (1176 features) |"), "{printed}");
    let r = read_json(out.join("rank.json"));
    assert_eq!(r["backbones"][0]["head_train_pairs"], 400, "100 held-out images x 4 pairs");
    assert_eq!(r["backbones"][0]["test_pairs"], 160);
    assert_eq!(r["backbones"][0]["layers"].as_array().unwrap().len(), 2);
    for f in ["rank.csv", "rank.md", "rank_accuracy.png"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let o = rotvar(&["rank", "--backbone", all.to_str().unwrap(), "--device", "cpu", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("none are held out") && stderr(&o).contains("--limit 4000"), "{}", stderr(&o));
    let o = rotvar(&["rank", "--backbone", held.to_str().unwrap(), "--factors", "0.5,0.5", "--device", "cpu"]);
    assert!(!o.status.success() && stderr(&o).contains("repeats a factor"), "{}", stderr(&o));
    let o = rotvar(&["rank", "--device", "cpu"]);
    assert!(!o.status.success() && stderr(&o).contains("--backbone"), "{}", stderr(&o));
}

#[test]
fn info_runs_without_a_gpu() {
    let o = rotvar_ok(&["info"]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("lenet") && s.contains("mnist-sample"), "{s}");
}

/// `--cpu-conv` reaches the engine (info names the algorithm in use, Winograd by default) and a
/// wrong name is refused with the choices, before any work.
#[test]
fn cpu_conv_is_named_in_info_and_checked() {
    for (args, want) in
        [(&["info"][..], "conv: winograd-f4 + direct"), (&["--cpu-conv", "im2col", "info"][..], "conv: im2col")]
    {
        let s = String::from_utf8_lossy(&rotvar_ok(args).stdout).into_owned();
        assert!(s.lines().any(|l| l.starts_with("cpu: ") && l.ends_with(want)), "{args:?}: {s}");
    }
    let o = rotvar(&["--cpu-conv", "fft", "info"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("--cpu-conv") && e.contains("\"fft\"") && e.contains("winograd"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// `--precision` reaches the backend: a bf16 run's record names it and its weights differ from
/// an fp32 run's of the same seed; an unknown precision is refused with the choices.
#[test]
fn precision_reaches_the_run_record_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let train = |prec: &str| {
        let out = dir.path().join(prec);
        rotvar_ok(&[
            "--precision",
            prec,
            "train",
            "--model",
            "lenet",
            "--dataset",
            "mnist-sample",
            "--epochs",
            "1",
            "--limit",
            "256",
            "--test-limit",
            "64",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        (
            std::fs::read_to_string(out.join("metrics.json")).unwrap(),
            std::fs::read(out.join("model.safetensors")).unwrap(),
        )
    };
    let (fp32, w32) = train("fp32");
    let (bf16, w16) = train("bf16");
    assert!(bf16.contains("precision bf16") && !fp32.contains("precision"), "{bf16}");
    assert_ne!(w32, w16, "bf16 training gave the fp32 weights");
    // A bf16 run resumed in fp32 is refused, naming the precision to use.
    let o =
        rotvar(&["train", "--resume", dir.path().join("bf16").to_str().unwrap(), "--epochs", "2", "--device", "cpu"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("--precision bf16"), "{e}");
    let o = rotvar(&["--precision", "fp16", "info"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("--precision") && e.contains("\"fp16\"") && e.contains("bf16"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn fetch_offline_fails_cleanly() {
    // This machine has no network: fetch must fail with a message, never hang or panic.
    let dir = tempfile::tempdir().unwrap();
    let o = rotvar(&["fetch", "mnist", "--data-dir", dir.path().to_str().unwrap()]);
    if o.status.success() {
        // With a network the files must now verify.
        assert!(Path::new(&dir.path().join("mnist/train-images-idx3-ubyte.gz")).exists());
    } else {
        let e = stderr(&o);
        assert!(e.contains("mnist") && !e.contains("panicked"), "{e}");
    }
}

#[test]
fn train_pair_then_eval_versus_angle() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("pair");
    rotvar_ok(&[
        "train-pair",
        "--model",
        "lenet",
        "--dataset",
        "mnist-sample",
        "--epochs",
        "1",
        "--rotated-epochs",
        "1",
        "--limit",
        "512",
        "--test-limit",
        "200",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        run.to_str().unwrap(),
    ]);
    let manifest = read_json(run.join("manifest.json"));
    assert_eq!(manifest["kind"], "rotvar-pair");
    assert_eq!(manifest["unrotated"]["config"]["augment"], "none");
    assert_eq!(manifest["rotated"]["config"]["augment"], "rotate");
    assert_eq!(manifest["rotated"]["config"]["optim"]["lr"], 0.001);
    assert!(manifest["git_commit"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(!run.join("manifest.partial.json").exists());
    for m in ["unrotated", "rotated"] {
        for f in ["model.safetensors", "metrics.json", "training_accuracy.png", "training_loss.png"] {
            assert!(run.join(m).join(f).exists(), "{m}/{f}");
        }
    }
    let ck = run.join("rotated/model.safetensors");
    let out = dir.path().join("angles");
    let o = rotvar_ok(&[
        "eval",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--device",
        "cpu",
        "--angles",
        "0:360:90",
        "--limit",
        "100",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(printed.contains("270°") && printed.contains("group accuracy"), "{printed}");
    let ev = read_json(out.join("angles.json"));
    assert_eq!(ev["per_point"].as_array().unwrap().len(), 4);
    assert_eq!(ev["images"], 100);
    let csv = std::fs::read_to_string(out.join("angles.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    // Bad specs are errors that name the option.
    let o = rotvar(&["eval", "--checkpoint", ck.to_str().unwrap(), "--device", "cpu", "--angles", "0:360"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--angles") && !stderr(&o).contains("panicked"), "{}", stderr(&o));

    // Any grid of transformations: zoom × horizontal mirror, then V over a zoom grid.
    let zoom_out = dir.path().join("zoom");
    let o = rotvar_ok(&[
        "eval",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--device",
        "cpu",
        "--transform",
        "zoom=0.5:1.5:5",
        "--transform",
        "hflip",
        "--limit",
        "60",
        "--quiet",
        "--out",
        zoom_out.to_str().unwrap(),
    ]);
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(printed.contains("10 transformations") && printed.contains("randomly transformed"), "{printed}");
    let ev = read_json(zoom_out.join("transform.json"));
    assert_eq!(ev["per_point"].as_array().unwrap().len(), 10);
    assert_eq!(ev["per_point"][3]["transform"]["zoom"], 0.75);
    assert_eq!(ev["per_point"][3]["transform"]["hflip"], true);
    for f in ["transform.csv", "accuracy_vs_transform.png", "class_transform.png"] {
        assert!(zoom_out.join(f).exists(), "{f}");
    }
    let o = rotvar_ok(&[
        "measure",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--device",
        "cpu",
        "--transform",
        "zoom=0.5:1.5:3",
        "--limit",
        "40",
        "--quiet",
        "--out",
        zoom_out.to_str().unwrap(),
    ]);
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(printed.contains("x 3 transformations"), "{printed}");
    let v = read_json(zoom_out.join("variance.json"));
    assert_eq!(v["rotations"], 3);
    assert_eq!(v["config"]["transforms"][0]["zoom"].as_array().unwrap().len(), 3);
    for (args, needle) in [
        (vec!["eval", "--transform", "shear=0.2"], "unknown transformation 'shear=0.2'"),
        (vec!["eval", "--transform", "zoom=0:1:3"], "out of range"),
        (vec!["eval", "--angles", "4", "--transform", "hflip"], "cannot be used with"),
        (vec!["measure", "--transform", "zoom=1,1.5", "--rotations", "4"], "cannot be used with"),
        (vec!["measure", "--transform", "hflip", "--transform", "vflip", "--limit", "4", "--transform", "zoom=2"], ""),
        (vec!["eval", "--shard", "1/2"], "give --angles or --transform"),
    ] {
        let mut full = args.clone();
        full.extend([
            "--checkpoint",
            ck.to_str().unwrap(),
            "--device",
            "cpu",
            "--quiet",
            "--out",
            zoom_out.to_str().unwrap(),
        ]);
        let o = rotvar(&full);
        if needle.is_empty() {
            assert!(o.status.success(), "{args:?}: {}", stderr(&o));
            continue;
        }
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(stderr(&o).contains(needle) && !stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn bad_augmentation_is_a_clear_error() {
    let o = rotvar(&["train", "--dataset", "mnist-sample", "--augment", "rotate,spin"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("unknown item 'spin'") && !e.contains("panicked"), "{e}");
}

#[test]
fn quick_experiment_writes_the_report_and_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp");
    let args = [
        "experiment",
        "--quick",
        "--epochs",
        "1",
        "--rotated-epochs",
        "1",
        "--limit",
        "600",
        "--test-limit",
        "120",
        "--measure-limit",
        "60",
        "--angles",
        "0:360:90",
        "--rotations",
        "4",
        "--device",
        "cpu",
        "--quiet",
        "--measure-every",
        "1",
        "--transform",
        "zoom=0.5,1.5",
        "--out",
        out.to_str().unwrap(),
    ];
    rotvar_ok(&args);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("group accuracy") && report.contains("mean V"), "{report}");
    assert!(
        report.contains("## Accuracy under `zoom=0.5,1.5`") && report.contains("random transformation"),
        "{report}"
    );
    assert!(report.contains("V per layer during training"), "{report}");
    // Every figure the report links to exists and is a PNG.
    let mut linked = 0;
    for line in report.lines() {
        for part in line.split("](").skip(1) {
            let file = &part[..part.find(')').unwrap()];
            let bytes = std::fs::read(out.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{file} is not a PNG");
            linked += 1;
        }
    }
    assert!(linked >= 12, "only {linked} figures linked");
    for m in ["unrotated", "rotated"] {
        for f in ["angles.json", "angles.csv", "variance.safetensors", "variance.json", "model.safetensors"] {
            assert!(out.join(m).join(f).exists(), "{m}/{f}");
        }
        // V during training (--measure-every 1): one snapshot per epoch, the last one the
        // final measure itself (same images, same settings).
        let track = read_json(out.join(m).join("metrics.json"))["variance"].clone();
        assert_eq!(track.as_array().unwrap().len(), 1, "{m}: {track}");
        let v = read_json(out.join(m).join("variance.json"));
        assert_eq!(track[0]["global_mean_v_stratified"], v["global_mean_v_stratified"], "{m}");
        assert!(out.join(format!("figures/variance_during_training_{m}.png")).exists(), "{m}");
    }
    // A second run reuses the trained pair instead of training again.
    let ck = std::fs::read(out.join("rotated/model.safetensors")).unwrap();
    let o = rotvar_ok(&args);
    assert_eq!(stderr(&o).matches("nothing to do").count(), 2, "{}", stderr(&o));
    assert!(std::fs::read(out.join("rotated/model.safetensors")).unwrap() == ck, "the reused model was rewritten");
    // ...but not a pair of another model: refused, naming the difference.
    let mut other: Vec<&str> = args.to_vec();
    other.extend(["--model", "simpleconv"]);
    let o = rotvar(&other);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(r#"model: "lenet" in the saved run, "simpleconv" now"#) && !e.contains("panicked"), "{e}");
}

#[test]
fn image_grid_command_writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid.png");
    rotvar_ok(&[
        "images",
        "--dataset",
        "mnist-sample",
        "--count",
        "3",
        "--angles",
        "0,90",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap().starts_with(b"\x89PNG"));
}

/// A batch-normalized residual network on CIFAR-shaped data through the command line: training
/// writes a checkpoint whose batch-norm running statistics come back on load (eval reproduces
/// the accuracy training reported).
#[test]
fn resnet20_trains_on_cifar_shaped_files_and_its_checkpoint_reloads() {
    use rotvar::data::cifar::write_cifar_batch;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut pixels = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect()
    };
    for i in 0..5 {
        let labels: Vec<u8> = (0..8).map(|k| ((k + i) % 10) as u8).collect();
        write_cifar_batch(&bin.join(format!("data_batch_{}.bin", i + 1)), &labels, &pixels(8 * 3072)).unwrap();
    }
    let test_labels: Vec<u8> = (0..20).map(|k| (k % 10) as u8).collect();
    write_cifar_batch(&bin.join("test_batch.bin"), &test_labels, &pixels(20 * 3072)).unwrap();

    let out = dir.path().join("run");
    let data = dir.path().to_str().unwrap();
    rotvar_ok(&[
        "train",
        "--model",
        "resnet20",
        "--dataset",
        "cifar10",
        "--data-dir",
        data,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    let metrics = read_json(out.join("metrics.json"));
    let acc = metrics["epochs"][0]["test_accuracy"].as_f64().unwrap();
    let json = dir.path().join("eval.json");
    let ck = out.join("model.safetensors");
    rotvar_ok(&[
        "eval",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--data-dir",
        data,
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    let e = read_json(&json);
    assert_eq!(e["total"].as_u64().unwrap(), 20);
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9, "{e} vs {acc}");
    // The loss too: without the running statistics the same accuracy could happen by chance,
    // the same loss could not.
    let loss = metrics["epochs"][0]["test_loss"].as_f64().unwrap();
    assert!((e["loss"].as_f64().unwrap() - loss).abs() < 1e-6 * loss.abs().max(1.0), "{e} vs loss {loss}");
}

/// `bench gemm` times the GEMM kernel variants side by side (here through the emulator, where
/// the figures mean nothing but every row must be there), and on the CPU each vector path next to
/// the gemm crate, at the convolutions' GEMM shapes and then at each dense layer's three passes.
#[test]
fn bench_gemm_reports_every_variant_on_cuda_and_on_the_cpu() {
    let o =
        rotvar_ok(&["bench", "gemm", "--device", "cuda-emu", "--steps", "1", "--batch-size", "4", "--models", "lenet"]);
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    // The emulator counts 4 SMs: fc1's 2 tiles of a 5880-step reduction split 4 ways (8 blocks,
    // 2 per SM); fc2 and the 96³ square are too short to split.
    let shapes = [("lenet.fc1", 4), ("lenet.fc2", 1), ("square", 1)];
    let variants =
        ["v1", "v2", "v3 split-K {}", "v3 split-K {} +bias+relu", "v2+bias+relu", "v2+bias, relu kernel", "v4", "v5"];
    assert_eq!(rows.len(), shapes.len() * variants.len(), "{rows:?}");
    for (i, r) in rows.iter().enumerate() {
        let (shape, splits) = shapes[i / variants.len()];
        assert_eq!(r["shape"], shape);
        assert_eq!(r["variant"], variants[i % variants.len()].replace("{}", &splits.to_string()));
        assert!(r["median_ms"].as_f64().unwrap() > 0.0 && r["gflops"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(rows[0]["m"], 4);
    // On the CPU: rotvar's vector paths this CPU runs next to the gemm crate, per shape and per
    // dense layer's pass.
    let o = rotvar_ok(&["bench", "gemm", "--device", "cpu", "--steps", "1", "--models", "lenet"]);
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let paths: Vec<String> = rotvar::backend::cpu::isa::Isa::ALL
        .into_iter()
        .filter(|i| i.supported() && *i != rotvar::backend::cpu::isa::Isa::Portable)
        .map(|i| format!("rotvar {i}"))
        .chain(["gemm crate".to_string()])
        .collect();
    let shapes = [
        "lenet.conv1.forward",
        "lenet.conv1.backward_weight",
        "lenet.conv2.forward",
        "lenet.conv2.backward_weight",
        "lenet.conv3.forward",
        "lenet.conv3.backward_weight",
        "square",
        "lenet.fc1.forward",
        "lenet.fc1.backward_data",
        "lenet.fc1.backward_weight",
        "lenet.fc2.forward",
        "lenet.fc2.backward_data",
        "lenet.fc2.backward_weight",
    ];
    assert_eq!(rows.len(), shapes.len() * paths.len(), "{rows:?}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["shape"], shapes[i / paths.len()]);
        assert_eq!(r["variant"], paths[i % paths.len()].as_str());
        assert!(r["gflops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["device"].as_str().unwrap().contains(&rotvar::backend::cpu::isa::cpu_model()), "{r}");
    }
}

#[test]
fn models_lists_every_model_with_shapes_and_parameter_counts() {
    let o = rotvar_ok(&["models", "--json"]);
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2 * rotvar::models::MODELS.len());
    let cpu = rotvar::backend::cpu::CpuBackend::shared();
    for v in &lines {
        let (model, input) = (v["model"].as_str().unwrap(), v["input"].as_str().unwrap());
        let shape = if input == "MNIST" { (1, 28) } else { (3, 32) };
        let spec = rotvar::models::InputSpec { channels: shape.0, height: shape.1, width: shape.1, classes: 10 };
        match rotvar::models::Model::build(model, spec, &cpu, 0) {
            Ok(m) => {
                let rows = v["layers"].as_array().unwrap();
                let sum: u64 = rows.iter().map(|r| r["parameters"].as_u64().unwrap()).sum();
                assert_eq!(sum, m.num_parameters() as u64, "{model} {input}: rows do not add up");
                assert_eq!(v["parameters"].as_u64().unwrap(), sum);
                assert_eq!(rows.last().unwrap()["output"], serde_json::json!([10]), "{model} {input}");
            }
            Err(_) => assert!(v["error"].as_str().is_some_and(|e| e.contains(model)), "{v}"),
        }
    }
    // LeNet on MNIST by hand: 5x5 convs with padding 2, pools to 7x7, fc 120*7*7 -> 84 -> 10.
    let lenet = lines.iter().find(|v| v["model"] == "lenet" && v["input"] == "MNIST").unwrap();
    let rows: Vec<(String, u64, serde_json::Value)> = lenet["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["parameters"].as_u64().unwrap(), r["output"].clone()))
        .collect();
    let get = |n: &str| rows.iter().find(|r| r.0 == n).unwrap_or_else(|| panic!("{n}")).clone();
    assert_eq!(get("conv1").1, 6 * 25 + 6);
    assert_eq!(get("conv3").1, 16 * 120 * 25 + 120);
    assert_eq!(get("fc1").1, 120 * 49 * 84 + 84);
    assert_eq!(get("pool2").2, serde_json::json!([16, 7, 7]));
    // Text mode names both inputs; an unknown model is a clear error.
    let text = String::from_utf8_lossy(&rotvar_ok(&["models", "vgg16"]).stdout).into_owned();
    assert!(text.contains("MNIST not buildable") && text.contains("14,728,266 parameters"), "{text}");
    let o = rotvar(&["models", "alexnet"]);
    assert!(!o.status.success() && stderr(&o).contains("unknown model 'alexnet'"));
}

/// `bench train` on a backend with graphs times the step `rotvar train` runs there: after the
/// warm-up each step is one graph replay and the host launches no kernel; with
/// ROTVAR_CUDA_GRAPHS=0 the same step's kernels are launched one by one.
#[test]
fn bench_train_reports_graph_replays_and_launches() {
    let args = ["bench", "train", "--device", "cuda-emu", "--models", "lenet", "--batch-size", "4", "--warmup", "3"];
    let args: Vec<&str> = args.into_iter().chain(["--steps", "1"]).collect();
    let row = |o: Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().expect("a row")).expect("JSON")
    };
    let graphs = row(rotvar_ok(&args));
    assert_eq!(graphs["graph_replays_per_step"], 1.0, "{graphs}");
    assert_eq!(graphs["kernel_launches_per_step"], 0.0, "{graphs}");
    let kernels = graphs["kernels_per_replay"].as_u64().expect("a captured graph");
    let plain =
        row(Command::new(env!("CARGO_BIN_EXE_rotvar")).args(&args).env("ROTVAR_CUDA_GRAPHS", "0").output().unwrap());
    assert_eq!(plain["graph_replays_per_step"], 0.0, "{plain}");
    assert_eq!(plain["kernels_per_replay"], serde_json::Value::Null);
    assert_eq!(plain["kernel_launches_per_step"].as_f64().unwrap(), kernels as f64, "{plain} vs {kernels} per replay");
}

/// `bench conv --models` takes single layers as well as models: each row of `lenet.conv1` is that
/// layer's, with the direct kernels named in the device; an unknown name is refused with the
/// layers one could ask for, before any work.
#[test]
fn bench_conv_times_single_layers() {
    let o = rotvar_ok(&[
        "bench",
        "conv",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--models",
        "lenet.conv1",
    ]);
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let passes: Vec<&str> = rows.iter().map(|r| r["pass"].as_str().unwrap()).collect();
    assert_eq!(passes, ["forward", "backward_data", "backward_weight"], "{rows:?}");
    for r in &rows {
        assert_eq!(r["layer"], "lenet.conv1");
        assert!(r["device"].as_str().unwrap().contains("winograd-f4 + direct"), "{r}");
        assert!(r["gflops"].as_f64().unwrap() > 0.0, "{r}");
    }
    let o = rotvar(&["bench", "conv", "--device", "cpu", "--models", "lenet.conv9"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("lenet.conv9") && e.contains("lenet.conv2"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}
