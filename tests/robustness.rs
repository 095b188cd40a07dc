//! Nothing a file or a flag can do crashes rotvar or loses a result, and every run can resume.
//!
//! Each bad input must give a non-zero exit, no panic, a message that names the value or file,
//! and leave every file saved earlier byte for byte as it was. Resumed runs must end with the
//! same bits as uninterrupted ones.

mod formats;
use formats::{idx_images, idx_labels};
use rotvar::checkpoint::CheckpointMeta;
use rotvar::data::Normalization;
use rotvar::models::{InputSpec, Model};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn rotvar(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rotvar")).args(args).env_remove("ROTVAR_DATA").output().expect("run rotvar")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn rotvar_ok(args: &[&str]) -> Output {
    let o = rotvar(args);
    assert!(o.status.success(), "rotvar {}: {}", args.join(" "), stderr(&o));
    o
}

/// Run a command that must be refused: non-zero exit, no panic or abort, and a message holding
/// every one of `needles`.
fn refused(args: &[&str], needles: &[&str]) -> String {
    let o = rotvar(args);
    let e = stderr(&o);
    assert!(!o.status.success(), "rotvar {} succeeded: {e}", args.join(" "));
    // 1: rotvar's own error; 2: clap's (usage). A signal (abort, kill) has no code.
    assert!(matches!(o.status.code(), Some(1 | 2)), "rotvar {}: {:?} {e}", args.join(" "), o.status);
    assert!(!e.contains("panicked") && !e.contains("memory allocation"), "rotvar {}: {e}", args.join(" "));
    for n in needles {
        assert!(e.contains(n), "rotvar {}: expected '{n}' in: {e}", args.join(" "));
    }
    e
}

fn sha(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    format!("{:x}", Sha256::digest(&bytes))
}

/// sha256 over every tensor of a checkpoint, in name order: weights, batch-norm buffers and the
/// optimizer's moments (the header also holds timings, which differ between runs).
fn tensors_sha(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let mut h = Sha256::new();
    for n in names {
        h.update(n.as_bytes());
        h.update(st.tensor(n).unwrap().data());
    }
    format!("{:x}", h.finalize())
}

fn losses(run: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["train_loss"].as_f64().unwrap(), e["test_loss"].as_f64().unwrap()))
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const SMALL: &[&str] = &["--dataset", "mnist-sample", "--limit", "400", "--test-limit", "100", "--quiet"];

/// One LeNet checkpoint (1 epoch on the bundled sample), trained once per run of this binary.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("robustness-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        let out = dir.join("run");
        let mut args = vec!["train", "--model", "lenet", "--epochs", "1", "--device", "cpu", "--out", s(&out)];
        args.extend_from_slice(SMALL);
        rotvar_ok(&args);
        dir
    })
}

/// A private copy of the fixture run.
fn fixture_copy(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    for f in ["model.safetensors", "metrics.json"] {
        std::fs::copy(fixture().join("run").join(f), run.join(f)).unwrap();
    }
    run
}

