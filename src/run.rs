//! Training runs as the CLI launches them: one model (`rotvar train`) or the unrotated/rotated
//! pair of the reference protocol (`rotvar train-pair`), each writing a checkpoint and metrics
//! after every epoch, atomically, and a pair writing a manifest.

use crate::augment::Augment;
use crate::backend::BackendRef;
use crate::checkpoint::{self, CheckpointMeta};
use crate::data::{self, Dataset, Split};
use crate::fsio::write_json;
use crate::models::{InputSpec, Model, MODELS};
use crate::optim::OptimConfig;
use crate::train::{self, DeviceDataset, EpochMetrics, TrainConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the data comes from, and how much of it.
#[derive(Debug, Clone)]
pub struct DataSource {
    pub dataset: String,
    pub data_dir: Option<PathBuf>,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
}

impl DataSource {
    pub fn load(&self, split: Split) -> Result<Dataset> {
        let ds = data::load(&self.dataset, split, &data::resolve_data_dir(self.data_dir.as_deref()))?;
        let limit = match split {
            Split::Train => self.train_limit,
            Split::Test => self.test_limit,
        };
        Ok(match limit {
            Some(n) => ds.take(n),
            None => ds,
        })
    }
}

/// The reference protocol (SCIENCE.md §1.1): epochs of the unrotated and rotated model.
/// LeNet is not in the published table; it gets SimpleConv's schedule.
pub fn reference_epochs(model: &str, dataset: &str) -> (usize, usize) {
    let cifar = dataset.starts_with("cifar");
    match (model, cifar) {
        ("lenet" | "simpleconv", false) => (5, 15),
        ("simpleconv", true) => (70, 120),
        ("lenet", true) => (70, 120),
        ("allconv", false) => (15, 50),
        ("allconv", true) => (32, 60),
        (_, false) => (15, 50),
        (_, true) => (70, 150),
    }
}

/// The reference learning rate: 1e-3 for the small models, 1e-5 for VGG-like and ResNet.
pub fn reference_lr(model: &str) -> f32 {
    if model.starts_with("vgg") || model.starts_with("resnet") {
        1e-5
    } else {
        1e-3
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRecord {
    pub config: TrainConfig,
    pub device: String,
    pub rotvar_version: String,
    pub git_commit: String,
    pub train_images: usize,
    pub test_images: usize,
    pub parameters: usize,
    pub epochs: Vec<EpochMetrics>,
    pub total_seconds: f64,
}

/// The commit of the source tree this binary was built from, when that tree is still there
/// (else "unknown"); "-dirty" when it has uncommitted changes.
pub fn git_commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(c) if !c.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        _ => "unknown".into(),
    }
}

pub fn check_model(name: &str) -> Result<()> {
    if !MODELS.contains(&name.to_ascii_lowercase().as_str()) {
        bail!("unknown model '{name}': choose one of {}", MODELS.join(", "));
    }
    Ok(())
}

/// Train one model into `out` (model.safetensors and metrics.json, rewritten after every
/// epoch). `data` is the training and test set already loaded.
pub fn train_model(
    b: &BackendRef,
    cfg: &TrainConfig,
    train_set: &Dataset,
    test_set: &Dataset,
    out: &Path,
    quiet: bool,
) -> Result<TrainRecord> {
    check_model(&cfg.model)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create output directory {}", out.display()))?;
    let norm = train_set.channel_stats();
    let input = InputSpec {
        channels: train_set.channels,
        height: train_set.height,
        width: train_set.width,
        classes: train_set.num_classes(),
    };
    let model = Model::build(&cfg.model, input, b, cfg.seed)?;
    eprintln!(
        "training {} ({} parameters) on {} ({} train / {} test images), augment {}, {} epochs, batch {}, {:?} lr {}",
        cfg.model,
        model.num_parameters(),
        cfg.dataset,
        train_set.len(),
        test_set.len(),
        cfg.augment,
        cfg.epochs,
        cfg.batch_size,
        cfg.optim.kind,
        cfg.optim.lr
    );
    let train_data = DeviceDataset::upload(train_set, &norm, b)?;
    let test_data = DeviceDataset::upload(test_set, &norm, b)?;
    let mut meta = CheckpointMeta {
        arch: model.arch.clone(),
        input,
        dataset: cfg.dataset.clone(),
        class_names: train_set.class_names.clone(),
        normalization: norm.clone(),
        augment: cfg.augment,
        rotvar_version: env!("CARGO_PKG_VERSION").into(),
        epochs_trained: 0,
    };
    let ckpt_path = out.join("model.safetensors");
    let metrics_path = out.join("metrics.json");
    let start = Instant::now();
    let mut record = TrainRecord {
        config: cfg.clone(),
        device: b.describe(),
        rotvar_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: git_commit(),
        train_images: train_set.len(),
        test_images: test_set.len(),
        parameters: model.num_parameters(),
        epochs: Vec::new(),
        total_seconds: 0.0,
    };
    train::fit(&model, &train_data, Some(&test_data), cfg, quiet, |m| {
        meta.epochs_trained = m.epoch;
        checkpoint::save(&ckpt_path, &model, &meta)?;
        record.epochs.push(m.clone());
        record.total_seconds = start.elapsed().as_secs_f64();
        write_json(&metrics_path, &record)
    })?;
    // Drawn after the checkpoint and metrics are safely written: a plotting problem loses nothing.
    let label = if cfg.augment.is_none() { "unrotated".to_string() } else { cfg.augment.to_string() };
    crate::figures::training_curves(out, &[(&label, &record, false)])?;
    eprintln!("wrote {}, {} and training_{{accuracy,loss}}.png", ckpt_path.display(), metrics_path.display());
    if let Some(last) = record.epochs.last() {
        println!(
            "{} ({}) on {}: test accuracy {:.2}% after {} epochs ({:.0} img/s training)",
            cfg.model,
            cfg.augment,
            cfg.dataset,
            100.0 * last.test_accuracy.unwrap_or(f64::NAN),
            last.epoch,
            last.images_per_second
        );
    }
    Ok(record)
}

/// What `train-pair` records about the pair: enough to reproduce it and to find its parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairManifest {
    pub kind: String,
    pub model: String,
    pub dataset: String,
    pub seed: u64,
    pub rotvar_version: String,
    pub git_commit: String,
    pub device: String,
    pub created_unix: u64,
    /// Relative to the run directory: `unrotated/`, `rotated/`.
    pub unrotated: PairMember,
    pub rotated: PairMember,
    pub total_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairMember {
    pub dir: String,
    pub checkpoint: String,
    pub config: TrainConfig,
    pub epochs_trained: usize,
    pub final_test_accuracy: Option<f64>,
    pub train_seconds: f64,
}

pub const MANIFEST: &str = "manifest.json";

/// Options of a pair; `epochs`/`lr` None = the reference protocol's values.
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub model: String,
    pub data: DataSource,
    pub epochs: (Option<usize>, Option<usize>),
    pub lr: Option<f32>,
    pub batch_size: usize,
    pub optim: OptimConfig,
    pub seed: u64,
    pub quiet: bool,
}

