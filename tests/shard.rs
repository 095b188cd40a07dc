//! The measure and the evaluation versus angle split across machines: shards merged equal one
//! whole run to 1e-12 relative, and shards that do not belong together are refused.

use rotvar::angle_eval::{evaluate, tally_transforms, TransformEvaluation, TransformTally};
use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::MapReduce;
use rotvar::data::{Dataset, Split};
use rotvar::measure::output::arrays;
use rotvar::measure::shard::{self, Shard, ShardSource};
use rotvar::measure::{finalize, measure, measure_moments, rotation_angles, LayerVariance, MeasureConfig, Per};
use rotvar::models::{InputSpec, Model};
use rotvar::train::DeviceDataset;
use rotvar::transform::TransformSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Equal to 1e-12 relative; NaN matches NaN and infinities match exactly.
fn assert_close(a: &[LayerVariance], b: &[LayerVariance], what: &str) {
    let (xa, xb) = (arrays(a), arrays(b));
    assert_eq!(xa.len(), xb.len(), "{what}");
    let mut compared = 0;
    for ((name, _, va), (nb, _, vb)) in xa.iter().zip(&xb) {
        assert_eq!(name, nb, "{what}");
        for (i, (&x, &y)) in va.iter().zip(vb.iter()).enumerate() {
            let ok = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs());
            assert!(ok, "{what}: {name}[{i}]: {x} vs {y}");
            compared += 1;
        }
    }
    assert!(compared > 1000, "{what}: only {compared} values compared");
    for (la, lb) in a.iter().zip(b) {
        assert_eq!(la.class_counts, lb.class_counts, "{what}");
    }
}

fn synthetic() -> Dataset {
    let mut rng = rotvar::rng::Rng::new(11);
    let n = 41;
    // Uneven classes: class 9 never appears, class 8 once, so the merge meets empty and
    // single-sample classes in some shards.
    let labels: Vec<u8> = (0..n).map(|i| if i == 17 { 8 } else { (i % 8) as u8 }).collect();
    Dataset {
        name: "synthetic".into(),
        split: Split::Test,
        images: (0..n * 16 * 16).map(|_| (rng.next_u64() % 256) as u8).collect(),
        labels,
        n,
        channels: 1,
        height: 16,
        width: 16,
        class_names: (0..10).map(|i| i.to_string()).collect(),
    }
}

fn source(total: usize, cfg: &MeasureConfig) -> ShardSource {
    ShardSource {
        checkpoint_sha256: "0".repeat(64),
        arch: "lenet".into(),
        augment: "none".into(),
        dataset: "synthetic".into(),
        class_names: (0..10).map(|i| i.to_string()).collect(),
        total_samples: total,
        batch: cfg.batch,
        transforms: cfg.transforms.clone(),
        fill: cfg.fill.clone(),
        per: cfg.per,
        reduce: cfg.reduce,
    }
}

