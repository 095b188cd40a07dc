//! Checkpoints: safetensors files with PyTorch-style state-dict names (`conv1.weight`, ...) and
//! a JSON header entry describing how to rebuild and feed the model.
//!
//! A training run also stores, beside the weights, what `--resume` needs to continue bit for bit
//! (the optimizer's moments as `training.*` tensors, the run's position and record as a second
//! header entry), so the weights and the record of the epoch that produced them are one file and
//! can never disagree.
//!
//! Nothing in a file is trusted before it is checked: the metadata is bounded and checked against
//! the tensors and the dataset before a model is allocated or run, and non-finite weights are
//! refused by name.

use crate::augment::Augment;
use crate::backend::BackendRef;
use crate::data::{self, Dataset, Normalization};
use crate::fsio::write_atomic;
use crate::limits;
use crate::models::{InputSpec, Model, MODELS};
use anyhow::{bail, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Everything besides the weights that a later `eval` or `measure` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub arch: String,
    pub input: InputSpec,
    pub dataset: String,
    pub class_names: Vec<String>,
    /// Training-set statistics; inputs are normalized with these at evaluation time too.
    pub normalization: Normalization,
    /// Training augmentation (canonical text: "none", "rotate", "rotate,zoom=0.8:1.2", ...).
    pub augment: Augment,
    pub rotvar_version: String,
    pub epochs_trained: usize,
}

/// A run's state stored beside the weights: a JSON document and host tensors, whose names all
/// start with [`TRAINING_PREFIX`].
#[derive(Debug, Clone)]
pub struct TrainingState {
    pub json: String,
    pub tensors: Vec<(String, Vec<f32>)>,
}

pub struct Loaded {
    pub model: Model,
    pub meta: CheckpointMeta,
    /// Present in checkpoints written by `train`; absent in weights-only files.
    pub training: Option<TrainingState>,
}

const META_KEY: &str = "rotvar";
const TRAINING_KEY: &str = "rotvar.training";
pub const TRAINING_PREFIX: &str = "training.";

impl CheckpointMeta {
    /// Bounds and internal consistency, checked before anything is allocated from these numbers.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !MODELS.contains(&self.arch.as_str()) {
            return Err(format!("unknown model '{}' (rotvar knows {})", self.arch, MODELS.join(", ")));
        }
        let i = &self.input;
        for (v, b) in [
            (i.channels, limits::INPUT_CHANNELS),
            (i.height, limits::INPUT_SIDE),
            (i.width, limits::INPUT_SIDE),
            (i.classes, limits::CLASSES),
        ] {
            if !b.contains(v as f64) {
                return Err(format!("its {} is {v}, outside {}", b.name, b.range()));
            }
        }
        if let Some([c, h, w]) = data::known_shape(&self.dataset) {
            if [c, h, w] != [i.channels, i.height, i.width] {
                return Err(format!(
                    "it says it was trained on {} ({c}x{h}x{w} images) but describes {}x{}x{} inputs",
                    self.dataset, i.channels, i.height, i.width
                ));
            }
        }
        if self.class_names.len() != i.classes {
            return Err(format!("it names {} classes but its model has {}", self.class_names.len(), i.classes));
        }
        let n = &self.normalization;
        if n.mean.len() != i.channels || n.std.len() != i.channels {
            return Err(format!(
                "its normalization has {} means and {} standard deviations for {} channel(s)",
                n.mean.len(),
                n.std.len(),
                i.channels
            ));
        }
        if let Some(v) = n.mean.iter().chain(&n.std).find(|v| !v.is_finite()) {
            return Err(format!("its normalization holds {v}"));
        }
        // 0 is what a constant training channel gives (it is then only centred); below 0 is corrupt.
        if let Some(s) = n.std.iter().find(|&&s| s < 0.0) {
            return Err(format!("its normalization has a standard deviation of {s}; it must be ≥ 0"));
        }
        if self.epochs_trained as f64 > limits::EPOCHS.hi {
            return Err(format!("it records {} epochs of training", self.epochs_trained));
        }
        Ok(())
    }

    /// Whether `ds` can be fed to this checkpoint's model: channels, size and classes.
    pub fn check_dataset(&self, ds: &Dataset, ckpt: &Path) -> Result<()> {
        let i = &self.input;
        if [ds.channels, ds.height, ds.width] != [i.channels, i.height, i.width] {
            bail!(
                "{} expects {}x{}x{} images but the {} {} set has {}x{}x{}: pass the --dataset it was trained on ({})",
                ckpt.display(),
                i.channels,
                i.height,
                i.width,
                ds.name,
                ds.split,
                ds.channels,
                ds.height,
                ds.width,
                self.dataset
            );
        }
        if ds.num_classes() != i.classes {
            bail!(
                "{} was trained on {} classes but the {} {} set has {}: pass the --dataset it was trained on ({})",
                ckpt.display(),
                i.classes,
                ds.name,
                ds.split,
                ds.num_classes(),
                self.dataset
            );
        }
        if let Some(&l) = ds.labels.iter().find(|&&l| l as usize >= i.classes) {
            bail!("the {} {} set has label {l}, but {} has {} classes", ds.name, ds.split, ckpt.display(), i.classes);
        }
        Ok(())
    }
}

