use super::{activation_grad, grad, output};
use crate::autograd::push;
use crate::backend::{Activation, NormGeom};
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// A batch-norm layer's parameters and running statistics (PyTorch's names and defaults).
pub struct BatchNormState<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub momentum: f32,
    pub eps: f32,
}

/// Batch norm over [N, C] (1d) or [N, C, H, W] (2d). Training mode normalizes with batch
/// statistics and updates the running ones; eval mode uses the running statistics.
pub fn batch_norm(x: &Tensor, s: &BatchNormState, train: bool) -> Result<Tensor> {
    batch_norm_act(x, s, train, Activation::Identity)
}

/// act(batch_norm(x)) in one pass: equal, bit for bit, to the activation op applied to
/// [`batch_norm`]'s output.
pub fn batch_norm_act(x: &Tensor, s: &BatchNormState, train: bool, act: Activation) -> Result<Tensor> {
    let g = match x.shape() {
        [n, c] => NormGeom { n: *n, c: *c, hw: 1 },
        [n, c, h, w] => NormGeom { n: *n, c: *c, hw: h * w },
        other => bail!("batch_norm: input must be [N, C] or [N, C, H, W], got {other:?}"),
    };
    for (name, t) in
        [("weight", s.gamma), ("bias", s.beta), ("running_mean", s.running_mean), ("running_var", s.running_var)]
    {
        if t.shape() != [g.c] {
            bail!("batch_norm: {name} has shape {:?}, expected [{}]", t.shape(), g.c);
        }
    }
    if train && g.count() < 2 {
        bail!("batch_norm: training needs more than one value per channel, got input {:?}", x.shape());
    }
    let be = x.backend().clone();
    let mut ys = be.alloc(g.len())?;
    if !train {
        be.batchnorm_fwd_eval(
            &x.storage(),
            &s.gamma.storage(),
            &s.beta.storage(),
            &s.running_mean.storage(),
            &s.running_var.storage(),
            act,
            &mut ys,
            s.eps,
            &g,
        )?;
        // Eval mode is an affine map with fixed statistics; its backward is never needed by
        // rotvar (training always uses batch statistics), so eval records nothing.
        return Tensor::from_storage(&be, x.shape(), ys, false);
    }
    let (mut mean, mut invstd) = (be.alloc(g.c)?, be.alloc(g.c)?);
    be.batchnorm_fwd_train(
        &x.storage(),
        &s.gamma.storage(),
        &s.beta.storage(),
        act,
        &mut ys,
        &mut mean,
        &mut invstd,
        &mut s.running_mean.storage_mut(),
        &mut s.running_var.storage_mut(),
        s.momentum,
        s.eps,
        &g,
    )?;
    let y = output(&[x, s.gamma, s.beta], x.shape(), ys)?;
    if y.is_tracked() {
        let (x, gamma, beta, y_id) = (x.clone(), s.gamma.clone(), s.beta.clone(), y.id());
        let y_kept = (act != Activation::Identity).then(|| y.clone());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take_id(y_id) else {
                return Ok(());
            };
            let (mut dx, mut dgamma, mut dbeta) = (be.alloc(g.len())?, be.alloc(g.c)?, be.alloc(g.c)?);
            let (xs, gs) = (x.storage(), gamma.storage());
            match (act, &y_kept) {
                // The ReLU's backward inside batch norm's, where the backend fuses them.
                (Activation::Relu, Some(y)) => be.batchnorm_relu_bwd(
                    &xs,
                    &gs,
                    &mean,
                    &invstd,
                    &y.storage(),
                    &dy.storage(),
                    &mut dx,
                    &mut dgamma,
                    &mut dbeta,
                    &g,
                )?,
                _ => {
                    let dy = activation_grad(&be, act, y_kept.as_ref(), dy)?;
                    be.batchnorm_bwd(&xs, &gs, &mean, &invstd, &dy.storage(), &mut dx, &mut dgamma, &mut dbeta, &g)?;
                }
            }
            drop((xs, gs));
            grads.accumulate(&x, grad(&be, x.shape(), dx)?)?;
            grads.accumulate(&gamma, grad(&be, &[g.c], dgamma)?)?;
            grads.accumulate(&beta, grad(&be, &[g.c], dbeta)?)
        }));
    }
    Ok(y)
}