/// Train the unrotated model (no augmentation) and the rotated model (random rotation in
/// [−180°, 180°)) with the same seed into `dir/unrotated` and `dir/rotated`; write
/// `dir/manifest.json` after each member so an interrupted pair keeps what finished.
pub fn train_pair(b: &BackendRef, o: &PairOptions, dir: &Path) -> Result<PairManifest> {
    check_model(&o.model)?;
    let model = o.model.to_ascii_lowercase();
    let train_set = o.data.load(Split::Train)?;
    let test_set = o.data.load(Split::Test)?;
    let (ref_u, ref_r) = reference_epochs(&model, &train_set.name);
    let lr = o.lr.unwrap_or_else(|| reference_lr(&model));
    let start = Instant::now();
    let created_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut members = Vec::new();
    for (name, augment, epochs) in [
        ("unrotated", Augment::NONE, o.epochs.0.unwrap_or(ref_u)),
        ("rotated", Augment::ROTATE, o.epochs.1.unwrap_or(ref_r)),
    ] {
        let mut optim = o.optim;
        optim.lr = lr;
        let cfg = TrainConfig {
            model: model.clone(),
            dataset: train_set.name.clone(),
            epochs,
            batch_size: o.batch_size,
            optim,
            seed: o.seed,
            augment,
        };
        let record = train_model(b, &cfg, &train_set, &test_set, &dir.join(name), o.quiet)?;
        members.push(PairMember {
            dir: name.into(),
            checkpoint: format!("{name}/model.safetensors"),
            config: cfg,
            epochs_trained: record.epochs.len(),
            final_test_accuracy: record.epochs.last().and_then(|m| m.test_accuracy),
            train_seconds: record.total_seconds,
        });
        if members.len() == 1 {
            // Written once the first member is done too, marked incomplete by the missing
            // rotated member.
            write_json(&dir.join("manifest.partial.json"), &members)?;
        }
    }
    let rotated = members.pop().expect("two members");
    let unrotated = members.pop().expect("two members");
    let manifest = PairManifest {
        kind: "rotvar-pair".into(),
        model,
        dataset: train_set.name.clone(),
        seed: o.seed,
        rotvar_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: git_commit(),
        device: b.describe(),
        created_unix,
        unrotated,
        rotated,
        total_seconds: start.elapsed().as_secs_f64(),
    };
    write_json(&dir.join(MANIFEST), &manifest)?;
    let _ = std::fs::remove_file(dir.join("manifest.partial.json"));
    Ok(manifest)
}

/// Read a pair's manifest, with an error that says what is missing.
pub fn read_manifest(dir: &Path) -> Result<PairManifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read {}: is {} a run directory written by `rotvar train-pair`?", path.display(), dir.display())
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid pair manifest", path.display()))
}
