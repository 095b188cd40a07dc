//! ConvBN: the small backbone of the augmentation-encoding (rank) study: three blocks of
//! [conv 3×3 → ReLU → batch norm] ×2 + max-pool 2×2, for 32, 64 and 128 channels; then flatten,
//! dropout 0.2, fc 1024 → ReLU, dropout 0.2, fc classes. Batch norm follows the ReLU, as in the
//! student reimplementation the study follows (docs/rank-study.md).

use super::{halved, InputSpec};
use crate::backend::BackendRef;
use crate::nn::{BatchNorm, Conv2d, Layer, Linear, Sequential};
use crate::rng::Rng;
use anyhow::Result;

pub fn build(b: &BackendRef, rng: &mut Rng, input: &InputSpec) -> Result<Sequential> {
    let mut s = Sequential::new();
    let mut c_in = input.channels;
    let (mut h, mut w) = (input.height, input.width);
    let mut n = 0;
    for (block, c) in [32, 64, 128].into_iter().enumerate() {
        for _ in 0..2 {
            n += 1;
            s.push(format!("conv{n}"), Layer::Conv2d(Conv2d::new(b, rng, c_in, c, 3, 1, 1, true)?));
            s.push(format!("conv{n}.act"), Layer::Relu);
            s.push(format!("bn{n}"), Layer::BatchNorm(BatchNorm::new(b, c)?));
            c_in = c;
        }
        s.push(format!("pool{}", block + 1), Layer::MaxPool { k: 2, stride: 2, pad: 0 });
        (h, w) = (halved(h), halved(w));
    }
    s.push("flatten", Layer::Flatten)
        .push("dropout1", Layer::Dropout(0.2))
        .push("fc1", Layer::Linear(Linear::new(b, rng, c_in * h * w, 1024)?))
        .push("fc1.act", Layer::Relu)
        .push("dropout2", Layer::Dropout(0.2))
        .push("fc2", Layer::Linear(Linear::new(b, rng, 1024, input.classes)?))
        .push("log_softmax", Layer::LogSoftmax);
    Ok(s)
}
