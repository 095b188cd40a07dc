//! Optimizers: SGD with momentum and Adam, with PyTorch's update rules.
//!
//! Weight decay is an L2 term added to the gradient (torch.optim semantics) and applies only to
//! parameters marked `decay` (those that are not 1-D), as the reference protocol does.

use crate::autograd::Gradients;
use crate::backend::{AdamParams, SgdParams, Storage};
use crate::nn::Param;
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

    /// Apply one update from `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &Gradients) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for (p, st) in self.params.iter().zip(self.state.iter_mut()) {
            let Some(g) = grads.get(&p.tensor) else {
                continue;
            };
            let be = p.tensor.backend().clone();
            let (a, b) = match st {
                Some(s) => s,
                None => st.insert((be.zeros(p.tensor.numel())?, be.zeros(p.tensor.numel())?)),
            };
            let wd = if p.decay { c.weight_decay } else { 0.0 };
            let mut data = p.tensor.storage_mut();
            match c.kind {
                OptimizerKind::Adam => {
                    let h = AdamParams {
                        lr: c.lr,
                        beta1: c.beta1,
                        beta2: c.beta2,
                        eps: c.eps,
                        weight_decay: wd,
                        step: self.step,
                    };
                    be.adam_step(&mut data, &g.storage(), a, b, &h)?;
                }
                OptimizerKind::Sgd => {
                    let h = SgdParams { lr: c.lr, momentum: c.momentum, weight_decay: wd };
                    be.sgd_step(&mut data, &g.storage(), a, &h)?;
                }
            }
        }
        Ok(())
    }
}
