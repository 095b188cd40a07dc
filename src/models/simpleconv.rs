//! SimpleConv: five 3×3 convolutions (f, f, pool, 2f, 2f, pool, 4f), fc, fc classes.
//! f/fc = 32/64 for grayscale (MNIST) input, 64/128 for colour (CIFAR-10).

use super::{halved, InputSpec};
use crate::backend::BackendRef;
use crate::nn::{Conv2d, Layer, Linear, Sequential};
use crate::rng::Rng;
use anyhow::Result;

pub fn build(b: &BackendRef, rng: &mut Rng, input: &InputSpec) -> Result<Sequential> {
    let (f, fc) = if input.is_grayscale() { (32, 64) } else { (64, 128) };
    let (h, w) = (halved(halved(input.height)), halved(halved(input.width)));
    let mut s = Sequential::new();
    let convs = [(input.channels, f), (f, f), (f, 2 * f), (2 * f, 2 * f), (2 * f, 4 * f)];
    for (i, &(c_in, c_out)) in convs.iter().enumerate() {
        let n = i + 1;
        s.push(format!("conv{n}"), Layer::Conv2d(Conv2d::new(b, rng, c_in, c_out, 3, 1, 1, true)?));
        s.push(format!("conv{n}.act"), Layer::Relu);
        if n == 2 || n == 4 {
            s.push(format!("pool{}", n / 2), Layer::MaxPool { k: 2, stride: 2, pad: 0 });
        }
    }
    s.push("flatten", Layer::Flatten)
        .push("fc1", Layer::Linear(Linear::new(b, rng, 4 * f * h * w, fc)?))
        .push("fc1.act", Layer::Relu)
        .push("fc2", Layer::Linear(Linear::new(b, rng, fc, input.classes)?))
        .push("log_softmax", Layer::LogSoftmax);
    Ok(s)
}