#[test]
fn numeric_flags_are_bounded_and_say_the_bounds() {
    let ck = fixture().join("run/model.safetensors");
    let ck = s(&ck);
    let cases: &[(&[&str], &[&str])] = &[
        (&["--threads", "0", "info"], &["--threads 0", "1 ≤ value ≤ 256"]),
        (&["--threads", "100000", "info"], &["--threads 100000", "1 ≤ value ≤ 256"]),
        (&["--threads", "16000", "info"], &["--threads 16000"]),
        (&["train", "--momentum", "-5"], &["--momentum -5", "0 ≤ value < 1"]),
        (&["train", "--momentum", "1"], &["--momentum 1"]),
        (&["train", "--lr", "0"], &["--lr 0", "0 < value ≤ 100"]),
        (&["train", "--lr", "NaN"], &["--lr NaN"]),
        (&["train", "--lr", "-1e-3"], &["--lr -1e-3"]),
        (&["train", "--weight-decay", "1e30"], &["--weight-decay 1e30", "0 ≤ value ≤ 1"]),
        (&["train", "--epochs", "0"], &["--epochs 0", "1 ≤ value"]),
        (&["train", "--batch-size", "1"], &["--batch-size 1", "2 ≤ value"]),
        (&["train", "--limit", "1"], &["--limit 1", "2 ≤ value"]),
        (&["train", "--limit", "-3"], &["--limit"]),
        (&["train", "--test-limit", "0"], &["--test-limit 0"]),
        (&["train-pair", "--rotated-epochs", "0"], &["--rotated-epochs 0"]),
        (&["eval", "--checkpoint", ck, "--batch-size", "0"], &["--batch-size 0", "1 ≤ value"]),
        (&["eval", "--checkpoint", ck, "--limit", "0"], &["--limit 0"]),
        (&["measure", "--checkpoint", ck, "--rotations", "1000000000000"], &["--rotations 1000000000000", "4096"]),
        (&["measure", "--checkpoint", ck, "--rotations", "0"], &["--rotations 0", "2 ≤ value"]),
        (&["measure", "--checkpoint", ck, "--rotations", "1e12"], &["--rotations '1e12' is not a whole number"]),
        (&["experiment", "--rotations", "0"], &["--rotations 0"]),
        (&["experiment", "--measure-limit", "0"], &["--measure-limit 0"]),
        (&["images", "--count", "0"], &["--count 0"]),
        (&["bench", "--steps", "0"], &["--steps 0"]),
        (&["bench", "--images", "99999999999"], &["--images 99999999999"]),
        (&["selftest", "--steps", "0"], &["--steps 0"]),
        (&["train", "--augment", "rotate=-1e38:1e38"], &["--augment rotate -100000000000000000000000000000000000000:"]),
        (&["train", "--augment", "zoom=0:1"], &["--augment zoom 0:1", "0 < value ≤ 100"]),
        (&["train", "--augment", "zoom=1:NaN"], &["zoom"]),
    ];
    for (args, needles) in cases {
        refused(args, needles);
    }
}

#[test]
fn angle_specs_are_bounded_before_anything_is_allocated() {
    let ck = fixture().join("run/model.safetensors");
    let base = ["eval", "--checkpoint", s(&ck), "--device", "cpu", "--limit", "10", "--angles"];
    for (spec, needle) in [
        ("100000000000", "--angles 100000000000"),
        ("0:360:1e-300", "at most 3600"),
        ("0:1e300:1", "at most 3600"),
        ("0:360:0", "STEP must be positive"),
        ("0:360:nan", "is not a number"),
        ("0,90,inf", "is not a number"),
        ("360:0:10", "empty"),
        ("0:360", "START:STOP:STEP"),
    ] {
        let mut args = base.to_vec();
        args.push(spec);
        refused(&args, &[needle]);
    }
    refused(&["images", "--dataset", "mnist-sample", "--angles", "0:360:1e-300"], &["at most 3600"]);
    refused(&["experiment", "--quick", "--angles", "0:360:1e-300", "--out", "/nonexistent/x"], &["at most 3600"]);
}

#[test]
fn a_run_is_never_overwritten_by_accident() {
    let dir = tempfile::tempdir().unwrap();
    let run = fixture_copy(dir.path());
    let ck = run.join("model.safetensors");
    let before = (sha(&ck), sha(&run.join("metrics.json")));
    let mut args = vec!["train", "--model", "lenet", "--epochs", "1", "--device", "cpu", "--out", s(&run)];
    args.extend_from_slice(SMALL);
    refused(&args, &["already holds a checkpoint", "--resume", "--overwrite"]);
    // The adversary's case: one image, zero steps, and the checkpoint gone.
    refused(
        &["train", "--model", "lenet", "--dataset", "mnist-sample", "--limit", "1", "--out", s(&run)],
        &["--limit 1"],
    );
    // An output equal to an input, or to any checkpoint.
    refused(&["eval", "--checkpoint", s(&ck), "--json", s(&ck), "--device", "cpu"], &["would destroy"]);
    refused(&["images", "--dataset", "mnist-sample", "--out", s(&ck)], &["is a rotvar checkpoint"]);
    let other = dir.path().join("copy.safetensors");
    std::fs::copy(&ck, &other).unwrap();
    refused(&["eval", "--checkpoint", s(&ck), "--json", s(&other), "--device", "cpu"], &["is a rotvar checkpoint"]);
    refused(&["images", "--dataset", "mnist-sample", "--out", s(dir.path())], &["is a directory"]);
    // Resume with a changed setting, or too few epochs, or nothing to resume.
    refused(&["train", "--resume", s(&run), "--lr", "0.1"], &["--resume", "--lr"]);
    refused(&["train", "--resume", s(&dir.path().join("nowhere"))], &["nothing to resume"]);
    assert_eq!((sha(&ck), sha(&run.join("metrics.json"))), before, "a refused command changed the run");
    // --overwrite is the way to replace it.
    args.push("--overwrite");
    rotvar_ok(&args);
}

