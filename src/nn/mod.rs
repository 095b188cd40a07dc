//! Layers with parameters, and `Sequential`, the container every rotvar model is built from.
//!
//! A forward pass reports each named intermediate output, in order, to an optional observer:
//! that is how the variance measure and the feature-map views see inside a model without the
//! model keeping anything.

pub mod init;

use crate::backend::{Activation, BackendRef, PoolKind};
use crate::ops::{self, BatchNormState};
use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::Result;

/// Options of one forward pass.
pub struct Forward<'a> {
    /// Training mode: batch-norm batch statistics, active dropout.
    pub train: bool,
    /// Seeds dropout masks; change it every step.
    pub seed: u64,
    /// The step's seed on the device instead (two u32 words, low first; `crate::feed`): a
    /// step replayed as a graph draws new masks without new kernel arguments.
    pub fed_seed: Option<Tensor>,
    /// Sees every named intermediate output, in order.
    pub observer: Option<&'a mut dyn FnMut(&str, &Tensor) -> Result<()>>,
}

impl<'a> Forward<'a> {
    pub fn train(seed: u64) -> Self {
        Forward { train: true, seed, observer: None, fed_seed: None }
    }
    pub fn eval() -> Self {
        Forward { train: false, seed: 0, observer: None, fed_seed: None }
    }
    pub fn observe(observer: &'a mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Self {
        Forward { train: false, seed: 0, observer: Some(observer), fed_seed: None }
    }
    /// Training mode with the dropout seed read on the device.
    pub fn train_fed(seed: Tensor) -> Self {
        Forward { train: true, seed: 0, observer: None, fed_seed: Some(seed) }
    }
    fn emit(&mut self, name: &str, t: &Tensor) -> Result<()> {
        match self.observer.as_mut() {
            Some(f) => f(name, t),
            None => Ok(()),
        }
    }
}

pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    /// PyTorch's default initialization (Kaiming-uniform with a = √5, i.e. U(±1/√fan_in) for
    /// weight and bias), so training behaves like the published runs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &BackendRef,
        rng: &mut Rng,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Result<Self> {
        let fan_in = c_in * k * k;
        let weight = init::kaiming_uniform(b, rng, &[c_out, c_in, k, k], fan_in)?;
        let bias = if bias { Some(init::kaiming_uniform(b, rng, &[c_out], fan_in)?) } else { None };
        Ok(Conv2d { weight, bias, stride, pad })
    }
}

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(b: &BackendRef, rng: &mut Rng, d_in: usize, d_out: usize) -> Result<Self> {
        let weight = init::kaiming_uniform(b, rng, &[d_out, d_in], d_in)?;
        let bias = Some(init::kaiming_uniform(b, rng, &[d_out], d_in)?);
        Ok(Linear { weight, bias })
    }
}

pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub momentum: f32,
    pub eps: f32,
}

impl BatchNorm {
    fn forward(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        let s = BatchNormState {
            gamma: &self.weight,
            beta: &self.bias,
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            momentum: self.momentum,
            eps: self.eps,
        };
        ops::batch_norm_act(x, &s, train, act)
    }

    fn buffers(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("running_mean", &self.running_mean), ("running_var", &self.running_var)]
    }

    pub fn new(b: &BackendRef, c: usize) -> Result<Self> {
        Ok(BatchNorm {
            weight: Tensor::parameter(b, &[c], &vec![1.0; c])?,
            bias: Tensor::parameter(b, &[c], &vec![0.0; c])?,
            running_mean: Tensor::full(b, &[c], 0.0)?,
            running_var: Tensor::full(b, &[c], 1.0)?,
            momentum: 0.1,
            eps: 1e-5,
        })
    }
}

pub enum Layer {
    Conv2d(Conv2d),
    Linear(Linear),
    BatchNorm(BatchNorm),
    Relu,
    Elu(f32),
    MaxPool {
        k: usize,
        stride: usize,
        pad: usize,
    },
    AvgPool {
        k: usize,
        stride: usize,
        pad: usize,
    },
    GlobalAvgPool,
    Flatten,
    Dropout(f32),
    LogSoftmax,
    /// A ResNet basic block; it reports its own intermediates under `<name>.<part>`.
    Residual(Box<BasicBlock>),
}

/// ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the shortcut a
/// 1×1 convolution + batch norm where the shape changes and the identity elsewhere. Names follow
/// the usual CIFAR ResNet state dict (`conv1`, `bn1`, `conv2`, `bn2`, `shortcut.0`, `shortcut.1`).
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub shortcut: Option<(Conv2d, BatchNorm)>,
}

impl BasicBlock {
    pub fn new(b: &BackendRef, rng: &mut Rng, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        let conv1 = Conv2d::new(b, rng, c_in, c_out, 3, stride, 1, false)?;
        let bn1 = BatchNorm::new(b, c_out)?;
        let conv2 = Conv2d::new(b, rng, c_out, c_out, 3, 1, 1, false)?;
        let bn2 = BatchNorm::new(b, c_out)?;
        let shortcut = if stride != 1 || c_in != c_out {
            Some((Conv2d::new(b, rng, c_in, c_out, 1, stride, 0, false)?, BatchNorm::new(b, c_out)?))
        } else {
            None
        };
        Ok(BasicBlock { conv1, bn1, conv2, bn2, shortcut })
    }

