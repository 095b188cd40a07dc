//! Training and evaluation loops.
//!
//! The whole dataset is normalized once and uploaded to the device; each step gathers its batch
//! there, runs forward under a tape, backward, and one optimizer update. One step, top to
//! bottom: `train_epoch` → `Model::forward` (models/) → `ops::conv2d` (ops/) →
//! `Backend::conv2d_fwd` (backend/cpu or backend/cuda) → kernel.

use crate::augment::Augment;
use crate::autograd::Tape;
use crate::backend::{BackendRef, Device, Storage};
use crate::data::{Dataset, Normalization};
use crate::models::Model;
use crate::nn::Forward;
use crate::ops;
use crate::optim::{OptimConfig, Optimizer};
use crate::progress;
use crate::rng::{splitmix64, Rng};
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// A dataset resident on the device, normalized with training statistics.
pub struct DeviceDataset {
    pub images: Tensor,
    pub labels: Tensor,
    pub labels_host: Vec<u8>,
    pub item_shape: [usize; 3],
    pub num_classes: usize,
    /// Per-channel value of raw black after normalization: the fill of rotations and zooms.
    pub fill: Vec<f32>,
}

impl DeviceDataset {
    pub fn upload(ds: &Dataset, norm: &Normalization, b: &BackendRef) -> Result<Self> {
        let item_shape = [ds.channels, ds.height, ds.width];
        let images = Tensor::from_vec(b, &[ds.len(), ds.channels, ds.height, ds.width], &ds.to_f32_normalized(norm))?;
        let labels = Tensor::from_vec(b, &[ds.len()], &ds.labels_f32())?;
        Ok(DeviceDataset {
            images,
            labels,
            labels_host: ds.labels.clone(),
            item_shape,
            num_classes: ds.num_classes(),
            fill: norm.black(),
        })
    }

    pub fn len(&self) -> usize {
        self.labels_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels_host.is_empty()
    }

