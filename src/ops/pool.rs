use super::{expect_rank, grad, output};
use crate::autograd::push;
use crate::backend::{PoolGeom, PoolKind};
use crate::tensor::Tensor;
use anyhow::{bail, Result};

pub fn pool2d(kind: PoolKind, x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    expect_rank("pool2d", "input", x, 4)?;
    let g = PoolGeom::new(x.dim(0), x.dim(1), x.dim(2), x.dim(3), k, stride, pad)?;
    let be = x.backend().clone();
    let mut ys = be.alloc(g.out_len())?;
    be.pool2d_fwd(kind, &x.storage(), &mut ys, &g)?;
    let y = output(&[x], &[g.n, g.c, g.oh, g.ow], ys)?;
    if y.is_tracked() {
        let (x, y_id) = (x.clone(), y.id());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take_id(y_id) else {
                return Ok(());
            };
            let mut dx = be.alloc(g.in_len())?;
            be.pool2d_bwd(kind, &x.storage(), &dy.storage(), &mut dx, &g)?;
            grads.accumulate(&x, grad(&be, x.shape(), dx)?)
        }));
    }
    Ok(y)
}

pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    pool2d(PoolKind::Max, x, k, stride, pad)
}

pub fn avg_pool2d(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    pool2d(PoolKind::Avg, x, k, stride, pad)
}

/// Mean over each feature map: [N, C, H, W] -> [N, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    expect_rank("global_avg_pool", "input", x, 4)?;
    if x.dim(2) != x.dim(3) {
        bail!("global_avg_pool: feature maps must be square, got {}x{}", x.dim(2), x.dim(3));
    }
    let y = avg_pool2d(x, x.dim(2), 1, 0)?;
    super::reshape(&y, &[x.dim(0), x.dim(1)])
}