#[test]
fn resumed_training_ends_with_the_same_bits_as_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    let train = |out: &Path, epochs: &str| {
        let mut args = vec!["train", "--model", "lenet", "--augment", "rotate", "--epochs", epochs, "--device", "cpu"];
        args.extend_from_slice(&["--seed", "7", "--out", s(out)]);
        args.extend_from_slice(SMALL);
        rotvar_ok(&args);
    };
    train(&whole, "4");
    train(&split, "2");
    // A killed writer's leftovers (a pid that cannot exist) are cleaned up on resume.
    let stale = split.join(".model.safetensors.tmp.4294967295");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    rotvar_ok(&["train", "--resume", s(&split), "--epochs", "4", "--device", "cpu", "--quiet"]);
    assert!(!stale.exists(), "the stale temporary file was not removed");
    assert_eq!(tensors_sha(&whole.join("model.safetensors")), tensors_sha(&split.join("model.safetensors")));
    assert_eq!(losses(&whole), losses(&split));
    // Asking for what is already there does nothing and changes nothing.
    let before = sha(&split.join("model.safetensors"));
    let o = rotvar_ok(&["train", "--resume", s(&split), "--epochs", "4", "--device", "cpu", "--quiet"]);
    assert!(stderr(&o).contains("nothing to do"), "{}", stderr(&o));
    assert_eq!(sha(&split.join("model.safetensors")), before);
    refused(&["train", "--resume", s(&split), "--epochs", "3", "--device", "cpu"], &["trained 4 epochs", "--epochs 4"]);
}

#[test]
fn a_killed_run_resumes_to_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, killed) = (dir.path().join("whole"), dir.path().join("killed"));
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--model", "lenet", "--epochs", "3", "--device", "cpu", "--seed", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--out".to_string(), s(out).to_string()]);
        a.extend(SMALL.iter().map(|s| s.to_string()));
        a
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_rotvar"))
        .args(args(&killed))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as its first epoch is on disk (or wherever it is after 60 s).
    let start = std::time::Instant::now();
    while !killed.join("model.safetensors").exists() && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let ck = killed.join("model.safetensors");
    assert!(ck.exists(), "no epoch was written within 60 s");
    rotvar_ok(&["train", "--resume", s(&killed), "--epochs", "3", "--device", "cpu", "--quiet"]);
    rotvar_ok(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(tensors_sha(&whole.join("model.safetensors")), tensors_sha(&ck));
    assert_eq!(losses(&whole), losses(&killed));
}

#[test]
fn resume_on_the_emulated_cuda_backend_matches_too() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    let small = ["--dataset", "mnist-sample", "--limit", "24", "--test-limit", "8", "--batch-size", "8", "--quiet"];
    let train = |out: &Path, epochs: &str| {
        let mut args = vec!["train", "--model", "lenet", "--augment", "rotate", "--epochs", epochs];
        args.extend_from_slice(&["--device", "cuda-emu", "--out", s(out)]);
        args.extend_from_slice(&small);
        rotvar_ok(&args);
    };
    train(&whole, "2");
    train(&split, "1");
    rotvar_ok(&["train", "--resume", s(&split), "--epochs", "2", "--device", "cuda-emu", "--quiet"]);
    assert_eq!(tensors_sha(&whole.join("model.safetensors")), tensors_sha(&split.join("model.safetensors")));
    assert_eq!(losses(&whole), losses(&split));
}

