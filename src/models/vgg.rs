//! VGG-like (docs/protocol.md): four blocks of [conv3×3 → ELU → batch norm] ×2 + max-pool,
//! channels f, 2f, 4f, 8f; fc, batch norm 1-d, ReLU, fc classes. f/fc = 16/64 grayscale, 64/128
//! colour.
//!
//! VGG16: the usual CIFAR form (five blocks of 2, 2, 3, 3, 3 convolutions with 64–512 channels,
//! each conv → batch norm → ReLU, max-pool after each block, one fc to the classes). Its five
//! halvings need inputs of at least 32×32.

use super::{halved, InputSpec};
use crate::backend::BackendRef;
use crate::nn::{BatchNorm, Conv2d, Layer, Linear, Sequential};
use crate::rng::Rng;
use anyhow::{bail, Result};

pub fn build_like(b: &BackendRef, rng: &mut Rng, input: &InputSpec) -> Result<Sequential> {
    let (f, fc) = if input.is_grayscale() { (16, 64) } else { (64, 128) };
    let mut s = Sequential::new();
    let (mut c, mut h, mut w) = (input.channels, input.height, input.width);
    let mut n = 0;
    for (block, width) in [f, 2 * f, 4 * f, 8 * f].into_iter().enumerate() {
        for _ in 0..2 {
            n += 1;
            s.push(format!("conv{n}"), Layer::Conv2d(Conv2d::new(b, rng, c, width, 3, 1, 1, true)?))
                .push(format!("conv{n}.act"), Layer::Elu(1.0))
                .push(format!("bn{n}"), Layer::BatchNorm(BatchNorm::new(b, width)?));
            c = width;
        }
        s.push(format!("pool{}", block + 1), Layer::MaxPool { k: 2, stride: 2, pad: 0 });
        (h, w) = (halved(h), halved(w));
    }
    if h == 0 || w == 0 {
        bail!("vgg: inputs of {}x{} vanish after four 2x2 poolings; use at least 16x16", input.height, input.width);
    }
    s.push("flatten", Layer::Flatten)
        .push("fc1", Layer::Linear(Linear::new(b, rng, c * h * w, fc)?))
        .push("bn_fc1", Layer::BatchNorm(BatchNorm::new(b, fc)?))
        .push("fc1.act", Layer::Relu)
        .push("fc2", Layer::Linear(Linear::new(b, rng, fc, input.classes)?))
        .push("log_softmax", Layer::LogSoftmax);
    Ok(s)
}

pub fn build_16(b: &BackendRef, rng: &mut Rng, input: &InputSpec) -> Result<Sequential> {
    if input.height < 32 || input.width < 32 {
        bail!(
            "vgg16: its five 2x2 poolings need inputs of at least 32x32, got {}x{}; use vgg (VGG-like) for MNIST",
            input.height,
            input.width
        );
    }
    let blocks: [(usize, usize); 5] = [(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)];
    let mut s = Sequential::new();
    let (mut c, mut h, mut w) = (input.channels, input.height, input.width);
    let mut n = 0;
    for (block, &(convs, width)) in blocks.iter().enumerate() {
        for _ in 0..convs {
            n += 1;
            s.push(format!("conv{n}"), Layer::Conv2d(Conv2d::new(b, rng, c, width, 3, 1, 1, true)?))
                .push(format!("bn{n}"), Layer::BatchNorm(BatchNorm::new(b, width)?))
                .push(format!("conv{n}.act"), Layer::Relu);
            c = width;
        }
        s.push(format!("pool{}", block + 1), Layer::MaxPool { k: 2, stride: 2, pad: 0 });
        (h, w) = (halved(h), halved(w));
    }
    s.push("flatten", Layer::Flatten)
        .push("fc", Layer::Linear(Linear::new(b, rng, c * h * w, input.classes)?))
        .push("log_softmax", Layer::LogSoftmax);
    Ok(s)
}
