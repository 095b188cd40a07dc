//! Differentiable ops: check shapes, run the backend's forward, and record the backward.
//!
//! Each op reads like a recipe: allocate the output, call one backend method, and, if an input
//! is tracked and a tape records, push a closure that maps the output's gradient to the inputs'.

mod dense;
mod elementwise;
mod loss;
mod norm;
mod pool;
mod rotate;
mod shape;

pub use dense::{conv2d, conv2d_act, conv2d_act_pool, linear, linear_act};
pub use elementwise::{add, add_act, dropout, dropout_fed, elu, relu, scale};
pub use loss::{cross_entropy, log_softmax, mean, nll_loss, sum};
pub use norm::{batch_norm, batch_norm_act, BatchNormState};
pub use pool::{avg_pool2d, global_avg_pool, max_pool2d, pool2d};
pub use rotate::{rotate, warp, warp_fed};
pub use shape::{flatten, reshape};

use crate::autograd::needs_grad;
use crate::backend::{Activation, BackendRef, Storage};
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// Wrap a freshly computed output; it is tracked when the op must record a backward.
fn output(inputs: &[&Tensor], shape: &[usize], s: Storage) -> Result<Tensor> {
    let b = inputs[0].backend().clone();
    Tensor::from_storage(&b, shape, s, needs_grad(inputs))
}

/// An untracked gradient tensor.
fn grad(b: &BackendRef, shape: &[usize], s: Storage) -> Result<Tensor> {
    Tensor::from_storage(b, shape, s, false)
}

fn same_device(op: &str, ts: &[&Tensor]) -> Result<()> {
    let d = ts[0].device();
    if let Some(t) = ts.iter().find(|t| t.device() != d) {
        bail!("{op}: inputs on different devices ({d} and {})", t.device());
    }
    Ok(())
}

fn expect_rank(op: &str, what: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        bail!("{op}: {what} must have rank {rank}, got shape {:?}", t.shape());
    }
    Ok(())
}

/// The gradient at the pre-activation from the gradient at the fused output `y`. ReLU's needs
/// only y's sign (y > 0 exactly where its input is), so the pre-activation is never kept.
pub(crate) fn activation_grad(be: &BackendRef, act: Activation, y: Option<&Tensor>, dy: Tensor) -> Result<Tensor> {
    match (act, y) {
        (Activation::Identity, _) => Ok(dy),
        (Activation::Relu, None) => bail!("internal: fused ReLU backward without its output"),
        (Activation::Relu, Some(y)) => {
            let mut dz = be.alloc(dy.numel())?;
            be.relu_bwd(&y.storage(), &dy.storage(), &mut dz)?;
            grad(be, dy.shape(), dz)
        }
    }
}
