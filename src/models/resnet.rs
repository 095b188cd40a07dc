//! CIFAR-style ResNets: conv3×3 (no bias) + batch norm + ReLU, stages of basic blocks (the first
//! block of a stage strides by 2 from the second stage on, with a 1×1 conv + batch norm
//! shortcut where the shape changes), global average pooling, fc.
//! ResNet-18: 64/128/256/512 channels, [2, 2, 2, 2] blocks. ResNet-20: 16/32/64, [3, 3, 3].

use super::InputSpec;
use crate::backend::BackendRef;
use crate::nn::{BasicBlock, BatchNorm, Conv2d, Layer, Linear, Sequential};
use crate::rng::Rng;
use anyhow::Result;

pub fn build(
    b: &BackendRef,
    rng: &mut Rng,
    input: &InputSpec,
    widths: &[usize],
    blocks: &[usize],
) -> Result<Sequential> {
    let mut s = Sequential::new();
    s.push("conv1", Layer::Conv2d(Conv2d::new(b, rng, input.channels, widths[0], 3, 1, 1, false)?))
        .push("bn1", Layer::BatchNorm(BatchNorm::new(b, widths[0])?))
        .push("conv1.act", Layer::Relu);
    let mut c = widths[0];
    for (stage, (&width, &count)) in widths.iter().zip(blocks).enumerate() {
        for i in 0..count {
            let stride = if stage > 0 && i == 0 { 2 } else { 1 };
            s.push(
                format!("layer{}.{i}", stage + 1),
                Layer::Residual(Box::new(BasicBlock::new(b, rng, c, width, stride)?)),
            );
            c = width;
        }
    }
    s.push("avgpool", Layer::GlobalAvgPool)
        .push("fc", Layer::Linear(Linear::new(b, rng, c, input.classes)?))
        .push("log_softmax", Layer::LogSoftmax);
    Ok(s)
}