pub fn save(path: &Path, model: &Model, meta: &CheckpointMeta, training: Option<&TrainingState>) -> Result<()> {
    let state = model.state();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::with_capacity(state.len());
    for (name, t) in &state {
        let v = t.to_vec()?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("refusing to save {}: {name}[{i}] is {} (training diverged?)", path.display(), v[i]);
        }
        tensors.push((name.clone(), bytemuck::cast_slice(&v).to_vec(), t.shape().to_vec()));
    }
    let mut info = HashMap::new();
    info.insert(META_KEY.to_string(), serde_json::to_string(meta)?);
    if let Some(tr) = training {
        for (name, v) in &tr.tensors {
            if !name.starts_with(TRAINING_PREFIX) {
                bail!("internal: training tensor '{name}' lacks the '{TRAINING_PREFIX}' prefix");
            }
            tensors.push((name.clone(), bytemuck::cast_slice(v).to_vec(), vec![v.len()]));
        }
        info.insert(TRAINING_KEY.to_string(), tr.json.clone());
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let out = safetensors::tensor::serialize(views, Some(info))?;
    write_atomic(path, &out)
}

fn unusable(path: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is not a usable rotvar checkpoint: {what}. Use a model.safetensors written by `rotvar train` \
         (a copy that is incomplete or was edited cannot be loaded)",
        path.display()
    )
}

/// What the safetensors reader's complaint means for a user.
fn structure_error(path: &Path, e: safetensors::SafeTensorError) -> anyhow::Error {
    use safetensors::SafeTensorError as E;
    let what = match &e {
        E::HeaderTooSmall | E::HeaderTooLarge | E::InvalidHeaderLength => {
            "its header length is impossible: the file is truncated or is not a safetensors file".to_string()
        }
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) => {
            "its header is not valid safetensors JSON: the file is corrupt or is not a safetensors file".to_string()
        }
        E::MetadataIncompleteBuffer | E::InvalidOffset(_) => {
            "its tensors run past the end of the file: the file is truncated".to_string()
        }
        _ => format!("its tensor layout is invalid ({e})"),
    };
    unusable(path, what)
}

fn parse_meta(path: &Path, bytes: &[u8]) -> Result<(CheckpointMeta, Option<String>)> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| structure_error(path, e))?;
    let info = header.metadata().as_ref();
    let meta_json = info
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| unusable(path, "its header has no rotvar metadata (was it written by another program?)"))?;
    let meta: CheckpointMeta = serde_json::from_str(meta_json)
        .map_err(|e| unusable(path, format!("its rotvar metadata does not parse ({e})")))?;
    meta.validate().map_err(|why| unusable(path, format!("its metadata is inconsistent: {why}")))?;
    Ok((meta, info.and_then(|m| m.get(TRAINING_KEY)).cloned()))
}

/// The checked metadata of a checkpoint, without loading its weights.
pub fn read_meta(path: &Path) -> Result<CheckpointMeta> {
    Ok(read_header(path)?.0)
}

/// The checked metadata and the training record (JSON, if any), without loading the weights.
pub fn read_header(path: &Path) -> Result<(CheckpointMeta, Option<String>)> {
    parse_meta(path, &data::read_file(path)?)
}

/// Rebuild the model a checkpoint was saved from and load its tensors onto `backend`.
pub fn load(path: &Path, backend: &BackendRef) -> Result<(Model, CheckpointMeta)> {
    let l = load_full(path, backend)?;
    Ok((l.model, l.meta))
}

/// [`load`], plus the run state that `--resume` continues from, if the file has one.
pub fn load_full(path: &Path, backend: &BackendRef) -> Result<Loaded> {
    let bytes = data::read_file(path)?;
    let (meta, training_json) = parse_meta(path, &bytes)?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| structure_error(path, e))?;
    for (name, view) in tensors.iter() {
        if view.dtype() != Dtype::F32 {
            bail!(unusable(path, format!("tensor '{name}' has dtype {:?}; rotvar writes only F32", view.dtype())));
        }
    }
    let model = Model::build(&meta.arch, meta.input, backend, 0).map_err(|e| unusable(path, e))?;
    let state = model.state();
    for (name, t) in &state {
        let view = tensors.tensor(name).map_err(|_| unusable(path, format!("tensor '{name}' is missing")))?;
        if view.shape() != t.shape() {
            bail!(unusable(
                path,
                format!(
                    "tensor '{name}' has shape {:?}, but {} for {}x{}x{} inputs and {} classes needs {:?}",
                    view.shape(),
                    meta.arch,
                    meta.input.channels,
                    meta.input.height,
                    meta.input.width,
                    meta.input.classes,
                    t.shape()
                )
            ));
        }
        t.copy_from_host(&finite_values(path, name, &view)?)?;
    }
    let expected: std::collections::HashSet<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra = Vec::new();
    for name in tensors.names() {
        if name.starts_with(TRAINING_PREFIX) {
            let view = tensors.tensor(name).map_err(|e| structure_error(path, e))?;
            extra.push((name.to_string(), finite_values(path, name, &view)?));
        } else if !expected.contains(name) {
            bail!(unusable(path, format!("it holds tensor '{name}', which model {} does not have", meta.arch)));
        }
    }
    let training = match (training_json, extra.is_empty()) {
        (Some(json), _) => Some(TrainingState { json, tensors: extra }),
        (None, true) => None,
        (None, false) => bail!(unusable(path, "it holds optimizer tensors but no training record")),
    };
    Ok(Loaded { model, meta, training })
}

/// A tensor's values, refused by name if any is NaN or infinite.
fn finite_values(path: &Path, name: &str, view: &TensorView) -> Result<Vec<f32>> {
    // The byte buffer is not necessarily 4-aligned: copy out element by element.
    let data: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        bail!(unusable(
            path,
            format!(
                "tensor '{name}' holds {} at index {i}; it was saved from a diverged run or damaged. \
                 Use an earlier checkpoint or retrain",
                data[i]
            )
        ));
    }
    Ok(data)
}
