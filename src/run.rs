//! Training runs as the CLI launches them: one model (`rotvar train`) or the unrotated/rotated
//! pair of the reference protocol (`rotvar train-pair`), each writing a checkpoint and metrics
//! after every epoch, atomically, and a pair writing a manifest.

use crate::augment::Augment;
use crate::backend::{BackendRef, Precision};
use crate::checkpoint::{self, CheckpointMeta, TrainingState};
use crate::data::{self, Dataset, Split};
use crate::fsio::write_json;
use crate::models::{InputSpec, Model, MODELS};
use crate::nn::Forward;
use crate::optim::{OptimConfig, OptimizerState};
use crate::progress;
use crate::tensor::Tensor;
use crate::train::{self, DeviceDataset, EpochMetrics, Session, SessionPosition, TrainConfig};
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

/// The reference protocol (docs/protocol.md, step 1): epochs of the unrotated and rotated model.
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
    /// V per layer after the measured epochs (`train --measure-every`), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variance: Vec<VarianceSnapshot>,
}

/// The variance measure's per-layer means after one epoch of training, on a fixed subset of the
/// test set (`train --measure-every`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VarianceSnapshot {
    pub epoch: usize,
    /// The first `samples` test images, under `transforms` transformations.
    pub samples: usize,
    pub transforms: usize,
    pub layers: Vec<LayerMeans>,
    pub global_mean_v_all: Option<f64>,
    pub global_mean_v_stratified: Option<f64>,
}

/// One layer's mean V over its units (finite values only), over all samples and stratified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerMeans {
    pub name: String,
    pub mean_v_all: Option<f64>,
    pub mean_v_stratified: Option<f64>,
}

/// (model, test set, epoch) → the snapshot.
pub type MeasureFn<'a> = dyn FnMut(&Model, &DeviceDataset, usize) -> Result<VarianceSnapshot> + 'a;

/// Measures the model between epochs. The measure lives on the study floor above this module,
/// so the caller hands it in as a closure over (model, test set, epoch).
pub struct EpochProbe<'a> {
    /// Measure after every `every`-th epoch, and after the last.
    pub every: usize,
    pub measure: Box<MeasureFn<'a>>,
}

impl EpochProbe<'_> {
    fn due(&self, epoch: usize, last: usize) -> bool {
        epoch.is_multiple_of(self.every.max(1)) || epoch == last
    }
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

/// What `train_model` does when its output directory already holds a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse: a finished result is never overwritten by accident.
    Refuse,
    /// Start over, replacing it.
    Overwrite,
    /// Continue it; there must be one.
    Resume,
    /// Continue it if there is one (with the same configuration), else start: how a pair picks
    /// up after an interruption.
    Continue,
}

/// What a checkpoint written by `train_model` stores for `--resume`, beside the optimizer's
/// moments: the whole record so far and where the random streams and the optimizer stand.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    position: SessionPosition,
    record: TrainRecord,
}

const MOMENT_M: &str = "training.m.";
const MOMENT_V: &str = "training.v.";

fn training_state(session: &Session, record: &TrainRecord) -> Result<TrainingState> {
    let state = RunState { position: session.position(), record: record.clone() };
    let optim = session.optimizer.export_state()?;
    let mut tensors = Vec::with_capacity(2 * optim.moments.len());
    for (name, m, v) in optim.moments {
        tensors.push((format!("{MOMENT_M}{name}"), m));
        tensors.push((format!("{MOMENT_V}{name}"), v));
    }
    Ok(TrainingState { json: serde_json::to_string(&state)?, tensors })
}

fn parse_run_state(ckpt: &Path, json: &str) -> Result<RunState> {
    serde_json::from_str(json).map_err(|e| {
        anyhow::anyhow!("{}: its training record does not parse ({e}); it cannot be resumed", ckpt.display())
    })
}

fn optimizer_state(ckpt: &Path, pos: &SessionPosition, t: &TrainingState) -> Result<OptimizerState> {
    let mut moments = Vec::new();
    for (name, m) in &t.tensors {
        if let Some(param) = name.strip_prefix(MOMENT_M) {
            let v = t.tensors.iter().find(|(n, _)| n.strip_prefix(MOMENT_V) == Some(param)).ok_or_else(|| {
                anyhow::anyhow!("{}: the optimizer's second moment of '{param}' is missing", ckpt.display())
            })?;
            moments.push((param.to_string(), m.clone(), v.1.clone()));
        } else if !name.starts_with(MOMENT_V) {
            bail!("{}: unknown training tensor '{name}'", ckpt.display());
        }
    }
    Ok(OptimizerState { step: pos.optimizer_step, moments })
}