    /// Gather the images and labels of `idx` into fresh device tensors.
    pub fn batch(&self, idx: &[u32]) -> Result<(Tensor, Tensor)> {
        let b = self.images.backend();
        let [c, h, w] = self.item_shape;
        let mut xs = b.alloc(idx.len() * c * h * w)?;
        b.gather_rows(&self.images.storage(), c * h * w, idx, &mut xs)?;
        let mut ys = b.alloc(idx.len())?;
        b.gather_rows(&self.labels.storage(), 1, idx, &mut ys)?;
        Ok((
            Tensor::from_storage(b, &[idx.len(), c, h, w], xs, false)?,
            Tensor::from_storage(b, &[idx.len()], ys, false)?,
        ))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: String,
    pub dataset: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub optim: OptimConfig,
    pub seed: u64,
    pub augment: Augment,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    /// Seconds spent in training steps (evaluation excluded).
    pub train_seconds: f64,
    pub images_per_second: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    pub correct: usize,
    pub total: usize,
    /// Per class: (correct, total).
    pub per_class: Vec<(usize, usize)>,
}

/// Steps between readbacks of the loss on a GPU (on the CPU a readback costs nothing).
const READBACK_EVERY: usize = 20;

/// Predicted classes of a batch of log-probabilities, left on the device.
fn device_predictions(logp: &Tensor) -> Result<Storage> {
    let (rows, cols) = (logp.dim(0), logp.dim(1));
    let b = logp.backend();
    let mut out = b.alloc(rows)?;
    b.argmax_rows(&logp.storage(), &mut out, rows, cols)?;
    Ok(out)
}

/// Predicted classes of a batch of log-probabilities, on the host.
pub fn predictions(logp: &Tensor) -> Result<Vec<usize>> {
    let preds = device_predictions(logp)?;
    Ok(logp.backend().download(&preds)?.into_iter().map(|v| v as usize).collect())
}

/// Loss and accuracy over a whole dataset, in eval mode (nothing is recorded).
pub fn evaluate(model: &Model, data: &DeviceDataset, batch_size: usize) -> Result<Evaluation> {
    let n = data.len();
    let mut per_class = vec![(0usize, 0usize); data.num_classes];
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    let order: Vec<u32> = (0..n as u32).collect();
    for idx in order.chunks(batch_size.max(1)) {
        let (x, y) = data.batch(idx)?;
        let logp = model.forward(&x, &mut Forward::eval())?;
        loss_sum += ops::nll_loss(&logp, &y)?.scalar()? as f64 * idx.len() as f64;
        for (p, &i) in predictions(&logp)?.into_iter().zip(idx) {
            let label = data.labels_host[i as usize] as usize;
            per_class[label].1 += 1;
            if p == label {
                per_class[label].0 += 1;
                correct += 1;
            }
        }
    }
    Ok(Evaluation {
        loss: loss_sum / n.max(1) as f64,
        accuracy: correct as f64 / n.max(1) as f64,
        correct,
        total: n,
        per_class,
    })
}

/// Train `model` for `cfg.epochs`, evaluating on `test` after each epoch and calling
/// `after_epoch` (which saves a checkpoint) so an interrupted run keeps its finished epochs.
pub fn fit(
    model: &Model,
    train: &DeviceDataset,
    test: Option<&DeviceDataset>,
    cfg: &TrainConfig,
    quiet: bool,
    mut after_epoch: impl FnMut(&EpochMetrics) -> Result<()>,
) -> Result<Vec<EpochMetrics>> {
    if cfg.batch_size < 2 {
        bail!("--batch-size must be at least 2 (batch statistics need two samples), got {}", cfg.batch_size);
    }
    if train.is_empty() {
        bail!("the training set is empty");
    }
    let mut opt = Optimizer::new(cfg.optim, model.parameters())?;
    let mut shuffle_rng = Rng::derive(cfg.seed, "shuffle");
    let mut augment_rng = Rng::derive(cfg.seed, "augment");
    let mut history = Vec::new();
    let readback = match train.images.device() {
        Device::Cpu => 1,
        Device::Cuda(_) => READBACK_EVERY,
    };
    for epoch in 1..=cfg.epochs {
        let steps = train.len().div_ceil(cfg.batch_size);
        let pb = (!quiet).then(|| progress::bar(steps as u64, &format!("epoch {epoch}/{}", cfg.epochs)));
        let mut order: Vec<u32> = (0..train.len() as u32).collect();
        shuffle_rng.shuffle(&mut order);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        // Losses and predictions wait on the device and are read back in groups, so a GPU
        // never idles on a per-step round trip.
        let mut pending: Vec<(Tensor, Storage, Vec<u32>)> = Vec::with_capacity(readback);
        let start = Instant::now();
        for (step, idx) in order.chunks(cfg.batch_size).enumerate() {
            // A final batch of one sample cannot be batch-normalized: drop it.
            if idx.len() < 2 {
                continue;
            }
            let (x, y) = train.batch(idx)?;
            let x = cfg.augment.apply(&x, &train.fill, &mut augment_rng)?;
            let tape = Tape::start()?;
            let seed = splitmix64(cfg.seed ^ ((epoch as u64) << 32) ^ step as u64);
            let logp = model.forward(&x, &mut Forward::train(seed))?;
            let loss = ops::nll_loss(&logp, &y)?;
            let grads = tape.backward(&loss)?;
            opt.step(&grads)?;
            pending.push((loss, device_predictions(&logp)?, idx.to_vec()));
            let last = (step + 1) * cfg.batch_size >= train.len();
            if pending.len() < readback && !last {
                continue;
            }
            for (loss, preds, idx) in pending.drain(..) {
                let l = loss.scalar()?;
                if !l.is_finite() {
                    bail!(
                        "training diverged: the loss became {l} in epoch {epoch} (by step {}). \
                         Try a lower --lr (now {}); checkpoints of finished epochs are kept.",
                        step + 1,
                        cfg.optim.lr
                    );
                }
                loss_sum += l as f64 * idx.len() as f64;
                seen += idx.len();
                let preds = loss.backend().download(&preds)?;
                correct += preds
                    .iter()
                    .zip(&idx)
                    .filter(|(p, &i)| **p as usize == train.labels_host[i as usize] as usize)
                    .count();
            }
            if let Some(pb) = &pb {
                pb.set_position(step as u64 + 1);
                let secs = start.elapsed().as_secs_f64();
                pb.set_message(format!(
                    "loss {:.4} acc {:.2}% {:.0} img/s",
                    loss_sum / seen as f64,
                    100.0 * correct as f64 / seen as f64,
                    seen as f64 / secs
                ));
            }
        }
        train.images.backend().synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        let eval = test.map(|t| evaluate(model, t, cfg.batch_size.max(256))).transpose()?;
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test_loss: eval.as_ref().map(|e| e.loss),
            test_accuracy: eval.as_ref().map(|e| e.accuracy),
            train_seconds: secs,
            images_per_second: seen as f64 / secs,
        };
        if let Some(pb) = &pb {
            pb.finish_and_clear();
        }
        let test_part = match (m.test_loss, m.test_accuracy) {
            (Some(l), Some(a)) => format!(", test loss {l:.4} acc {:.2}%", 100.0 * a),
            _ => String::new(),
        };
        progress::note(
            None,
            &format!(
                "epoch {epoch}/{}: train loss {:.4} acc {:.2}%{test_part}, {:.1}s, {:.0} img/s",
                cfg.epochs,
                m.train_loss,
                100.0 * m.train_accuracy,
                m.train_seconds,
                m.images_per_second
            ),
        );
        after_epoch(&m)?;
        history.push(m);
    }
    Ok(history)
}
