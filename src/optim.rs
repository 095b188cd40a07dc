//! Optimizers: SGD with momentum and Adam, with PyTorch's update rules.
//!
//! Weight decay is an L2 term added to the gradient (torch.optim semantics) and applies only to
//! parameters marked `decay` (those that are not 1-D), as the reference protocol does.

use crate::autograd::Gradients;
use crate::backend::{AdamParams, AdamTensor, SgdParams, Storage};
use crate::nn::Param;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Sgd,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    pub lr: f32,
    pub weight_decay: f32,
    /// SGD momentum.
    pub momentum: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl OptimConfig {
    pub fn new(kind: OptimizerKind, lr: f32, weight_decay: f32) -> Self {
        OptimConfig { kind, lr, weight_decay, momentum: 0.9, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// An optimizer's state on the host: what a checkpoint needs for `--resume` to continue
/// bit for bit.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub step: u32,
    /// Per parameter that has been updated: (name, first moment or velocity, second moment).
    pub moments: Vec<(String, Vec<f32>, Vec<f32>)>,
}

pub struct Optimizer {
    pub config: OptimConfig,
    params: Vec<Param>,
    /// Per parameter: (first moment or velocity, second moment); allocated on first use.
    state: Vec<Option<(Storage, Storage)>>,
    step: u32,
}

impl Optimizer {
    pub fn new(config: OptimConfig, params: Vec<Param>) -> Result<Self> {
        if !(config.lr.is_finite() && config.lr > 0.0) {
            bail!("learning rate must be a positive number, got {}", config.lr);
        }
        if !(config.weight_decay.is_finite() && config.weight_decay >= 0.0) {
            bail!("weight decay must be ≥ 0, got {}", config.weight_decay);
        }
        let state = params.iter().map(|_| None).collect();
        Ok(Optimizer { config, params, state, step: 0 })
    }

    pub fn steps_taken(&self) -> u32 {
        self.step
    }

    pub fn export_state(&self) -> Result<OptimizerState> {
        let mut moments = Vec::new();
        for (p, st) in self.params.iter().zip(&self.state) {
            if let Some((m, v)) = st {
                let be = p.tensor.backend();
                moments.push((p.name.clone(), be.download(m)?, be.download(v)?));
            }
        }
        Ok(OptimizerState { step: self.step, moments })
    }

    /// Restore a saved state; every name and length must match this optimizer's parameters.
    pub fn import_state(&mut self, saved: &OptimizerState) -> Result<()> {
        let mut state: Vec<Option<(Storage, Storage)>> = self.params.iter().map(|_| None).collect();
        for (name, m, v) in &saved.moments {
            let Some(i) = self.params.iter().position(|p| &p.name == name) else {
                bail!("optimizer state for '{name}', which the model does not have");
            };
            let p = &self.params[i].tensor;
            if m.len() != p.numel() || v.len() != p.numel() {
                bail!(
                    "optimizer state for '{name}' has {} and {} values, the parameter has {}",
                    m.len(),
                    v.len(),
                    p.numel()
                );
            }
            if state[i].is_some() {
                bail!("optimizer state for '{name}' appears twice");
            }
            state[i] = Some((p.backend().upload(m)?, p.backend().upload(v)?));
        }
        self.state = state;
        self.step = saved.step;
        Ok(())
    }

    /// Apply one update from `grads`; parameters without a gradient are left alone. Adam
    /// updates every tensor in one backend call (one kernel launch on a GPU).
    pub fn step(&mut self, grads: &Gradients) -> Result<()> {
        self.step += 1;
        self.update(grads, None)
    }

    /// [`Optimizer::step`] with Adam's step scalars read on the device (a row of
    /// [`Optimizer::fed_scalars`] staged by the feed), for a step replayed as a graph. It does
    /// not count the step: the caller counts each time the step runs ([`Optimizer::count_step`]).
    pub fn step_fed(&mut self, grads: &Gradients, scalars: &Tensor) -> Result<()> {
        if scalars.numel() != 6 {
            bail!("optimizer: {} step scalars on the device, Adam takes 6", scalars.numel());
        }
        self.update(grads, Some(scalars))
    }

    /// Count a step run by [`Optimizer::step_fed`] (or a replay of it).
    pub fn count_step(&mut self) {
        self.step += 1;
    }

    /// Adam's scalars ([`AdamParams::scalars`]) of the next `steps` steps, 6 values a step;
    /// zeros for SGD, whose step does not change with the count.
    pub fn fed_scalars(&self, steps: usize) -> Vec<f32> {
        let c = self.config;
        (1..=steps as u32)
            .flat_map(|j| match c.kind {
                OptimizerKind::Adam => AdamParams {
                    lr: c.lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: 0.0,
                    step: self.step + j,
                }
                .scalars(),
                OptimizerKind::Sgd => [0.0; 6],
            })
            .collect()
    }

    fn update(&mut self, grads: &Gradients, fed: Option<&Tensor>) -> Result<()> {
        let c = self.config;
        let mut live = Vec::new();
        for ((p, st), i) in self.params.iter().zip(self.state.iter_mut()).zip(0..) {
            let Some(g) = grads.get(&p.tensor) else {
                continue;
            };
            if st.is_none() {
                let be = p.tensor.backend();
                *st = Some((be.zeros(p.tensor.numel())?, be.zeros(p.tensor.numel())?));
            }
            live.push((i, g));
        }
        let Some(&(first, _)) = live.first() else {
            return Ok(());
        };
        let be = self.params[first].tensor.backend().clone();
        if let Some((i, _)) = live.iter().find(|(i, _)| self.params[*i].tensor.device() != be.device()) {
            bail!(
                "optimizer: parameter {} is on {}, the others on {}",
                self.params[*i].name,
                self.params[*i].tensor.device(),
                be.device()
            );
        }
        let decay = |i: usize| if self.params[i].decay { c.weight_decay } else { 0.0 };
        match c.kind {
            OptimizerKind::Adam => {
                let mut data: Vec<_> = live.iter().map(|(i, _)| self.params[*i].tensor.storage_mut()).collect();
                let grad: Vec<_> = live.iter().map(|(_, g)| g.storage()).collect();
                // `live` is in parameter order and every live parameter has its moments by now.
                let moments = self
                    .state
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| live.binary_search_by_key(i, |(j, _)| *j).is_ok())
                    .filter_map(|(_, st)| st.as_mut());
                let mut tensors: Vec<_> = data
                    .iter_mut()
                    .zip(&grad)
                    .zip(moments)
                    .zip(&live)
                    .map(|(((d, g), (m, v)), (i, _))| AdamTensor { param: d, grad: g, m, v, weight_decay: decay(*i) })
                    .collect();
                let h = AdamParams {
                    lr: c.lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: 0.0,
                    step: self.step,
                };
                match fed {
                    Some(scalars) => be.adam_step_many_fed(&mut tensors, &scalars.storage())?,
                    None => be.adam_step_many(&mut tensors, &h)?,
                }
            }
            OptimizerKind::Sgd => {
                for (i, g) in &live {
                    let Some((velocity, _)) = self.state[*i].as_mut() else {
                        bail!("internal: SGD momentum missing");
                    };
                    let h = SgdParams { lr: c.lr, momentum: c.momentum, weight_decay: decay(*i) };
                    be.sgd_step(&mut self.params[*i].tensor.storage_mut(), &g.storage(), velocity, &h)?;
                }
            }
        }
        Ok(())
    }
}