/// The first field in which two training configurations differ, epochs aside (more epochs is
/// what a resume asks for): "optim.lr: 0.001 in the saved run, 0.01 now".
pub fn config_difference(
    saved: &TrainRecord,
    cfg: &TrainConfig,
    train_images: usize,
    test_images: usize,
) -> Option<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                keys.into_iter().find_map(|k| {
                    let null = serde_json::Value::Null;
                    let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(&sub, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null))
                })
            }
            _ if a == b => None,
            _ => Some(format!("{path}: {a} in the saved run, {b} now")),
        }
    }
    let mut saved_cfg = saved.config.clone();
    saved_cfg.epochs = cfg.epochs;
    let (a, b) = (serde_json::to_value(&saved_cfg).ok()?, serde_json::to_value(cfg).ok()?);
    walk("", &a, &b)
        .or_else(|| {
            (saved.train_images != train_images).then(|| {
                format!("training images: {} in the saved run, {train_images} now (--limit)", saved.train_images)
            })
        })
        .or_else(|| {
            (saved.test_images != test_images).then(|| {
                format!("test images: {} in the saved run, {test_images} now (--test-limit)", saved.test_images)
            })
        })
}

/// Check, within a second and before any epoch, that `cfg` can train on these sets: they agree
/// with each other and one image goes through the model.
pub fn preflight(b: &BackendRef, cfg: &TrainConfig, train_set: &Dataset, test_set: &Dataset) -> Result<InputSpec> {
    check_model(&cfg.model)?;
    let shape = |d: &Dataset| [d.channels, d.height, d.width];
    if shape(train_set) != shape(test_set) || train_set.num_classes() != test_set.num_classes() {
        let [c, h, w] = shape(train_set);
        let [tc, th, tw] = shape(test_set);
        bail!(
            "the {} training set has {c}x{h}x{w} images in {} classes but its test set {tc}x{th}x{tw} in {}: \
             the data directory mixes two datasets",
            train_set.name,
            train_set.num_classes(),
            test_set.num_classes()
        );
    }
    if train_set.len() < 2 {
        bail!("the training set has {} image(s); training needs at least 2 (raise --limit)", train_set.len());
    }
    if test_set.is_empty() {
        bail!("the {} test set is empty", test_set.name);
    }
    let input = InputSpec {
        channels: train_set.channels,
        height: train_set.height,
        width: train_set.width,
        classes: train_set.num_classes(),
    };
    let model = Model::build(&cfg.model, input, b, cfg.seed)?;
    let x = Tensor::zeros(b, &[1, input.channels, input.height, input.width])?;
    model.forward(&x, &mut Forward::eval()).map_err(|e| {
        anyhow::anyhow!(
            "model {} cannot take the {}x{}x{} images of {}: {e}. Choose a model made for this input size",
            cfg.model,
            input.channels,
            input.height,
            input.width,
            train_set.name
        )
    })?;
    Ok(input)
}

/// The precision a run record's device line names ("..., precision bf16"; none: fp32).
fn recorded_precision(device: &str) -> Precision {
    device
        .rsplit_once("precision ")
        .and_then(|(_, p)| Precision::parse(p.trim_end_matches(')')).ok())
        .unwrap_or_default()
}