#[test]
fn a_pair_continues_its_unfinished_member_and_reuses_the_finished_one() {
    let dir = tempfile::tempdir().unwrap();
    let (fresh, resumed) = (dir.path().join("fresh"), dir.path().join("resumed"));
    let pair = |out: &Path, rotated: &str| {
        let mut args = vec!["train-pair", "--model", "lenet", "--epochs", "1", "--rotated-epochs", rotated];
        args.extend_from_slice(&["--device", "cpu", "--out", s(out)]);
        args.extend_from_slice(SMALL);
        rotvar_ok(&args)
    };
    pair(&fresh, "2");
    pair(&resumed, "1");
    let unrotated = sha(&resumed.join("unrotated/model.safetensors"));
    let o = pair(&resumed, "2");
    assert!(stderr(&o).contains("nothing to do"), "{}", stderr(&o));
    assert_eq!(sha(&resumed.join("unrotated/model.safetensors")), unrotated, "the finished member was retrained");
    for m in ["unrotated", "rotated"] {
        let (a, b) = (fresh.join(m).join("model.safetensors"), resumed.join(m).join("model.safetensors"));
        assert_eq!(tensors_sha(&a), tensors_sha(&b), "{m}");
    }
    // Another seed is another experiment: refused before any training, naming the field.
    let before = sha(&resumed.join("rotated/model.safetensors"));
    let mut args = vec!["train-pair", "--model", "lenet", "--epochs", "1", "--rotated-epochs", "2", "--seed", "5"];
    args.extend_from_slice(&["--device", "cpu", "--out", s(&resumed)]);
    args.extend_from_slice(SMALL);
    refused(&args, &["seed: 0 in the saved run, 5 now", "--overwrite"]);
    let mut exp = vec!["experiment", "--model", "lenet", "--epochs", "1", "--rotated-epochs", "2", "--seed", "5"];
    exp.extend_from_slice(&["--device", "cpu", "--out", s(&resumed), "--rotations", "2", "--measure-limit", "10"]);
    exp.extend_from_slice(SMALL);
    refused(&exp, &["seed: 0 in the saved run, 5 now"]);
    assert_eq!(sha(&resumed.join("rotated/model.safetensors")), before);
}

/// Rewrite the rotvar metadata of a checkpoint with `edit` (the tensors stay as they are).
fn tamper(src: &Path, dst: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta_text = header["__metadata__"]["rotvar"].as_str().unwrap().to_string();
    // Numbers beyond u64 must survive as written: edit the text for those.
    let mut meta: serde_json::Value = serde_json::from_str(&meta_text).unwrap();
    edit(&mut meta);
    header["__metadata__"]["rotvar"] = serde_json::Value::String(meta.to_string());
    write_header(dst, &header, &bytes[8 + n..]);
}

fn write_header(dst: &Path, header: &serde_json::Value, data: &[u8]) {
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    std::fs::write(dst, out).unwrap();
}

#[test]
fn checkpoint_metadata_is_checked_before_it_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture().join("run/model.safetensors");
    type Edit = fn(&mut serde_json::Value);
    let cases: &[(&str, Edit, &[&str])] = &[
        (
            "huge input",
            |m| m["input"]["height"] = 25_200_000_000_000u64.into(),
            &["input height/width", "25200000000000"],
        ),
        ("2^31 classes", |m| m["input"]["classes"] = (1u64 << 31).into(), &["classes is 2147483648"]),
        ("2^32-1 width", |m| m["input"]["width"] = u32::MAX.into(), &["4294967295"]),
        ("zero channels", |m| m["input"]["channels"] = 0.into(), &["input channels is 0"]),
        (
            "normalization channels",
            |m| m["normalization"]["mean"] = serde_json::json!([0.1, 0.2, 0.3]),
            &["normalization"],
        ),
        ("negative std", |m| m["normalization"]["std"] = serde_json::json!([-0.5]), &["standard deviation of -0.5"]),
        ("class names", |m| m["class_names"] = serde_json::json!(["a", "b"]), &["names 2 classes"]),
        ("unknown model", |m| m["arch"] = "alexnet".into(), &["unknown model 'alexnet'"]),
        ("shape vs dataset", |m| m["input"]["height"] = 32.into(), &["28x28", "1x32x28"]),
        (
            "missing field",
            |m| {
                m.as_object_mut().unwrap().remove("input");
            },
            &["does not parse"],
        ),
        ("negative epochs", |m| m["epochs_trained"] = (-1).into(), &["does not parse"]),
    ];
    for (i, (what, edit, needles)) in cases.iter().enumerate() {
        let ck = dir.path().join(format!("tampered{i}.safetensors"));
        tamper(&src, &ck, edit);
        let e = refused(&["eval", "--checkpoint", s(&ck), "--device", "cpu", "--limit", "10"], needles);
        assert!(e.contains(&format!("tampered{i}.safetensors")), "{what}: {e}");
        refused(&["measure", "--checkpoint", s(&ck), "--device", "cpu", "--limit", "10"], needles);
    }
}

