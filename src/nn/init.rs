use crate::backend::BackendRef;
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::Result;

/// U(-1/√fan_in, 1/√fan_in): what PyTorch's `kaiming_uniform_(a=√5)` gives conv and linear
/// weights, and what their default bias initialization gives biases.
pub fn kaiming_uniform(b: &BackendRef, rng: &mut Rng, shape: &[usize], fan_in: usize) -> Result<Tensor> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    let mut data = vec![0.0f32; shape.iter().product()];
    rng.fill_uniform(&mut data, -bound, bound);
    Tensor::parameter(b, shape, &data)
}
