use super::{activation_grad, expect_rank, grad, output, same_device};
use crate::autograd::{push, Gradients};
use crate::backend::{Activation, BackendRef, ConvGeom, PoolGeom, PoolKind, Storage};
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// y[n, m] = x[n, k] · w[m, k]ᵀ + b[m]  (PyTorch's nn.Linear layout).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_act(x, w, b, Activation::Identity)
}

/// act(linear(x, w, b)) in one kernel: equal, bit for bit, to the activation op applied to
/// [`linear`]'s output.
pub fn linear_act(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    expect_rank("linear", "input", x, 2)?;
    expect_rank("linear", "weight", w, 2)?;
    let (n, k, m) = (x.dim(0), x.dim(1), w.dim(0));
    if w.dim(1) != k {
        bail!("linear: input has {k} features but the weight expects {} (weight shape {:?})", w.dim(1), w.shape());
    }
    if let Some(b) = b {
        if b.shape() != [m] {
            bail!("linear: bias shape {:?}, expected [{m}]", b.shape());
        }
    }
    let mut inputs = vec![x, w];
    inputs.extend(b);
    same_device("linear", &inputs)?;
    let be = x.backend().clone();
    let mut ys = be.alloc(n * m)?;
    be.linear_fwd(&x.storage(), &w.storage(), b.map(|b| b.storage()).as_deref(), act, &mut ys, n, k, m)?;
    let y = output(&inputs, &[n, m], ys)?;
    if y.is_tracked() {
        // Identity needs nothing of the output: keeping it would hold its memory until backward.
        let (x, w, b, y_id) = (x.clone(), w.clone(), b.cloned(), y.id());
        let y_kept = (act != Activation::Identity).then(|| y.clone());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take_id(y_id) else {
                return Ok(());
            };
            let dy = activation_grad(&be, act, y_kept.as_ref(), dy)?;
            if x.is_tracked() {
                let mut dx = be.alloc(n * k)?;
                be.linear_bwd_data(&dy.storage(), &w.storage(), &mut dx, n, k, m)?;
                grads.accumulate(&x, grad(&be, x.shape(), dx)?)?;
            }
            let want_b = b.as_ref().is_some_and(|b| b.is_tracked());
            if w.is_tracked() || want_b {
                let mut dw = be.alloc(m * k)?;
                let mut db = if want_b { Some(be.alloc(m)?) } else { None };
                be.linear_bwd_weight(&x.storage(), &dy.storage(), &mut dw, db.as_mut(), n, k, m)?;
                grads.accumulate(&w, grad(&be, w.shape(), dw)?)?;
                if let (Some(b), Some(db)) = (&b, db) {
                    grads.accumulate(b, grad(&be, &[m], db)?)?;
                }
            }
            Ok(())
        }));
    }
    Ok(y)
}

/// 2-D convolution, NCHW input, OIHW weight, square stride and zero padding.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
    conv2d_act(x, w, b, stride, pad, Activation::Identity)
}

/// act(conv2d(x, w, b)) in one kernel: equal, bit for bit, to the activation op applied to
/// [`conv2d`]'s output.
pub fn conv2d_act(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: usize,
    act: Activation,
) -> Result<Tensor> {
    let (g, ys) = conv2d_forward(x, w, b, stride, pad, act)?;
    let y = output(&conv_inputs(x, w, b), &[g.n, g.c_out, g.oh, g.ow], ys)?;
    if y.is_tracked() {
        // Identity needs nothing of the output: keeping it would hold its memory until backward.
        let (x, w, b, y_id) = (x.clone(), w.clone(), b.cloned(), y.id());
        let y_kept = (act != Activation::Identity).then(|| y.clone());
        let be = x.backend().clone();
        push(Box::new(move |grads| {
            let Some(dy) = grads.take_id(y_id) else {
                return Ok(());
            };
            let want_b = b.as_ref().is_some_and(|b| b.is_tracked());
            let (dz, db) = pre_activation_grad(&be, act, y_kept.as_ref(), dy, want_b, &g)?;
            conv_grads(grads, (&x, &w, b.as_ref()), &g, dz, db)
        }));
    }
    Ok(y)
}

/// pool(act(conv2d(x, w, b))) as one node of the tape: equal, bit for bit, to [`conv2d_act`]
/// followed by [`super::pool2d`], with the activation's output kept inside for the backward pass
/// instead of as a tensor. A backend may then fuse the pool's backward, the ReLU's and the bias
/// gradient into one pass over the kept output (the CPU's does: two passes fewer over the
/// largest maps of LeNet and SimpleConv).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_act_pool(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    (stride, pad): (usize, usize),
    act: Activation,
    kind: PoolKind,
    (k, pool_stride, pool_pad): (usize, usize, usize),
) -> Result<Tensor> {
    let (g, ys) = conv2d_forward(x, w, b, stride, pad, act)?;
    let inputs = conv_inputs(x, w, b);
    let be = x.backend().clone();
    let pg = PoolGeom::new(g.n, g.c_out, g.oh, g.ow, k, pool_stride, pool_pad)?;
    let mut ps = be.alloc(pg.out_len())?;
    be.pool2d_fwd(kind, &ys, &mut ps, &pg)?;
    let p = output(&inputs, &[pg.n, pg.c, pg.oh, pg.ow], ps)?;
    if p.is_tracked() {
        let (x, w, b, p_id) = (x.clone(), w.clone(), b.cloned(), p.id());
        let y = grad(&be, &[g.n, g.c_out, g.oh, g.ow], ys)?;
        push(Box::new(move |grads| {
            let Some(dp) = grads.take_id(p_id) else {
                return Ok(());
            };
            let want_b = b.as_ref().is_some_and(|b| b.is_tracked());
            let fused = match act {
                Activation::Relu if want_b => be.pool_relu_bwd_bias(kind, &y.storage(), &dp.storage(), &pg)?,
                _ => None,
            };
            let (dz, db) = match fused {
                Some((dz, db)) => (grad(&be, y.shape(), dz)?, Some(db)),
                None => {
                    let mut dy = be.alloc(pg.in_len())?;
                    be.pool2d_bwd(kind, &y.storage(), &dp.storage(), &mut dy, &pg)?;
                    let dy = grad(&be, y.shape(), dy)?;
                    pre_activation_grad(&be, act, Some(&y), dy, want_b, &g)?
                }
            };
            conv_grads(grads, (&x, &w, b.as_ref()), &g, dz, db)
        }));
    }
    Ok(p)
}

