//! The networks of docs/protocol.md ("Models"), each a `Sequential` with PyTorch-style names.
//!
//! Every model ends in log-softmax, so `forward` returns log-probabilities and the loss is the
//! negative log-likelihood (softmax cross-entropy), as in the reference code.

mod allconv;
mod convbn;
mod lenet;
mod resnet;
mod simpleconv;
mod vgg;

use crate::backend::BackendRef;
use crate::nn::{Forward, Param, Sequential};
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub const MODELS: &[&str] = &["lenet", "simpleconv", "allconv", "vgg", "vgg16", "resnet18", "resnet20", "convbn"];

/// The input a model is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

impl InputSpec {
    /// MNIST-sized models are the narrower variants in docs/protocol.md's table.
    pub fn is_grayscale(&self) -> bool {
        self.channels == 1
    }
}

pub struct Model {
    pub arch: String,
    pub input: InputSpec,
    pub net: Sequential,
}

impl Model {
    /// Build `arch` with freshly initialized weights drawn from `seed`.
    pub fn build(arch: &str, input: InputSpec, backend: &BackendRef, seed: u64) -> Result<Model> {
        let mut rng = Rng::derive(seed, "init");
        let arch = arch.to_ascii_lowercase();
        let net = match arch.as_str() {
            "lenet" => lenet::build(backend, &mut rng, &input)?,
            "simpleconv" => simpleconv::build(backend, &mut rng, &input)?,
            "allconv" => allconv::build(backend, &mut rng, &input)?,
            "vgg" => vgg::build_like(backend, &mut rng, &input)?,
            "vgg16" => vgg::build_16(backend, &mut rng, &input)?,
            "resnet18" => resnet::build(backend, &mut rng, &input, &[64, 128, 256, 512], &[2, 2, 2, 2])?,
            "resnet20" => resnet::build(backend, &mut rng, &input, &[16, 32, 64], &[3, 3, 3])?,
            "convbn" => convbn::build(backend, &mut rng, &input)?,
            other => bail!("unknown model '{other}': choose one of {}", MODELS.join(", ")),
        };
        Ok(Model { arch, input, net })
    }

    /// Log-probabilities [N, classes] for a batch [N, C, H, W].
    pub fn forward(&self, x: &Tensor, f: &mut Forward) -> Result<Tensor> {
        let s = x.shape();
        let i = &self.input;
        if s.len() != 4 || s[1] != i.channels || s[2] != i.height || s[3] != i.width {
            bail!("{}: expected input [N, {}, {}, {}], got {s:?}", self.arch, i.channels, i.height, i.width);
        }
        self.net.forward(x, f)
    }

    pub fn parameters(&self) -> Vec<Param> {
        self.net.parameters()
    }

    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.net.state()
    }

    pub fn intermediate_names(&self) -> Vec<String> {
        self.net.intermediate_names()
    }

    pub fn num_parameters(&self) -> usize {
        self.parameters().iter().map(|p| p.tensor.numel()).sum()
    }
}

/// One row of a model summary: an intermediate the forward pass reports, its output shape for
/// one image, and the parameters of the layer that produced it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    pub name: String,
    pub output: Vec<usize>,
    pub parameters: usize,
}

/// Every intermediate of `arch` built for `input`, in order, from a forward pass of one blank
/// image. Each parameter is counted at the intermediate whose name is the longest prefix of its
/// own (`layer1.0.conv1.weight` at `layer1.0.conv1`); any left over go in a last "(other)" row,
/// so the rows always add up to the model's parameter count.
pub fn summary(arch: &str, input: InputSpec, b: &BackendRef) -> Result<Vec<LayerSummary>> {
    let model = Model::build(arch, input, b, 0)?;
    let mut rows: Vec<LayerSummary> = Vec::new();
    let mut observe = |name: &str, t: &Tensor| -> Result<()> {
        rows.push(LayerSummary { name: name.to_string(), output: t.shape()[1..].to_vec(), parameters: 0 });
        Ok(())
    };
    let x = Tensor::zeros(b, &[1, input.channels, input.height, input.width])?;
    model.forward(&x, &mut Forward::observe(&mut observe))?;
    let mut other = 0;
    for p in model.parameters() {
        let owner = rows
            .iter_mut()
            .filter(|r| p.name.strip_prefix(r.name.as_str()).is_some_and(|rest| rest.starts_with('.')))
            .max_by_key(|r| r.name.len());
        match owner {
            Some(r) => r.parameters += p.tensor.numel(),
            None => other += p.tensor.numel(),
        }
    }
    if other > 0 {
        rows.push(LayerSummary { name: "(other)".into(), output: Vec::new(), parameters: other });
    }
    Ok(rows)
}

/// Spatial size after a stride-2, kernel-2 max-pool (floor, as PyTorch).
fn halved(x: usize) -> usize {
    x / 2
}