#[test]
fn damaged_checkpoints_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture().join("run/model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let eval = |ck: &Path, needles: &[&str]| {
        refused(&["eval", "--checkpoint", s(ck), "--device", "cpu", "--limit", "10"], needles);
    };
    // Truncated anywhere: in the length, the header, the data.
    for cut in [0, 3, 8, 8 + n / 2, 8 + n + 10, bytes.len() - 1] {
        let ck = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&ck, &bytes[..cut]).unwrap();
        eval(&ck, &[&format!("cut{cut}.safetensors"), "not a usable rotvar checkpoint"]);
    }
    // A NaN and an infinity in the weights, named by tensor.
    let offset = |name: &str| 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    for (name, value) in [("conv1.weight", f32::NAN), ("fc2.bias", f32::INFINITY)] {
        let mut b = bytes.clone();
        let at = offset(name) + 4;
        b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let ck = dir.path().join("nonfinite.safetensors");
        std::fs::write(&ck, &b).unwrap();
        eval(&ck, &[name, if value.is_nan() { "NaN" } else { "inf" }]);
    }
    // A tensor of the wrong shape, dtype, or one too many.
    let mut h = header.clone();
    h["fc2.bias"]["shape"] = serde_json::json!([5, 2]);
    let ck = dir.path().join("shape.safetensors");
    write_header(&ck, &h, &bytes[8 + n..]);
    eval(&ck, &["fc2.bias", "[5, 2]"]);
    let mut h = header.clone();
    h["fc2.bias"]["dtype"] = "I32".into();
    write_header(&ck, &h, &bytes[8 + n..]);
    eval(&ck, &["fc2.bias", "I32"]);
    let mut h = header.clone();
    let end = bytes.len() - 8 - n;
    h["fc9.weight"] = serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]});
    let mut data = bytes[8 + n..].to_vec();
    data.extend_from_slice(&1.0f32.to_le_bytes());
    write_header(&ck, &h, &data);
    eval(&ck, &["fc9.weight", "does not have"]);
    // No rotvar metadata, not a file at all, a directory.
    let mut h = header.clone();
    h["__metadata__"].as_object_mut().unwrap().remove("rotvar");
    write_header(&ck, &h, &bytes[8 + n..]);
    eval(&ck, &["no rotvar metadata"]);
    eval(&dir.path().join("absent.safetensors"), &["absent.safetensors"]);
    eval(dir.path(), &[s(dir.path())]);
}