fn conv_inputs<'a>(x: &'a Tensor, w: &'a Tensor, b: Option<&'a Tensor>) -> Vec<&'a Tensor> {
    let mut inputs = vec![x, w];
    inputs.extend(b);
    inputs
}

/// Checks the operands and computes act(conv2d(x, w) + b).
fn conv2d_forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: usize,
    act: Activation,
) -> Result<(ConvGeom, Storage)> {
    expect_rank("conv2d", "input", x, 4)?;
    expect_rank("conv2d", "weight", w, 4)?;
    let (n, c, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    if w.dim(1) != c {
        bail!("conv2d: input has {c} channels but the weight expects {} (weight shape {:?})", w.dim(1), w.shape());
    }
    let g = ConvGeom::new(n, c, h, wd, w.dim(0), (w.dim(2), w.dim(3)), stride, pad)?;
    if let Some(b) = b {
        if b.shape() != [g.c_out] {
            bail!("conv2d: bias shape {:?}, expected [{}]", b.shape(), g.c_out);
        }
    }
    same_device("conv2d", &conv_inputs(x, w, b))?;
    let be = x.backend();
    let mut ys = be.alloc(g.out_len())?;
    be.conv2d_fwd(&x.storage(), &w.storage(), b.map(|b| b.storage()).as_deref(), act, &mut ys, &g)?;
    Ok((g, ys))
}

/// The gradient at the pre-activation from `dy` at act's output `y` (kept where the activation
/// needs it), and the bias gradient where the backend fuses the two (ReLU).
fn pre_activation_grad(
    be: &BackendRef,
    act: Activation,
    y: Option<&Tensor>,
    dy: Tensor,
    want_b: bool,
    g: &ConvGeom,
) -> Result<(Tensor, Option<Storage>)> {
    let fused = match (act, y) {
        (Activation::Relu, Some(y)) if want_b => be.relu_bwd_bias(&y.storage(), &dy.storage(), g)?,
        _ => None,
    };
    Ok(match fused {
        Some((dz, db)) => (grad(be, dy.shape(), dz)?, Some(db)),
        None => (activation_grad(be, act, y, dy)?, None),
    })
}

/// Accumulates a convolution's dx, dw and db from the gradient `dz` at its pre-activation (and
/// `db` where it was computed with it).
fn conv_grads(
    grads: &mut Gradients,
    (x, w, b): (&Tensor, &Tensor, Option<&Tensor>),
    g: &ConvGeom,
    dz: Tensor,
    mut db: Option<Storage>,
) -> Result<()> {
    let be = x.backend().clone();
    let want_b = b.is_some_and(|b| b.is_tracked());
    let fused = db.is_some();
    // The first layer's input is data: skipping its gradient saves a whole GEMM.
    let mut dx = x.is_tracked().then(|| be.alloc(g.in_len())).transpose()?;
    let mut dw = (w.is_tracked() || (want_b && !fused)).then(|| be.alloc(g.weight_len())).transpose()?;
    if dw.is_some() && want_b && !fused {
        db = Some(be.alloc(g.c_out)?);
    }
    let db_here = if fused { None } else { db.as_mut() };
    let (xs, ws, dzs) = (x.storage(), w.storage(), dz.storage());
    match (dx.as_mut(), dw.as_mut()) {
        // Together where both are wanted: a backend may share work between them.
        (Some(dx), Some(dw)) => be.conv2d_bwd_data_and_weight(&xs, &dzs, &ws, dx, dw, db_here, g)?,
        (Some(dx), None) => be.conv2d_bwd_data(&dzs, &ws, dx, g)?,
        (None, Some(dw)) => be.conv2d_bwd_weight(&xs, &dzs, dw, db_here, g)?,
        (None, None) => {}
    }
    drop((xs, ws, dzs));
    if let Some(dx) = dx {
        grads.accumulate(x, grad(&be, x.shape(), dx)?)?;
    }
    if let Some(dw) = dw {
        grads.accumulate(w, grad(&be, w.shape(), dw)?)?;
    }
    if let (Some(b), Some(db)) = (b, db) {
        grads.accumulate(b, grad(&be, &[g.c_out], db)?)?;
    }
    Ok(())
}