#[test]
fn merged_shards_equal_the_whole_run() {
    let b = CpuBackend::shared();
    let ds = synthetic();
    let data = DeviceDataset::upload(&ds, &ds.channel_stats(), &b).unwrap();
    let model = Model::build("lenet", InputSpec { channels: 1, height: 16, width: 16, classes: 10 }, &b, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (per, reduce) in [(Per::Map, MapReduce::Mean), (Per::Element, MapReduce::Mean), (Per::Map, MapReduce::Max)] {
        let cfg = MeasureConfig {
            transforms: TransformSet::rotations(&rotation_angles(5)),
            fill: data.fill.clone(),
            per,
            reduce,
            batch: 8,
        };
        let whole = measure(&model, &data, &cfg, &mut |_, _| {}).unwrap();
        for n in [2, 3, 6] {
            let mut paths: Vec<PathBuf> = Vec::new();
            for k in 1..=n {
                let s = Shard { k, n };
                let part =
                    measure_moments(&model, &data, s.range(data.len(), cfg.batch), &cfg, &mut |_, _| {}).unwrap();
                let path = dir.path().join(s.file_name());
                shard::write(&path, &source(data.len(), &cfg), s, &part).unwrap();
                paths.push(path);
            }
            // Any order: the merge sorts by K.
            paths.reverse();
            let merged = shard::merge(&paths).unwrap();
            let v: Vec<LayerVariance> =
                merged.layers.iter().map(|l| finalize(&l.name, &l.unit_shape, &l.moments).unwrap()).collect();
            assert_close(&whole, &v, &format!("{per:?}/{reduce:?}, {n} shards"));
        }
    }
}

#[test]
fn shards_that_do_not_belong_together_are_refused() {
    let b = CpuBackend::shared();
    let ds = synthetic();
    let data = DeviceDataset::upload(&ds, &ds.channel_stats(), &b).unwrap();
    let model = Model::build("lenet", InputSpec { channels: 1, height: 16, width: 16, classes: 10 }, &b, 3).unwrap();
    let cfg = MeasureConfig {
        transforms: TransformSet::rotations(&rotation_angles(3)),
        fill: data.fill.clone(),
        per: Per::Map,
        reduce: MapReduce::Mean,
        batch: 16,
    };
    let dir = tempfile::tempdir().unwrap();
    let write = |k: usize, n: usize, src: &ShardSource, name: &str| -> PathBuf {
        let s = Shard { k, n };
        let part = measure_moments(&model, &data, s.range(data.len(), cfg.batch), &cfg, &mut |_, _| {}).unwrap();
        let path = dir.path().join(name);
        shard::write(&path, src, s, &part).unwrap();
        path
    };
    let src = source(data.len(), &cfg);
    let (a, b2) = (write(1, 2, &src, "a.safetensors"), write(2, 2, &src, "b.safetensors"));
    let err = |paths: &[&Path]| {
        let p: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
        format!("{:#}", shard::merge(&p).err().expect("merge should refuse"))
    };
    assert!(err(&[&a]).contains("2/2 of this measure are missing"));
    assert!(err(&[&a, &a, &b2]).contains("are the same shard 1/2"));
    let mut other = src.clone();
    other.checkpoint_sha256 = "1".repeat(64);
    let c = write(2, 2, &other, "c.safetensors");
    let e = err(&[&a, &c]);
    assert!(e.contains("another checkpoint") && e.contains("c.safetensors"), "{e}");
    let d = write(2, 3, &src, "d.safetensors");
    assert!(err(&[&a, &d]).contains("3 shards, not 2"));
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a shard").unwrap();
    assert!(err(&[&a, &junk]).contains("junk.safetensors"));
    assert!(err(&[]).contains("no shard files"));
    for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
        assert!(bad.parse::<Shard>().is_err(), "{bad}");
    }
    assert_eq!("3/8".parse::<Shard>(), Ok(Shard { k: 3, n: 8 }));
    // Slices cover every sample exactly once, in whole batches.
    let s = |k| Shard { k, n: 4 }.range(41, 8);
    assert_eq!(s(1).start, 0);
    assert_eq!(s(4).end, 41);
    assert!((1..4).all(|k| s(k).end == s(k + 1).start && s(k).end % 8 == 0 && !s(k).is_empty()));
}

