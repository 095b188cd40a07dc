use super::{activation_grad, grad, output, same_device};
use crate::autograd::push;
use crate::backend::{Activation, BackendRef, Storage};
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// a + b (same shapes): residual connections.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    add_act(a, b, Activation::Identity)
}

/// act(a + b) in one pass: a residual block's sum and its ReLU; the same bits as the activation
/// op applied to [`add`]'s output.
pub fn add_act(a: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    same_device("add", &[a, b])?;
    if a.shape() != b.shape() {
        bail!("add: shapes differ: {:?} vs {:?}", a.shape(), b.shape());
    }
    let be = a.backend().clone();
    let mut ys = be.alloc(a.numel())?;
    be.add(&a.storage(), &b.storage(), act, &mut ys)?;
    let y = output(&[a, b], a.shape(), ys)?;
    if y.is_tracked() {
        let (a, b, y_id) = (a.clone(), b.clone(), y.id());
        let y_kept = (act != Activation::Identity).then(|| y.clone());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take_id(y_id) else {
                return Ok(());
            };
            let dy = activation_grad(&be, act, y_kept.as_ref(), dy)?;
            // Each input gets its own copy: gradients are accumulated in place later.
            if a.is_tracked() {
                let mut da = be.alloc(dy.numel())?;
                be.scale(&dy.storage(), 1.0, &mut da)?;
                grads.accumulate(&a, grad(&be, a.shape(), da)?)?;
            }
            if b.is_tracked() {
                grads.accumulate(&b, dy)?;
            }
            Ok(())
        }));
    }
    Ok(y)
}

/// alpha · x
pub fn scale(x: &Tensor, alpha: f32) -> Result<Tensor> {
    let be = x.backend().clone();
    let mut ys = be.alloc(x.numel())?;
    be.scale(&x.storage(), alpha, &mut ys)?;
    let y = output(&[x], x.shape(), ys)?;
    if y.is_tracked() {
        let (x, y_id) = (x.clone(), y.id());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take_id(y_id) else {
                return Ok(());
            };
            let mut dx = be.alloc(x.numel())?;
            be.scale(&dy.storage(), alpha, &mut dx)?;
            grads.accumulate(&x, grad(&be, x.shape(), dx)?)
        }));
    }
    Ok(y)
}

pub fn relu(x: &Tensor) -> Result<Tensor> {
    let be = x.backend().clone();
    let mut ys = be.alloc(x.numel())?;
    be.relu_fwd(&x.storage(), &mut ys)?;
    let y = output(&[x], x.shape(), ys)?;
    if y.is_tracked() {
        let (x, yk) = (x.clone(), y.clone());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take(&yk) else {
                return Ok(());
            };
            let mut dx = be.alloc(x.numel())?;
            be.relu_bwd(&yk.storage(), &dy.storage(), &mut dx)?;
            grads.accumulate(&x, grad(&be, x.shape(), dx)?)
        }));
    }
    Ok(y)
}

pub fn elu(x: &Tensor, alpha: f32) -> Result<Tensor> {
    let be = x.backend().clone();
    let mut ys = be.alloc(x.numel())?;
    be.elu_fwd(&x.storage(), alpha, &mut ys)?;
    let y = output(&[x], x.shape(), ys)?;
    if y.is_tracked() {
        let (x, yk) = (x.clone(), y.clone());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take(&yk) else {
                return Ok(());
            };
            let mut dx = be.alloc(x.numel())?;
            be.elu_bwd(&x.storage(), &yk.storage(), &dy.storage(), alpha, &mut dx)?;
            grads.accumulate(&x, grad(&be, x.shape(), dx)?)
        }));
    }
    Ok(y)
}

/// Inverted dropout in training (`train` false: identity). `seed` must differ per step.
pub fn dropout(x: &Tensor, p: f32, train: bool, seed: u64) -> Result<Tensor> {
    dropout_with(x, p, train, |be, xs, ys, mask| be.dropout_fwd(xs, p, seed, ys, mask))
}

/// [`dropout`] with the step's seed on the device (`Backend::dropout_fed`): the mask of layer
/// `layer` is the one `dropout` draws from splitmix64(step_seed ^ layer).
pub fn dropout_fed(x: &Tensor, p: f32, train: bool, seed: &Tensor, layer: u64) -> Result<Tensor> {
    if seed.numel() != 2 {
        bail!("dropout: the device seed holds {} values, not 2", seed.numel());
    }
    dropout_with(x, p, train, |be, xs, ys, mask| be.dropout_fed(xs, p, &seed.storage(), layer, ys, mask))
}

fn dropout_with(
    x: &Tensor,
    p: f32,
    train: bool,
    draw: impl FnOnce(&BackendRef, &Storage, &mut Storage, &mut Storage) -> Result<()>,
) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        bail!("dropout: probability must be in [0, 1), got {p}");
    }
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    let be = x.backend().clone();
    let (mut ys, mut mask) = (be.alloc(x.numel())?, be.alloc(x.numel())?);
    draw(&be, &x.storage(), &mut ys, &mut mask)?;
    let y = output(&[x], x.shape(), ys)?;
    if y.is_tracked() {
        let (x, y_id) = (x.clone(), y.id());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take_id(y_id) else {
                return Ok(());
            };
            let mut dx = be.alloc(x.numel())?;
            be.mul(&dy.storage(), &mask, &mut dx)?;
            grads.accumulate(&x, grad(&be, x.shape(), dx)?)
        }));
    }
    Ok(y)
}
