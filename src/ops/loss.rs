use super::{expect_rank, grad, output};
use crate::autograd::push;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// Row-wise log-softmax of [N, C] logits.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    expect_rank("log_softmax", "input", x, 2)?;
    let (rows, cols) = (x.dim(0), x.dim(1));
    let be = x.backend().clone();
    let mut ys = be.alloc(x.numel())?;
    be.log_softmax_fwd(&x.storage(), &mut ys, rows, cols)?;
    let y = output(&[x], x.shape(), ys)?;
    if y.is_tracked() {
        let (x, yk) = (x.clone(), y.clone());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take(&yk) else {
                return Ok(());
            };
            let mut dx = be.alloc(x.numel())?;
            be.log_softmax_bwd(&yk.storage(), &dy.storage(), &mut dx, rows, cols)?;
            grads.accumulate(&x, grad(&be, x.shape(), dx)?)
        }));
    }
    Ok(y)
}

/// Mean negative log-likelihood of `labels` (class indices as f32, shape [N]) under `logp`.
pub fn nll_loss(logp: &Tensor, labels: &Tensor) -> Result<Tensor> {
    expect_rank("nll_loss", "log-probabilities", logp, 2)?;
    let (rows, cols) = (logp.dim(0), logp.dim(1));
    if labels.shape() != [rows] {
        bail!("nll_loss: labels have shape {:?}, expected [{rows}]", labels.shape());
    }
    let be = logp.backend().clone();
    let mut ls = be.alloc(1)?;
    be.nll_fwd(&logp.storage(), &labels.storage(), &mut ls, rows, cols)?;
    let loss = output(&[logp], &[1], ls)?;
    if loss.is_tracked() {
        let (logp, labels, id) = (logp.clone(), labels.clone(), loss.id());
        push(Box::new(move |grads| {
            let Some(dl) = grads.take_id(id) else {
                return Ok(());
            };
            let mut d = be.alloc(rows * cols)?;
            be.nll_bwd(&labels.storage(), &dl.storage(), &mut d, rows, cols)?;
            grads.accumulate(&logp, grad(&be, logp.shape(), d)?)
        }));
    }
    Ok(loss)
}

/// Softmax cross-entropy = NLL of log-softmax, as every rotvar model ends.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    nll_loss(&log_softmax(logits)?, labels)
}

/// Σ x, as a one-element tensor.
pub fn sum(x: &Tensor) -> Result<Tensor> {
    reduce(x, 1.0)
}

/// mean(x), as a one-element tensor.
pub fn mean(x: &Tensor) -> Result<Tensor> {
    reduce(x, 1.0 / x.numel().max(1) as f32)
}

fn reduce(x: &Tensor, alpha: f32) -> Result<Tensor> {
    let be = x.backend().clone();
    let (mut s, mut ys) = (be.alloc(1)?, be.alloc(1)?);
    be.sum(&x.storage(), &mut s)?;
    be.scale(&s, alpha, &mut ys)?;
    let y = output(&[x], &[1], ys)?;
    if y.is_tracked() {
        let (x, id) = (x.clone(), y.id());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take_id(id) else {
                return Ok(());
            };
            let mut dx = be.alloc(x.numel())?;
            be.broadcast_scalar(&dy.storage(), alpha, &mut dx)?;
            grads.accumulate(&x, grad(&be, x.shape(), dx)?)
        }));
    }
    Ok(y)
}