#[test]
fn the_command_line_round_trip_matches_a_whole_measure() {
    let rotvar = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_rotvar")).args(args).output().unwrap();
        assert!(o.status.success(), "rotvar {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    };
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let run = d("run");
    rotvar(
        &["train", "--model", "lenet", "--dataset", "mnist-sample", "--epochs", "1", "--limit", "300"]
            .iter()
            .copied()
            .chain(["--test-limit", "90", "--device", "cpu", "--quiet", "--out", &run])
            .collect::<Vec<_>>(),
    );
    let ck = format!("{run}/model.safetensors");
    let common =
        ["--checkpoint", &ck, "--limit", "90", "--rotations", "4", "--batch-size", "16", "--device", "cpu", "--quiet"];
    rotvar(&[&["measure", "--out", &d("whole")][..], &common].concat());
    for k in ["1/3", "2/3", "3/3"] {
        rotvar(&[&["measure", "--out", &d("shards"), "--shard", k][..], &common].concat());
    }
    let shards: Vec<String> = (1..=3).map(|k| d(&format!("shards/variance.shard-{k}-of-3.safetensors"))).collect();
    let merged_dir = d("merged");
    let mut merge = vec!["measure-merge", "--out", merged_dir.as_str()];
    merge.extend(shards.iter().map(String::as_str));
    rotvar(&merge);
    let read = |p: String| {
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<(String, Vec<f64>)> = st
            .names()
            .into_iter()
            .filter(|n| !n.ends_with("class_counts"))
            .map(|n| {
                let v = st.tensor(n).unwrap();
                (n.to_string(), v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    let (w, m) = (read(d("whole/variance.safetensors")), read(d("merged/variance.safetensors")));
    assert_eq!(w.len(), m.len());
    assert!(w.len() > 20);
    for ((n, a), (_, b)) in w.iter().zip(&m) {
        for (&x, &y) in a.iter().zip(b) {
            assert!(
                (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                "{n}: {x} vs {y}"
            );
        }
    }
    assert!(Path::new(&d("merged/variance_strips.png")).exists());
}

/// Loss sums to 1e-12 relative; every count (accuracies) exactly.
fn assert_same_evaluation(a: &TransformEvaluation, b: &TransformEvaluation, what: &str) {
    let close = |x: f64, y: f64| x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs());
    assert_eq!(a.images, b.images, "{what}");
    assert_eq!(a.per_point.len(), b.per_point.len(), "{what}");
    for (ra, rb) in a.per_point.iter().zip(&b.per_point) {
        assert_eq!(ra.transform, rb.transform, "{what}");
        assert!(close(ra.loss, rb.loss), "{what}: loss at {}: {} vs {}", ra.label, ra.loss, rb.loss);
        assert_eq!(ra.accuracy, rb.accuracy, "{what}");
        let same = ra.class_accuracy.iter().zip(&rb.class_accuracy).all(|(x, y)| x == y || (x.is_nan() && y.is_nan()));
        assert!(same, "{what}: {:?} vs {:?}", ra.class_accuracy, rb.class_accuracy);
    }
    assert_eq!(
        (a.group_accuracy, a.original_accuracy, a.random_accuracy),
        (b.group_accuracy, b.original_accuracy, b.random_accuracy),
        "{what}"
    );
    assert!(close(a.original_loss, b.original_loss) && close(a.random_loss, b.random_loss), "{what}");
}

#[test]
fn merged_evaluation_shards_equal_the_whole_evaluation() {
    let b = CpuBackend::shared();
    let ds = synthetic();
    let data = DeviceDataset::upload(&ds, &ds.channel_stats(), &b).unwrap();
    let model = Model::build("lenet", InputSpec { channels: 1, height: 16, width: 16, classes: 10 }, &b, 3).unwrap();
    let names = ds.class_names.clone();
    let zoom_flip = TransformSet::parse(&["zoom=0.5:1.5:3".into(), "hflip".into()]).unwrap();
    for (set, batch) in [
        (TransformSet::rotations(&[0.0, 90.0, 180.0, 270.0]), 8usize),
        (TransformSet::rotations(&[10.0, 45.0, 200.0]), 5),
        (zoom_flip, 7),
    ] {
        let angles = set.spec();
        let whole = evaluate(&model, &data, &set, batch, 4, &names, true).unwrap();
        for n in [2, 3] {
            let mut merged: Option<TransformTally> = None;
            for k in (1..=n).rev() {
                let range = Shard { k, n }.range(data.len(), batch);
                let t = tally_transforms(&model, &data, &set, batch, 4, range, true).unwrap();
                match merged.as_mut() {
                    Some(m) => m.merge(&t).unwrap(),
                    None => merged = Some(t),
                }
            }
            let got = merged.unwrap().finish(&names, 4, 0.0).unwrap();
            assert_same_evaluation(&whole, &got, &format!("{angles}, batch {batch}, {n} shards"));
        }
    }
}

#[test]
fn eval_shards_round_trip_through_the_command_line() {
    let rotvar = |args: &[&str]| -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_rotvar")).args(args).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "rotvar {}: {e}", args.join(" "));
        e
    };
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let run = d("run");
    let mut train = vec!["train", "--model", "lenet", "--dataset", "mnist-sample", "--epochs", "1", "--limit", "300"];
    train.extend(["--test-limit", "90", "--device", "cpu", "--quiet", "--out", &run]);
    rotvar(&train);
    let ck = format!("{run}/model.safetensors");
    let common = ["eval", "--checkpoint", &ck, "--limit", "90", "--angles", "0:360:45", "--batch-size", "24"];
    let (whole, shards, merged) = (d("whole"), d("shards"), d("merged"));
    rotvar(&[&common[..], &["--device", "cpu", "--quiet", "--out", &whole]].concat());
    let mut files = Vec::new();
    for k in 1..=3 {
        let spec = format!("{k}/3");
        rotvar(&[&common[..], &["--device", "cpu", "--quiet", "--out", &shards, "--shard", &spec]].concat());
        files.push(format!("{shards}/angles.shard-{k}-of-3.json"));
    }
    let mut merge = vec!["eval-merge", "--out", merged.as_str()];
    merge.extend(files.iter().map(String::as_str));
    rotvar(&merge);
    let read = |p: &str| -> TransformEvaluation {
        serde_json::from_str(&std::fs::read_to_string(format!("{p}/angles.json")).unwrap()).unwrap()
    };
    assert_same_evaluation(&read(&whole), &read(&merged), "command line");
    assert!(Path::new(&format!("{merged}/class_angle.png")).exists());
    // A missing shard is named.
    let o =
        Command::new(env!("CARGO_BIN_EXE_rotvar")).args(["eval-merge", "--out", &merged, &files[0]]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("2/3, 3/3 of this eval are missing"));
}
