//! All-convolutional net: eight conv + batch norm + ReLU stages (two of them stride 2), a 1×1
//! class convolution + ReLU, global average pooling. f = 16 for grayscale (MNIST), 64 for colour.

use super::InputSpec;
use crate::backend::BackendRef;
use crate::nn::{BatchNorm, Conv2d, Layer, Sequential};
use crate::rng::Rng;
use anyhow::Result;

pub fn build(b: &BackendRef, rng: &mut Rng, input: &InputSpec) -> Result<Sequential> {
    let f = if input.is_grayscale() { 16 } else { 64 };
    // (c_in, c_out, kernel, stride); 3×3 convolutions pad by 1.
    let stages = [
        (input.channels, f, 3, 1),
        (f, f, 3, 1),
        (f, f, 3, 2),
        (f, 2 * f, 3, 1),
        (2 * f, 2 * f, 3, 1),
        (2 * f, 2 * f, 3, 2),
        (2 * f, 2 * f, 3, 1),
        (2 * f, 2 * f, 1, 1),
    ];
    let mut s = Sequential::new();
    for (i, &(c_in, c_out, k, stride)) in stages.iter().enumerate() {
        let n = i + 1;
        s.push(format!("conv{n}"), Layer::Conv2d(Conv2d::new(b, rng, c_in, c_out, k, stride, k / 2, false)?))
            .push(format!("bn{n}"), Layer::BatchNorm(BatchNorm::new(b, c_out)?))
            .push(format!("conv{n}.act"), Layer::Relu);
    }
    s.push("class_conv", Layer::Conv2d(Conv2d::new(b, rng, 2 * f, input.classes, 1, 1, 0, true)?))
        .push("class_conv.act", Layer::Relu)
        .push("avgpool", Layer::GlobalAvgPool)
        .push("log_softmax", Layer::LogSoftmax);
    Ok(s)
}
