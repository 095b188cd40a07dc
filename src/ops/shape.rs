use crate::autograd::{needs_grad, push};
use crate::tensor::Tensor;
use anyhow::Result;

/// Same buffer, new shape. The gradient is a view of the output's gradient: no copy.
pub fn reshape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let tracked = needs_grad(&[x]);
    let y = x.view(shape, tracked)?;
    if tracked {
        let (x, y_id) = (x.clone(), y.id());
        push(Box::new(move |grads| {
            let Some(dy) = grads.take_id(y_id) else {
                return Ok(());
            };
            grads.accumulate(&x, dy.view(x.shape(), false)?)
        }));
    }
    Ok(y)
}

/// [N, ...] -> [N, prod(...)]
pub fn flatten(x: &Tensor) -> Result<Tensor> {
    let n = x.shape().first().copied().unwrap_or(1);
    reshape(x, &[n, x.numel() / n.max(1)])
}
