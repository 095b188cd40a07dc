//! LeNet-5, the course-work variant: three 5×5 convolutions with padding 2, two max-pools,
//! fc 84, fc classes; ReLU after every conv and after fc 84.

use super::{halved, InputSpec};
use crate::backend::BackendRef;
use crate::nn::{Conv2d, Layer, Linear, Sequential};
use crate::rng::Rng;
use anyhow::Result;

pub fn build(b: &BackendRef, rng: &mut Rng, input: &InputSpec) -> Result<Sequential> {
    let (h, w) = (halved(halved(input.height)), halved(halved(input.width)));
    let mut s = Sequential::new();
    s.push("conv1", Layer::Conv2d(Conv2d::new(b, rng, input.channels, 6, 5, 1, 2, true)?))
        .push("conv1.act", Layer::Relu)
        .push("pool1", Layer::MaxPool { k: 2, stride: 2, pad: 0 })
        .push("conv2", Layer::Conv2d(Conv2d::new(b, rng, 6, 16, 5, 1, 2, true)?))
        .push("conv2.act", Layer::Relu)
        .push("pool2", Layer::MaxPool { k: 2, stride: 2, pad: 0 })
        .push("conv3", Layer::Conv2d(Conv2d::new(b, rng, 16, 120, 5, 1, 2, true)?))
        .push("conv3.act", Layer::Relu)
        .push("flatten", Layer::Flatten)
        .push("fc1", Layer::Linear(Linear::new(b, rng, 120 * h * w, 84)?))
        .push("fc1.act", Layer::Relu)
        .push("fc2", Layer::Linear(Linear::new(b, rng, 84, input.classes)?))
        .push("log_softmax", Layer::LogSoftmax);
    Ok(s)
}