#[test]
fn the_dataset_must_fit_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ck = fixture().join("run/model.safetensors");
    // A CIFAR-shaped test set for an MNIST model.
    let cifar = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&cifar).unwrap();
    let record: Vec<u8> = std::iter::once(3u8).chain((0..3072).map(|i| (i % 251) as u8)).collect();
    std::fs::write(cifar.join("test_batch.bin"), record.repeat(4)).unwrap();
    let e = refused(
        &["eval", "--checkpoint", s(&ck), "--dataset", "cifar10", "--data-dir", s(dir.path()), "--device", "cpu"],
        &["expects 1x28x28 images", "3x32x32"],
    );
    assert!(e.contains("--dataset"), "{e}");
    refused(
        &["eval", "--checkpoint", s(&ck), "--dataset", "cifar10", "--data-dir", s(dir.path()), "--angles", "4"],
        &["expects 1x28x28 images"],
    );
    // The training split is missing: refused with the file named, before anything is written.
    let run = dir.path().join("run");
    let mut args = vec!["train", "--model", "lenet", "--dataset", "cifar10", "--data-dir", s(dir.path())];
    args.extend_from_slice(&["--device", "cpu", "--quiet", "--out", s(&run)]);
    refused(&args, &["data_batch_1.bin"]);
    assert!(!run.exists());
    // A class count that differs from the dataset's: a consistent 5-class checkpoint of MNIST shape
    // (weights only, as another tool might write it).
    let five = dir.path().join("five.safetensors");
    let cpu = rotvar::backend::cpu::CpuBackend::shared();
    let input = InputSpec { channels: 1, height: 28, width: 28, classes: 5 };
    let model = Model::build("lenet", input, &cpu, 0).unwrap();
    let meta = CheckpointMeta {
        arch: "lenet".into(),
        input,
        dataset: "mnist-sample".into(),
        class_names: (0..5).map(|i| i.to_string()).collect(),
        normalization: Normalization { mean: vec![0.13], std: vec![0.31] },
        augment: "none".parse().unwrap(),
        rotvar_version: "test".into(),
        epochs_trained: 1,
    };
    rotvar::checkpoint::save(&five, &model, &meta, None).unwrap();
    for extra in [&[][..], &["--angles", "4"][..]] {
        let mut a = vec!["eval", "--checkpoint", s(&five), "--device", "cpu", "--limit", "20"];
        a.extend_from_slice(extra);
        refused(&a, &["trained on 5 classes", "has 10"]);
    }
    refused(&["measure", "--checkpoint", s(&five), "--device", "cpu", "--limit", "20"], &["trained on 5 classes"]);
    // Without a training state it evaluates, but does not resume.
    let run5 = dir.path().join("run5");
    std::fs::create_dir_all(&run5).unwrap();
    std::fs::copy(&five, run5.join("model.safetensors")).unwrap();
    refused(&["train", "--resume", s(&run5)], &["without a training state"]);
}

fn mnist_like(dir: &Path, train_side: u32, test_side: u32) {
    let m = dir.join("mnist");
    std::fs::create_dir_all(&m).unwrap();
    let n = 16u32;
    for (split, side) in [("train", train_side), ("t10k", test_side)] {
        let px: Vec<u8> = (0..n * side * side).map(|i| (i * 37 % 256) as u8).collect();
        std::fs::write(m.join(format!("{split}-images-idx3-ubyte")), idx_images(n, side, side, &px)).unwrap();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        std::fs::write(m.join(format!("{split}-labels-idx1-ubyte")), idx_labels(&labels)).unwrap();
    }
}

#[test]
fn impossible_data_is_refused_before_the_first_epoch() {
    let dir = tempfile::tempdir().unwrap();
    // Images too small for the model: said in the model's terms, not a pooling kernel's.
    let tiny = dir.path().join("tiny");
    mnist_like(&tiny, 3, 3);
    let out = dir.path().join("out");
    let e = refused(
        &["train", "--model", "simpleconv", "--data-dir", s(&tiny), "--device", "cpu", "--out", s(&out)],
        &["model simpleconv cannot take the 1x3x3 images"],
    );
    assert!(e.contains("Choose a model"), "{e}");
    assert!(!out.join("model.safetensors").exists());
    // Train and test images of different sizes: found at once, not after an epoch.
    let mixed = dir.path().join("mixed");
    mnist_like(&mixed, 28, 20);
    let start = std::time::Instant::now();
    refused(
        &["train", "--model", "lenet", "--data-dir", s(&mixed), "--device", "cpu", "--out", s(&out)],
        &["1x28x28", "1x20x20", "mixes two datasets"],
    );
    assert!(start.elapsed().as_secs() < 30);
}

#[test]
fn divergence_is_warned_about_and_names_the_likely_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, needle) in
        [(&["--lr", "10"][..], "--lr"), (&["--lr", "10", "--weight-decay", "1"][..], "--weight-decay")]
    {
        let out = dir.path().join(flags.join("_"));
        let mut args = vec!["train", "--model", "lenet", "--epochs", "2", "--device", "cpu", "--out", s(&out)];
        args.extend_from_slice(flags);
        args.extend_from_slice(SMALL);
        let o = rotvar(&args);
        let e = stderr(&o);
        assert!(!e.contains("panicked"), "{e}");
        assert!(e.contains("diverg") && e.contains(needle), "{flags:?}: {e}");
    }
}
