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
use crate::optim::{OptimConfig, Optimizer, OptimizerState};
use crate::progress;
use crate::rng::{splitmix64, Rng};
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;

pub mod fed_passes;
pub mod feed;

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

/// Everything that changes as training goes on, besides the weights: an uninterrupted run and
/// one resumed from a checkpoint of this state draw the same batches, augmentations and updates.
pub struct Session {
    pub optimizer: Optimizer,
    pub shuffle_rng: Rng,
    pub augment_rng: Rng,
    pub epochs_done: usize,
    /// The first training loss of the run, the yardstick of the divergence warning.
    pub first_loss: Option<f32>,
}

/// The part of a [`Session`] that is not a tensor, as a checkpoint stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionPosition {
    pub epochs_done: usize,
    pub shuffle_rng: [u64; 4],
    pub augment_rng: [u64; 4],
    pub optimizer_step: u32,
    pub first_loss: Option<f32>,
}

impl Session {
    pub fn new(model: &Model, cfg: &TrainConfig) -> Result<Self> {
        Ok(Session {
            optimizer: Optimizer::new(cfg.optim, model.parameters())?,
            shuffle_rng: Rng::derive(cfg.seed, "shuffle"),
            augment_rng: Rng::derive(cfg.seed, "augment"),
            epochs_done: 0,
            first_loss: None,
        })
    }

    pub fn position(&self) -> SessionPosition {
        SessionPosition {
            epochs_done: self.epochs_done,
            shuffle_rng: self.shuffle_rng.state(),
            augment_rng: self.augment_rng.state(),
            optimizer_step: self.optimizer.steps_taken(),
            first_loss: self.first_loss,
        }
    }

    /// A session at a saved position, its optimizer moments restored from `optim`.
    pub fn restore(model: &Model, cfg: &TrainConfig, pos: &SessionPosition, optim: &OptimizerState) -> Result<Self> {
        let mut s = Session::new(model, cfg)?;
        let bad_rng = || anyhow::anyhow!("the saved random-number state is all zeros (corrupt)");
        s.shuffle_rng = Rng::from_state(pos.shuffle_rng).ok_or_else(bad_rng)?;
        s.augment_rng = Rng::from_state(pos.augment_rng).ok_or_else(bad_rng)?;
        if optim.step != pos.optimizer_step {
            bail!("the saved optimizer took {} steps but the run records {}", optim.step, pos.optimizer_step);
        }
        s.optimizer.import_state(optim)?;
        s.epochs_done = pos.epochs_done;
        s.first_loss = pos.first_loss;
        Ok(s)
    }
}

/// The flag most likely behind a diverging run, for the hint: weight decay when it is large
/// enough to dominate the gradient, else the learning rate.
pub fn divergence_hint(o: &OptimConfig) -> String {
    if o.weight_decay >= 0.1 {
        format!("try a lower --weight-decay (now {}) or --lr (now {})", o.weight_decay, o.lr)
    } else {
        format!("try a lower --lr (now {})", o.lr)
    }
}

/// A training step whose loss and predictions wait on the device: run by the plain loop, or
/// fed (its values in the feed's logs, at row `.0`).
enum Pending {
    Plain(Tensor, Storage, Vec<u32>),
    Fed(usize, Vec<u32>),
}

/// The dropout seed of batch `step` of `epoch`.
fn step_seed(cfg: &TrainConfig, epoch: usize, step: usize) -> u64 {
    splitmix64(cfg.seed ^ ((epoch as u64) << 32) ^ step as u64)
}

/// How far the loss may grow over its first value before the run is warned about.
const DIVERGENCE_FACTOR: f32 = 1000.0;