/// Train one model into `out` (model.safetensors and metrics.json, rewritten after every
/// epoch). `data` is the training and test set already loaded; `probe` measures V between epochs.
#[allow(clippy::too_many_arguments)] // each is a distinct setting; a struct would only rename them
pub fn train_model(
    b: &BackendRef,
    cfg: &TrainConfig,
    train_set: &Dataset,
    test_set: &Dataset,
    out: &Path,
    quiet: bool,
    existing: Existing,
    mut probe: Option<&mut EpochProbe>,
) -> Result<TrainRecord> {
    let input = preflight(b, cfg, train_set, test_set)?;
    let ckpt_path = out.join("model.safetensors");
    let metrics_path = out.join("metrics.json");
    let found = ckpt_path.exists();
    let resume = match (existing, found) {
        (Existing::Refuse, true) => {
            let what = checkpoint::read_meta(&ckpt_path)
                .map(|m| format!("{} trained {} epochs", m.arch, m.epochs_trained))
                .unwrap_or_else(|_| "an unreadable checkpoint".into());
            bail!(
                "{} already holds a checkpoint ({what}): pass --resume {} to continue it, --overwrite to replace it, \
                 or choose another --out",
                out.display(),
                out.display()
            );
        }
        (Existing::Resume, false) => {
            bail!("nothing to resume: {} does not exist (is {} a run directory?)", ckpt_path.display(), out.display())
        }
        (Existing::Resume | Existing::Continue, true) => true,
        (Existing::Overwrite | Existing::Continue | Existing::Refuse, false) | (Existing::Overwrite, true) => false,
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create output directory {}", out.display()))?;
    let (model, mut session, mut record, mut meta) = if resume {
        let loaded = checkpoint::load_full(&ckpt_path, b)?;
        let Some(training) = &loaded.training else {
            bail!(
                "{} holds weights without a training state (written by an older rotvar?): it can be evaluated \
                 but not resumed; pass --overwrite to train from scratch",
                ckpt_path.display()
            );
        };
        let state = parse_run_state(&ckpt_path, &training.json)?;
        if let Some(diff) = config_difference(&state.record, cfg, train_set.len(), test_set.len()) {
            bail!(
                "{} was trained with another configuration ({diff}): continue it with the same settings, \
                 pass --overwrite to start over, or choose another --out",
                out.display()
            );
        }
        if loaded.meta.input != input {
            bail!("{} was built for another input ({:?}, now {input:?})", ckpt_path.display(), loaded.meta.input);
        }
        let saved = recorded_precision(&state.record.device);
        if saved != b.precision() {
            bail!(
                "{} was trained with --precision {saved}, this run asks for {}: resume it with --precision {saved}",
                out.display(),
                b.precision()
            );
        }
        let done = state.position.epochs_done;
        if done > cfg.epochs {
            bail!(
                "{} has trained {done} epochs, more than the {} asked for: pass --epochs {done} (or more) to use it, \
                 --overwrite to retrain, or another --out",
                out.display(),
                cfg.epochs
            );
        }
        let optim = optimizer_state(&ckpt_path, &state.position, training)?;
        let session = Session::restore(&loaded.model, cfg, &state.position, &optim)
            .with_context(|| format!("cannot resume {}", ckpt_path.display()))?;
        let mut record = state.record;
        record.config.epochs = cfg.epochs;
        (loaded.model, session, record, loaded.meta)
    } else {
        let model = Model::build(&cfg.model, input, b, cfg.seed)?;
        let session = Session::new(&model, cfg)?;
        let record = TrainRecord {
            config: cfg.clone(),
            device: b.describe(),
            rotvar_version: env!("CARGO_PKG_VERSION").into(),
            git_commit: git_commit(),
            train_images: train_set.len(),
            test_images: test_set.len(),
            parameters: model.num_parameters(),
            epochs: Vec::new(),
            total_seconds: 0.0,
            variance: Vec::new(),
        };
        let meta = CheckpointMeta {
            arch: model.arch.clone(),
            input,
            dataset: cfg.dataset.clone(),
            class_names: train_set.class_names.clone(),
            normalization: train_set.channel_stats(),
            augment: cfg.augment,
            rotvar_version: env!("CARGO_PKG_VERSION").into(),
            epochs_trained: 0,
        };
        (model, session, record, meta)
    };
    if session.epochs_done == cfg.epochs && resume {
        eprintln!("{} has already trained {} epochs: nothing to do", out.display(), cfg.epochs);
        // Brings a metrics.json that lagged behind its checkpoint (a kill between the two
        // writes) back in step.
        write_json(&metrics_path, &record)?;
        return Ok(record);
    }
    eprintln!(
        "{} {} ({} parameters) on {} ({} train / {} test images), augment {}, {} epochs, batch {}, {:?} lr {}",
        if resume { format!("resuming at epoch {}:", session.epochs_done + 1) } else { "training".into() },
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
    let train_data = DeviceDataset::upload(train_set, &meta.normalization, b)?;
    let test_data = DeviceDataset::upload(test_set, &meta.normalization, b)?;
    let start = Instant::now();
    let seconds_before = record.total_seconds;
    train::fit(&model, &train_data, Some(&test_data), cfg, quiet, &mut session, |m, session| {
        meta.epochs_trained = m.epoch;
        record.epochs.push(m.clone());
        if let Some(p) = probe.as_mut().filter(|p| p.due(m.epoch, cfg.epochs)) {
            let snapshot = (p.measure)(&model, &test_data, m.epoch)?;
            progress::note(
                None,
                &format!(
                    "epoch {}: mean V over layers {} (stratified {}), {} test images x {} transformations",
                    m.epoch,
                    snapshot.global_mean_v_all.map_or("-".into(), |v| format!("{v:.4}")),
                    snapshot.global_mean_v_stratified.map_or("-".into(), |v| format!("{v:.4}")),
                    snapshot.samples,
                    snapshot.transforms
                ),
            );
            record.variance.retain(|v| v.epoch != m.epoch);
            record.variance.push(snapshot);
        }
        record.total_seconds = seconds_before + start.elapsed().as_secs_f64();
        // The checkpoint carries the record: it is the one consistent copy of the epoch, and
        // metrics.json a readable view of it written right after.
        checkpoint::save(&ckpt_path, &model, &meta, Some(&training_state(session, &record)?))?;
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
    /// Retrain members whose directory holds a checkpoint instead of continuing them.
    pub overwrite: bool,
    pub quiet: bool,
}

/// Train the unrotated model (no augmentation) and the rotated model (random rotation in
/// [−180°, 180°)) with the same seed into `dir/unrotated` and `dir/rotated`; write
/// `dir/manifest.json` after each member so an interrupted pair keeps what finished.
pub fn train_pair(
    b: &BackendRef,
    o: &PairOptions,
    dir: &Path,
    mut probe: Option<&mut EpochProbe>,
) -> Result<PairManifest> {
    check_model(&o.model)?;
    let model = o.model.to_ascii_lowercase();
    let train_set = o.data.load(Split::Train)?;
    let test_set = o.data.load(Split::Test)?;
    let (ref_u, ref_r) = reference_epochs(&model, &train_set.name);
    let lr = o.lr.unwrap_or_else(|| reference_lr(&model));
    let start = Instant::now();
    let created_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let configs: Vec<(&str, TrainConfig)> = [
        ("unrotated", Augment::NONE, o.epochs.0.unwrap_or(ref_u)),
        ("rotated", Augment::ROTATE, o.epochs.1.unwrap_or(ref_r)),
    ]
    .into_iter()
    .map(|(name, augment, epochs)| {
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
        (name, cfg)
    })
    .collect();
    // Everything that can refuse does so before the first epoch: the data, the model, and any
    // member already in `dir` that was trained otherwise.
    for (name, cfg) in &configs {
        preflight(b, cfg, &train_set, &test_set)?;
        if !o.overwrite {
            check_continuable(&dir.join(name), cfg, train_set.len(), test_set.len())?;
        }
    }
    let existing = if o.overwrite { Existing::Overwrite } else { Existing::Continue };
    let mut members = Vec::new();
    for (name, cfg) in configs {
        let record =
            train_model(b, &cfg, &train_set, &test_set, &dir.join(name), o.quiet, existing, probe.as_deref_mut())?;
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

/// The training record stored in a checkpoint written by `train`.
pub fn saved_record(ckpt: &Path) -> Result<TrainRecord> {
    if !ckpt.exists() {
        bail!(
            "nothing to resume: {} does not exist (is {} a run directory written by `rotvar train`?)",
            ckpt.display(),
            ckpt.parent().unwrap_or(Path::new(".")).display()
        );
    }
    match checkpoint::read_header(ckpt)? {
        (_, Some(json)) => Ok(parse_run_state(ckpt, &json)?.record),
        (_, None) => bail!("{} holds weights without a training state: it cannot be resumed", ckpt.display()),
    }
}

/// If `out` holds a checkpoint, it must be one `cfg` can continue (or reuse, when finished):
/// checked from its header alone, so a mismatch is found before any training.
pub fn check_continuable(out: &Path, cfg: &TrainConfig, train_images: usize, test_images: usize) -> Result<()> {
    let ckpt = out.join("model.safetensors");
    if !ckpt.exists() {
        return Ok(());
    }
    let (_, json) = checkpoint::read_header(&ckpt)?;
    let Some(json) = json else {
        bail!(
            "{} holds weights without a training state: pass --overwrite to retrain it, or choose another --out",
            ckpt.display()
        );
    };
    let state = parse_run_state(&ckpt, &json)?;
    if let Some(diff) = config_difference(&state.record, cfg, train_images, test_images) {
        bail!(
            "{} was trained with another configuration ({diff}): pass --overwrite to retrain it, or choose another --out",
            out.display()
        );
    }
    if state.position.epochs_done > cfg.epochs {
        bail!(
            "{} has trained {} epochs, more than the {} asked for: ask for at least as many, pass --overwrite, \
             or choose another --out",
            out.display(),
            state.position.epochs_done,
            cfg.epochs
        );
    }
    Ok(())
}

/// Read a pair's manifest, with an error that says what is missing.
pub fn read_manifest(dir: &Path) -> Result<PairManifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read {}: is {} a run directory written by `rotvar train-pair`?", path.display(), dir.display())
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid pair manifest", path.display()))
}
