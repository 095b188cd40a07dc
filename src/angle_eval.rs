//! Accuracy and loss versus rotation (docs/protocol.md, step 2): the test set rotated by each
//! angle of a set, per-class × per-angle accuracy, group accuracy, and accuracy on a randomly
//! rotated copy.
//!
//! Each forward pass carries several angles of the same images: the batch is gathered once per
//! angle on the device and every copy gets its own rotation matrix, so one pass and one small
//! readback (the log-probabilities) serve them all.

use crate::augment::FULL_TURN;
use crate::backend::{rotation_matrix, Interp};
use crate::limits;
use crate::models::Model;
use crate::nn::Forward;
use crate::ops;
use crate::progress;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::train::DeviceDataset;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// A set of test angles in degrees, parsed from `--angles`: a list `0,90,180,270`, a range
/// `START:STOP:STEP` (STOP excluded, as Python's range: `0:360:45` is 0, 45, …, 315), or a count
/// `16` (evenly spaced over 360° from 0°).
pub fn parse_angles(spec: &str) -> Result<Vec<f32>> {
    let spec = spec.trim();
    let num = |s: &str| -> Result<f64> {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .with_context(|| format!("--angles {spec}: '{s}' is not a number"))
    };
    let angles: Vec<f32> = if spec.contains(':') {
        let parts: Vec<&str> = spec.split(':').collect();
        let [start, stop, step] = parts[..] else {
            bail!("--angles {spec}: a range is START:STOP:STEP, e.g. 0:360:45");
        };
        let (start, stop, step) = (num(start)?, num(stop)?, num(step)?);
        if step <= 0.0 {
            bail!("--angles {spec}: STEP must be positive");
        }
        // Counted in f64 and bounded before anything is allocated: a step of 1e-300 asks for
        // more angles than there are atoms.
        let count = ((stop - start) / step - 1e-9).ceil().max(0.0);
        if count > limits::ANGLES.hi {
            bail!(
                "--angles {spec}: that range holds {count:.3e} angles; at most {} are allowed (use a larger STEP)",
                limits::ANGLES.hi
            );
        }
        (0..count as usize).map(|i| (start + step * i as f64) as f32).collect()
    } else if spec.contains(',') {
        spec.split(',').map(|s| num(s).map(|v| v as f32)).collect::<Result<_>>()?
    } else {
        let n: usize = spec.parse().ok().filter(|&n| n > 0).with_context(|| {
            format!("--angles {spec}: expected a list (0,90,180), a range (0:360:45) or a count (16)")
        })?;
        limits::ANGLES.check_usize(n)?;
        (0..n).map(|i| (360.0 * i as f64 / n as f64) as f32).collect()
    };
    if angles.is_empty() {
        bail!("--angles {spec}: the set of angles is empty");
    }
    limits::ANGLES.check_usize(angles.len()).with_context(|| format!("--angles {spec}"))?;
    Ok(angles)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AngleResult {
    pub angle: f32,
    pub loss: f64,
    pub accuracy: f64,
    /// Per class: accuracy on that class's images at this angle.
    pub class_accuracy: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AngleEvaluation {
    pub images: usize,
    pub class_names: Vec<String>,
    pub per_angle: Vec<AngleResult>,
    /// Mean over images of the fraction of its rotated copies classified correctly.
    pub group_accuracy: f64,
    /// Accuracy on the unrotated test set (the "original accuracy" next to group accuracy).
    pub original_accuracy: f64,
    pub original_loss: f64,
    /// Accuracy and loss on a copy of the test set where each image is rotated by its own angle,
    /// uniform in [−180°, 180°), drawn from `random_seed`.
    pub random_rotation_accuracy: f64,
    pub random_rotation_loss: f64,
    pub random_seed: u64,
    pub seconds: f64,
}

/// Per image and angle: correct or not, and its loss. Accumulated on the host from the
/// log-probabilities of each pass.
struct Tally {
    classes: usize,
    loss: Vec<f64>,
    correct: Vec<usize>,
    class_correct: Vec<usize>,
    /// Per image: how many of its copies under the first `group_angles` angles were right.
    image_correct: Vec<u32>,
    group_angles: usize,
}

impl Tally {
    fn new(images: usize, angles: usize, group_angles: usize, classes: usize) -> Tally {
        Tally {
            group_angles,
            classes,
            loss: vec![0.0; angles],
            correct: vec![0; angles],
            class_correct: vec![0; angles * classes],
            image_correct: vec![0; images],
        }
    }

    /// Row r of `logp` is image `idx[r % idx.len()]` under angle `angle_of[r]`.
    fn add(&mut self, logp: &[f32], idx: &[u32], angle_of: &[usize], data: &DeviceDataset) {
        let k = self.classes;
        for (r, row) in logp.chunks_exact(k).enumerate() {
            let image = idx[r % idx.len()] as usize;
            let label = data.labels_host[image] as usize;
            let a = angle_of[r];
            // First maximum on ties, as argmax_rows.
            let pred = row.iter().enumerate().fold(0, |best, (j, &v)| if v > row[best] { j } else { best });
            self.loss[a] -= row[label] as f64;
            if pred == label {
                self.correct[a] += 1;
                self.class_correct[a * k + label] += 1;
                if a < self.group_angles {
                    self.image_correct[image] += 1;
                }
            }
        }
    }
}

/// Log-probabilities of the images `idx` under per-copy rotation matrices: copy r is image
/// `idx[r % idx.len()]`, so `mats.len()` must be a multiple of `idx.len()`.
fn rotated_logp(model: &Model, data: &DeviceDataset, idx: &[u32], mats: &[[f32; 4]]) -> Result<Vec<f32>> {
    let copies = mats.len() / idx.len();
    let rows: Vec<u32> = (0..copies).flat_map(|_| idx.iter().copied()).collect();
    let (x, _) = data.batch(&rows)?;
    let x: Tensor = ops::warp(&x, mats, Interp::Bilinear, &data.fill)?;
    model.forward(&x, &mut Forward::eval())?.to_vec()
}

/// Evaluate `model` on `data` rotated by every angle of `angles` (bilinear, fill = raw black),
/// with at most `batch` rotated images per forward pass.
pub fn evaluate_angles(
    model: &Model,
    data: &DeviceDataset,
    angles: &[f32],
    batch: usize,
    random_seed: u64,
    class_names: &[String],
    quiet: bool,
) -> Result<AngleEvaluation> {
    let n = data.len();
    let k = data.num_classes;
    if n == 0 {
        bail!("the test set is empty");
    }
    let start = std::time::Instant::now();
    // Angle 0 is always evaluated too (original accuracy), as an extra column when absent.
    let zero = angles.iter().position(|&a| rotation_matrix(a) == rotation_matrix(0.0));
    let mut all: Vec<f32> = angles.to_vec();
    if zero.is_none() {
        all.push(0.0);
    }
    let zero = zero.unwrap_or(angles.len());
    let mats: Vec<[f32; 4]> = all.iter().map(|&a| rotation_matrix(a)).collect();
    let per_pass = (batch / all.len()).max(1);
    let order: Vec<u32> = (0..n as u32).collect();
    let chunks = n.div_ceil(per_pass);
    let pb = (!quiet).then(|| progress::bar(chunks as u64 + 1, &format!("{} angles", angles.len())));
    let mut tally = Tally::new(n, all.len(), angles.len(), k);
    for idx in order.chunks(per_pass) {
        let copies: Vec<[f32; 4]> = mats.iter().flat_map(|m| std::iter::repeat_n(*m, idx.len())).collect();
        let angle_of: Vec<usize> = (0..all.len()).flat_map(|a| std::iter::repeat_n(a, idx.len())).collect();
        tally.add(&rotated_logp(model, data, idx, &copies)?, idx, &angle_of, data);
        if let Some(pb) = &pb {
            pb.inc(1);
        }
    }
    // The randomly rotated test set: one angle per image, drawn in image order.
    let mut rng = Rng::derive(random_seed, "random-rotation");
    let random: Vec<[f32; 4]> = (0..n).map(|_| rotation_matrix(rng.uniform(FULL_TURN.0, FULL_TURN.1))).collect();
    let mut rand_tally = Tally::new(n, 1, 1, k);
    for (c, idx) in order.chunks(batch.max(1)).enumerate() {
        let first = c * batch.max(1);
        let logp = rotated_logp(model, data, idx, &random[first..first + idx.len()])?;
        rand_tally.add(&logp, idx, &vec![0; idx.len()], data);
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let class_counts: Vec<usize> =
        (0..k).map(|c| data.labels_host.iter().filter(|&&l| l as usize == c).count()).collect();
    let result = |a: usize| AngleResult {
        angle: all[a],
        loss: tally.loss[a] / n as f64,
        accuracy: tally.correct[a] as f64 / n as f64,
        class_accuracy: (0..k)
            .map(|c| {
                if class_counts[c] == 0 {
                    f64::NAN
                } else {
                    tally.class_correct[a * k + c] as f64 / class_counts[c] as f64
                }
            })
            .collect(),
    };
    let group_hits: f64 = tally.image_correct.iter().map(|&h| h as f64).sum();
    Ok(AngleEvaluation {
        images: n,
        class_names: class_names.to_vec(),
        per_angle: (0..angles.len()).map(result).collect(),
        group_accuracy: group_hits / (n * angles.len()) as f64,
        original_accuracy: tally.correct[zero] as f64 / n as f64,
        original_loss: tally.loss[zero] / n as f64,
        random_rotation_accuracy: rand_tally.correct[0] as f64 / n as f64,
        random_rotation_loss: rand_tally.loss[0] / n as f64,
        random_seed,
        seconds: start.elapsed().as_secs_f64(),
    })
}

impl AngleEvaluation {
    /// One row per angle: angle, loss, accuracy, then accuracy per class.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("angle_deg,loss,accuracy");
        for name in &self.class_names {
            let _ = write!(out, ",acc_{}", name.replace([',', '"'], "_"));
        }
        out.push('\n');
        for r in &self.per_angle {
            let _ = write!(out, "{},{:.6},{:.6}", r.angle, r.loss, r.accuracy);
            for a in &r.class_accuracy {
                let _ = write!(out, ",{a:.6}");
            }
            out.push('\n');
        }
        out
    }

    /// The short table printed at the end of `rotvar eval --angles`.
    pub fn table(&self) -> String {
        let mut out = format!("{:>9} {:>9} {:>9}\n", "angle", "loss", "accuracy");
        for r in &self.per_angle {
            let _ = writeln!(out, "{:>8}° {:>9.4} {:>8.2}%", r.angle, r.loss, 100.0 * r.accuracy);
        }
        let _ = writeln!(
            out,
            "original accuracy {:.2}%, group accuracy {:.2}% ({} angles), randomly rotated test set {:.2}%",
            100.0 * self.original_accuracy,
            100.0 * self.group_accuracy,
            self.per_angle.len(),
            100.0 * self.random_rotation_accuracy
        );
        out
    }
}