/// Train `model` from `session` up to `cfg.epochs`, evaluating on `test` after each epoch and
/// calling `after_epoch` (which saves a checkpoint of the session) so an interrupted run keeps
/// its finished epochs and can continue from them.
pub fn fit(
    model: &Model,
    train: &DeviceDataset,
    test: Option<&DeviceDataset>,
    cfg: &TrainConfig,
    quiet: bool,
    session: &mut Session,
    mut after_epoch: impl FnMut(&EpochMetrics, &Session) -> Result<()>,
) -> Result<Vec<EpochMetrics>> {
    if cfg.batch_size < 2 {
        bail!("--batch-size must be at least 2 (batch statistics need two samples), got {}", cfg.batch_size);
    }
    if train.len() < 2 {
        bail!("the training set has {} image(s); a training step needs at least 2 (raise --limit)", train.len());
    }
    let mut warned = false;
    let mut history = Vec::new();
    // On a GPU, full batches run as graph replays fed from device tables (feed.rs).
    let mut feed = feed::Feed::new(train, cfg)?;
    let readback = match train.images.device() {
        Device::Cpu => 1,
        Device::Cuda(_) => READBACK_EVERY,
    };
    for epoch in session.epochs_done + 1..=cfg.epochs {
        let steps = train.len().div_ceil(cfg.batch_size);
        let pb = (!quiet).then(|| progress::bar(steps as u64, &format!("epoch {epoch}/{}", cfg.epochs)));
        let mut order: Vec<u32> = (0..train.len() as u32).collect();
        session.shuffle_rng.shuffle(&mut order);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        if let Some(f) = feed.as_mut() {
            f.begin_epoch(&order, cfg, &mut session.augment_rng, &session.optimizer, |j| step_seed(cfg, epoch, j))?;
        }
        // Losses and predictions wait on the device and are read back in groups, so a GPU
        // never idles on a per-step round trip.
        let mut pending: Vec<Pending> = Vec::with_capacity(readback);
        let start = Instant::now();
        for (step, idx) in order.chunks(cfg.batch_size).enumerate() {
            // A final batch of one sample cannot be batch-normalized: drop it.
            if idx.len() < 2 {
                continue;
            }
            match feed.as_mut().filter(|_| idx.len() == cfg.batch_size) {
                // Full batches come first in `order`, so batch `step` is the feed's row `step`.
                Some(f) => {
                    f.step(model, train, &mut session.optimizer)?;
                    pending.push(Pending::Fed(step, idx.to_vec()));
                }
                None => {
                    let (x, y) = train.batch(idx)?;
                    let x = cfg.augment.apply(&x, &train.fill, &mut session.augment_rng)?;
                    let tape = Tape::start()?;
                    let logp = model.forward(&x, &mut Forward::train(step_seed(cfg, epoch, step)))?;
                    let loss = ops::nll_loss(&logp, &y)?;
                    let grads = tape.backward(&loss)?;
                    session.optimizer.step(&grads)?;
                    pending.push(Pending::Plain(loss, device_predictions(&logp)?, idx.to_vec()));
                }
            }
            let last = (step + 1) * cfg.batch_size >= train.len();
            if pending.len() < readback && !last {
                continue;
            }
            let logs = match (&feed, pending.iter().any(|p| matches!(p, Pending::Fed(..)))) {
                (Some(f), true) => Some(f.logs()?),
                _ => None,
            };
            for p in pending.drain(..) {
                let (l, preds, idx) = match (p, &logs) {
                    (Pending::Fed(j, idx), Some((losses, preds))) => {
                        (losses[j], preds[j * idx.len()..(j + 1) * idx.len()].to_vec(), idx)
                    }
                    (Pending::Fed(..), None) => bail!("internal: a fed step without its logs"),
                    (Pending::Plain(loss, preds, idx), _) => (loss.scalar()?, loss.backend().download(&preds)?, idx),
                };
                if !l.is_finite() {
                    bail!(
                        "training diverged: the loss became {l} in epoch {epoch} (by step {}): {}; \
                         checkpoints of finished epochs are kept.",
                        step + 1,
                        divergence_hint(&cfg.optim)
                    );
                }
                let first = *session.first_loss.get_or_insert(l);
                if !warned && l > DIVERGENCE_FACTOR * first.max(1e-3) {
                    warned = true;
                    progress::note(
                        pb.as_ref(),
                        &format!(
                            "warning: the training loss grew from {first:.4} to {l:.4e} (over {DIVERGENCE_FACTOR}x) \
                             by step {} of epoch {epoch}: training is diverging; {}",
                            step + 1,
                            divergence_hint(&cfg.optim)
                        ),
                    );
                }
                loss_sum += l as f64 * idx.len() as f64;
                seen += idx.len();
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
        session.epochs_done = epoch;
        after_epoch(&m, session)?;
        history.push(m);
    }
    Ok(history)
}