    /// The intermediates reported, in order, before the block's output (`<name>` itself).
    pub fn part_names(&self) -> Vec<&'static str> {
        let mut v = vec!["conv1", "bn1", "relu1", "conv2", "bn2"];
        if self.shortcut.is_some() {
            v.push("shortcut");
        }
        v.push("add");
        v
    }

    fn forward(&self, x: &Tensor, f: &mut Forward, name: &str) -> Result<Tensor> {
        let conv = |c: &Conv2d, x: &Tensor| ops::conv2d(x, &c.weight, c.bias.as_ref(), c.stride, c.pad);
        let emit = |part: &str, t: &Tensor, f: &mut Forward| f.emit(&format!("{name}.{part}"), t);
        let h = conv(&self.conv1, x)?;
        emit("conv1", &h, f)?;
        // bn1 and relu1 in one pass unless an observer must see bn1's output.
        let h = if f.observer.is_none() {
            self.bn1.forward(&h, f.train, Activation::Relu)?
        } else {
            let h = self.bn1.forward(&h, f.train, Activation::Identity)?;
            emit("bn1", &h, f)?;
            let h = ops::relu(&h)?;
            emit("relu1", &h, f)?;
            h
        };
        let h = conv(&self.conv2, &h)?;
        emit("conv2", &h, f)?;
        let h = self.bn2.forward(&h, f.train, Activation::Identity)?;
        emit("bn2", &h, f)?;
        let short = match &self.shortcut {
            Some((c, bn)) => {
                let s = bn.forward(&conv(c, x)?, f.train, Activation::Identity)?;
                emit("shortcut", &s, f)?;
                s
            }
            None => x.clone(),
        };
        // The sum and the block's ReLU in one pass unless an observer must see the sum.
        if f.observer.is_none() {
            return ops::add_act(&h, &short, Activation::Relu);
        }
        let sum = ops::add(&h, &short)?;
        emit("add", &sum, f)?;
        ops::relu(&sum)
    }

    /// Parameters (`buffers == false`) or batch-norm running statistics, with state-dict names.
    fn tensors(&self, buffers: bool) -> Vec<(String, &Tensor)> {
        let mut parts: Vec<(&str, &Conv2d, &str, &BatchNorm)> =
            vec![("conv1", &self.conv1, "bn1", &self.bn1), ("conv2", &self.conv2, "bn2", &self.bn2)];
        if let Some((c, bn)) = &self.shortcut {
            parts.push(("shortcut.0", c, "shortcut.1", bn));
        }
        let mut out = Vec::new();
        for (conv_name, conv, bn_name, bn) in parts {
            if buffers {
                out.extend(bn.buffers().into_iter().map(|(k, t)| (format!("{bn_name}.{k}"), t)));
            } else {
                out.push((format!("{conv_name}.weight"), &conv.weight));
                out.extend(conv.bias.as_ref().map(|t| (format!("{conv_name}.bias"), t)));
                out.push((format!("{bn_name}.weight"), &bn.weight));
                out.push((format!("{bn_name}.bias"), &bn.bias));
            }
        }
        out
    }
}

impl Layer {
    pub fn forward(&self, x: &Tensor, f: &Forward, index: usize) -> Result<Tensor> {
        match self {
            Layer::Conv2d(c) => ops::conv2d(x, &c.weight, c.bias.as_ref(), c.stride, c.pad),
            Layer::Linear(l) => ops::linear(x, &l.weight, l.bias.as_ref()),
            Layer::BatchNorm(bn) => bn.forward(x, f.train, Activation::Identity),
            Layer::Relu => ops::relu(x),
            Layer::Elu(a) => ops::elu(x, *a),
            Layer::MaxPool { k, stride, pad } => ops::max_pool2d(x, *k, *stride, *pad),
            Layer::AvgPool { k, stride, pad } => ops::avg_pool2d(x, *k, *stride, *pad),
            Layer::GlobalAvgPool => ops::global_avg_pool(x),
            Layer::Flatten => ops::flatten(x),
            Layer::Dropout(p) => match &f.fed_seed {
                Some(seed) => ops::dropout_fed(x, *p, f.train, seed, index as u64),
                None => ops::dropout(x, *p, f.train, crate::rng::splitmix64(f.seed ^ index as u64)),
            },
            Layer::LogSoftmax => ops::log_softmax(x),
            // Sequential::forward runs blocks itself: they need the name to report their parts.
            Layer::Residual(block) => block.forward(
                x,
                &mut Forward { train: f.train, seed: f.seed, observer: None, fed_seed: f.fed_seed.clone() },
                "",
            ),
        }
    }

