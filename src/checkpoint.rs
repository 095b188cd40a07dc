//! Checkpoints: safetensors files with PyTorch-style state-dict names (`conv1.weight`, ...) and
//! a JSON header entry describing how to rebuild and feed the model.

use crate::augment::Augment;
use crate::backend::BackendRef;
use crate::data::Normalization;
use crate::fsio::write_atomic;
use crate::models::{InputSpec, Model};
use anyhow::{bail, Context, Result};
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

const META_KEY: &str = "rotvar";

pub fn save(path: &Path, model: &Model, meta: &CheckpointMeta) -> Result<()> {
    let state = model.state();
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::with_capacity(state.len());
    for (name, t) in &state {
        let v = t.to_vec()?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("refusing to save {}: {name}[{i}] is {} (training diverged?)", path.display(), v[i]);
        }
        bytes.push((name.clone(), bytemuck::cast_slice(&v).to_vec(), t.shape().to_vec()));
    }
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let mut info = HashMap::new();
    info.insert(META_KEY.to_string(), serde_json::to_string(meta)?);
    let out = safetensors::tensor::serialize(views, Some(info))?;
    write_atomic(path, &out)
}

/// Rebuild the model a checkpoint was saved from and load its tensors onto `backend`.
pub fn load(path: &Path, backend: &BackendRef) -> Result<(Model, CheckpointMeta)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let bad = |what: String| anyhow::anyhow!("{} is not a usable rotvar checkpoint: {what}", path.display());
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("{e}")))?;
    let meta_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| bad("no rotvar metadata in its header".into()))?;
    let meta: CheckpointMeta = serde_json::from_str(meta_json).map_err(|e| bad(format!("bad metadata: {e}")))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("{e}")))?;
    let model = Model::build(&meta.arch, meta.input, backend, 0).map_err(|e| bad(format!("{e}")))?;
    let state = model.state();
    for (name, t) in &state {
        let view = tensors.tensor(name).map_err(|_| bad(format!("tensor '{name}' is missing")))?;
        if view.dtype() != Dtype::F32 {
            bail!(bad(format!("tensor '{name}' has dtype {:?}, expected F32", view.dtype())));
        }
        if view.shape() != t.shape() {
            bail!(bad(format!(
                "tensor '{name}' has shape {:?}, the {} model needs {:?}",
                view.shape(),
                meta.arch,
                t.shape()
            )));
        }
        // The byte buffer is not necessarily 4-aligned: copy out element by element.
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        t.copy_from_host(&data)?;
    }
    let expected: std::collections::HashSet<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(extra) = tensors.names().into_iter().find(|n| !expected.contains(n)) {
        bail!(bad(format!("unexpected tensor '{extra}' for model {}", meta.arch)));
    }
    Ok((model, meta))
}