    /// This layer followed by `act` as one fused op, where the layer has a fused form.
    fn forward_fused(&self, x: &Tensor, act: Activation, train: bool) -> Option<Result<Tensor>> {
        match self {
            Layer::BatchNorm(bn) => Some(bn.forward(x, train, act)),
            Layer::Conv2d(c) => Some(ops::conv2d_act(x, &c.weight, c.bias.as_ref(), c.stride, c.pad, act)),
            Layer::Linear(l) => Some(ops::linear_act(x, &l.weight, l.bias.as_ref(), act)),
            _ => None,
        }
    }

    /// Trainable tensors with their state-dict suffixes.
    pub fn parameters(&self) -> Vec<(String, &Tensor)> {
        match self {
            Layer::Conv2d(Conv2d { weight, bias, .. }) | Layer::Linear(Linear { weight, bias }) => {
                let mut v = vec![("weight".into(), weight)];
                v.extend(bias.as_ref().map(|b| ("bias".into(), b)));
                v
            }
            Layer::BatchNorm(bn) => vec![("weight".into(), &bn.weight), ("bias".into(), &bn.bias)],
            Layer::Residual(b) => b.tensors(false),
            _ => vec![],
        }
    }

    /// Non-trainable state saved with the model (batch-norm running statistics).
    pub fn buffers(&self) -> Vec<(String, &Tensor)> {
        match self {
            Layer::BatchNorm(bn) => bn.buffers().into_iter().map(|(k, t)| (k.into(), t)).collect(),
            Layer::Residual(b) => b.tensors(true),
            _ => vec![],
        }
    }

    /// Whether the output is worth reporting as an intermediate (a reshape or an inactive
    /// dropout repeats its input's values).
    fn observable(&self) -> bool {
        !matches!(self, Layer::Flatten | Layer::Dropout(_))
    }
}

/// A named parameter and whether weight decay applies to it (only tensors that are not 1-D,
/// as the reference protocol does: biases and norm parameters are never decayed).
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub decay: bool,
}

/// Layers applied in order, each with the name its intermediate output is reported under.
pub struct Sequential {
    pub layers: Vec<(String, Layer)>,
}

impl Sequential {
    pub fn new() -> Self {
        Sequential { layers: Vec::new() }
    }

    pub fn push(&mut self, name: impl Into<String>, layer: Layer) -> &mut Self {
        self.layers.push((name.into(), layer));
        self
    }

    pub fn forward(&self, x: &Tensor, f: &mut Forward) -> Result<Tensor> {
        let mut h = x.clone();
        let mut i = 0;
        while i < self.layers.len() {
            let (name, layer) = &self.layers[i];
            // A conv, linear or batch-norm layer and the ReLU after it run as one kernel, unless
            // an observer must see the pre-activation. The result is the same bits either way.
            // A conv, its ReLU and a max pool after them are one node of the tape, whose
            // backward pass can then be one pass over the conv's output (same bits again).
            if let (None, Layer::Conv2d(c), Some((_, Layer::Relu)), Some((_, Layer::MaxPool { k, stride, pad }))) =
                (&f.observer, layer, self.layers.get(i + 1), self.layers.get(i + 2))
            {
                let conv = (c.stride, c.pad);
                h = ops::conv2d_act_pool(
                    &h,
                    &c.weight,
                    c.bias.as_ref(),
                    conv,
                    Activation::Relu,
                    PoolKind::Max,
                    (*k, *stride, *pad),
                )?;
                i += 3;
                continue;
            }
            if f.observer.is_none() && matches!(self.layers.get(i + 1), Some((_, Layer::Relu))) {
                if let Some(y) = layer.forward_fused(&h, Activation::Relu, f.train) {
                    h = y?;
                    i += 2;
                    continue;
                }
            }
            h = match layer {
                Layer::Residual(block) => block.forward(&h, f, name)?,
                _ => layer.forward(&h, f, i)?,
            };
            if layer.observable() {
                f.emit(name, &h)?;
            }
            i += 1;
        }
        Ok(h)
    }

    pub fn parameters(&self) -> Vec<Param> {
        let mut out = Vec::new();
        for (name, layer) in &self.layers {
            for (suffix, t) in layer.parameters() {
                out.push(Param { name: format!("{name}.{suffix}"), tensor: t.clone(), decay: t.rank() > 1 });
            }
        }
        out
    }

    /// Parameters and buffers under PyTorch-style state-dict names (`conv1.weight`, ...).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, layer) in &self.layers {
            for (suffix, t) in layer.parameters().into_iter().chain(layer.buffers()) {
                out.push((format!("{name}.{suffix}"), t.clone()));
            }
        }
        out
    }

    /// Names of the intermediates a forward pass reports, in order.
    pub fn intermediate_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, layer) in self.layers.iter().filter(|(_, l)| l.observable()) {
            if let Layer::Residual(b) = layer {
                out.extend(b.part_names().into_iter().map(|p| format!("{name}.{p}")));
            }
            out.push(name.clone());
        }
        out
    }
}

impl Default for Sequential {
    fn default() -> Self {
        Self::new()
    }
}
