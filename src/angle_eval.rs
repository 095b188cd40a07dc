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
use crate::measure::shard::{self, Shard};
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

/// The additive part of an angle evaluation: sums and counts over a set of test images, so the
/// tallies of shards of the test set add up to the whole one's ([`AngleTally::merge`]) and
/// [`AngleTally::finish`] divides once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AngleTally {
    /// The requested angles (angle 0 is evaluated too, as an extra column when absent).
    pub angles: Vec<f32>,
    pub classes: usize,
    pub images: usize,
    /// Per evaluated angle: summed loss, correct predictions; per (angle, class): correct.
    pub loss: Vec<f64>,
    pub correct: Vec<u64>,
    pub class_correct: Vec<u64>,
    pub class_counts: Vec<u64>,
    /// Σ over images of how many of its copies under the requested angles were right.
    pub group_hits: u64,
    pub random_loss: f64,
    pub random_correct: u64,
}

/// The angles evaluated for a request: the request, plus 0° when it is absent; and where 0° is.
fn with_zero(angles: &[f32]) -> (Vec<f32>, usize) {
    let zero = angles.iter().position(|&a| rotation_matrix(a) == rotation_matrix(0.0));
    let mut all = angles.to_vec();
    if zero.is_none() {
        all.push(0.0);
    }
    (all, zero.unwrap_or(angles.len()))
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
    let start = std::time::Instant::now();
    let tally = tally_angles(model, data, angles, batch, random_seed, 0..data.len(), quiet)?;
    tally.finish(class_names, random_seed, start.elapsed().as_secs_f64())
}

/// The tally of [`evaluate_angles`] over the images `range` of `data` only (a shard).
///
/// Images go in blocks of `batch` counted from the first test image: each block's rotated
/// copies in passes of at most `batch` images, then the block once more under its random
/// angles. A shard made of whole blocks therefore runs exactly the forward passes of the whole
/// evaluation (a GEMM's rounding depends on how many images share it).
pub fn tally_angles(
    model: &Model,
    data: &DeviceDataset,
    angles: &[f32],
    batch: usize,
    random_seed: u64,
    range: std::ops::Range<usize>,
    quiet: bool,
) -> Result<AngleTally> {
    let (n, k, batch) = (data.len(), data.num_classes, batch.max(1));
    if range.is_empty() || range.end > n {
        bail!("evaluate: images {range:?} of a test set of {n}");
    }
    let (all, _) = with_zero(angles);
    let mats: Vec<[f32; 4]> = all.iter().map(|&a| rotation_matrix(a)).collect();
    let per_pass = (batch / all.len()).max(1);
    // One angle per image of the whole test set, drawn in image order, so a shard sees the
    // angles the whole evaluation gives its images.
    let mut rng = Rng::derive(random_seed, "random-rotation");
    let random: Vec<[f32; 4]> = (0..n).map(|_| rotation_matrix(rng.uniform(FULL_TURN.0, FULL_TURN.1))).collect();
    let blocks = range.len().div_ceil(batch);
    let pb = (!quiet).then(|| progress::bar(blocks as u64, &format!("{} angles", angles.len())));
    let mut tally = Tally::new(n, all.len(), angles.len(), k);
    let mut rand_tally = Tally::new(n, 1, 1, k);
    let order: Vec<u32> = (range.start as u32..range.end as u32).collect();
    for block in order.chunks(batch) {
        for idx in block.chunks(per_pass) {
            let copies: Vec<[f32; 4]> = mats.iter().flat_map(|m| std::iter::repeat_n(*m, idx.len())).collect();
            let angle_of: Vec<usize> = (0..all.len()).flat_map(|a| std::iter::repeat_n(a, idx.len())).collect();
            tally.add(&rotated_logp(model, data, idx, &copies)?, idx, &angle_of, data);
        }
        let mats: Vec<[f32; 4]> = block.iter().map(|&i| random[i as usize]).collect();
        rand_tally.add(&rotated_logp(model, data, block, &mats)?, block, &vec![0; block.len()], data);
        if let Some(pb) = &pb {
            pb.inc(1);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut class_counts = vec![0u64; k];
    for &i in &order {
        class_counts[data.labels_host[i as usize] as usize] += 1;
    }
    Ok(AngleTally {
        angles: angles.to_vec(),
        classes: k,
        images: order.len(),
        loss: tally.loss,
        correct: tally.correct.iter().map(|&c| c as u64).collect(),
        class_correct: tally.class_correct.iter().map(|&c| c as u64).collect(),
        class_counts,
        group_hits: tally.image_correct.iter().map(|&h| h as u64).sum(),
        random_loss: rand_tally.loss[0],
        random_correct: rand_tally.correct[0] as u64,
    })
}

impl AngleTally {
    /// Add the tally of other images of the same evaluation.
    pub fn merge(&mut self, o: &AngleTally) -> Result<()> {
        if o.angles != self.angles || o.classes != self.classes || o.loss.len() != self.loss.len() {
            bail!("cannot merge tallies of different angles or classes");
        }
        let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        self.images += o.images;
        self.loss.iter_mut().zip(&o.loss).for_each(|(x, y)| *x += y);
        add(&mut self.correct, &o.correct);
        add(&mut self.class_correct, &o.class_correct);
        add(&mut self.class_counts, &o.class_counts);
        self.group_hits += o.group_hits;
        self.random_loss += o.random_loss;
        self.random_correct += o.random_correct;
        Ok(())
    }

    /// Means and accuracies from the sums.
    pub fn finish(&self, class_names: &[String], random_seed: u64, seconds: f64) -> Result<AngleEvaluation> {
        let (all, zero) = with_zero(&self.angles);
        let (n, k) = (self.images as f64, self.classes);
        let consistent = self.loss.len() == all.len()
            && self.correct.len() == all.len()
            && self.class_correct.len() == all.len() * k
            && self.class_counts.len() == k
            && self.images > 0;
        if !consistent {
            bail!("an angle tally of inconsistent lengths (a corrupt shard?)");
        }
        let result = |a: usize| AngleResult {
            angle: all[a],
            loss: self.loss[a] / n,
            accuracy: self.correct[a] as f64 / n,
            class_accuracy: (0..k)
                .map(|c| match self.class_counts[c] {
                    0 => f64::NAN,
                    count => self.class_correct[a * k + c] as f64 / count as f64,
                })
                .collect(),
        };
        Ok(AngleEvaluation {
            images: self.images,
            class_names: class_names.to_vec(),
            per_angle: (0..self.angles.len()).map(result).collect(),
            group_accuracy: self.group_hits as f64 / (n * self.angles.len() as f64),
            original_accuracy: self.correct[zero] as f64 / n,
            original_loss: self.loss[zero] / n,
            random_rotation_accuracy: self.random_correct as f64 / n,
            random_rotation_loss: self.random_loss / n,
            random_seed,
            seconds,
        })
    }
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

/// `eval --angles ... --shard K/N`: one shard's tally and what every shard of the evaluation
/// must agree on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AngleShard {
    pub kind: String,
    pub checkpoint_sha256: String,
    pub arch: String,
    pub augment: String,
    pub dataset: String,
    pub class_names: Vec<String>,
    pub total_images: usize,
    pub batch: usize,
    pub random_seed: u64,
    pub shard: Shard,
    pub tally: AngleTally,
}

pub const SHARD_KIND: &str = "rotvar-angles-shard";

impl AngleShard {
    pub fn file_name(shard: Shard) -> String {
        format!("angles.shard-{}-of-{}.json", shard.k, shard.n)
    }

    /// Whether `o` is another shard of the same evaluation (all but the shard and its tally).
    fn same_evaluation(&self, o: &AngleShard) -> bool {
        self.checkpoint_sha256 == o.checkpoint_sha256
            && self.dataset == o.dataset
            && self.class_names == o.class_names
            && self.total_images == o.total_images
            && self.batch == o.batch
            && self.random_seed == o.random_seed
            && self.tally.angles == o.tally.angles
    }
}

/// Read and add a complete set of `eval --angles --shard` files (any order).
pub fn merge_shards(paths: &[std::path::PathBuf]) -> Result<(AngleShard, AngleTally)> {
    let mut shards = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read shard {}", p.display()))?;
        let s: AngleShard = serde_json::from_str(&text)
            .ok()
            .filter(|s: &AngleShard| s.kind == SHARD_KIND)
            .with_context(|| format!("{} is not a shard written by `rotvar eval --angles ... --shard`", p.display()))?;
        shards.push((s, p.as_path()));
    }
    shards.sort_by_key(|(s, _)| s.shard.k);
    let Some((first, first_path)) = shards.first() else {
        bail!("eval-merge: no shard files given");
    };
    if let Some((_, p)) = shards.iter().find(|(s, _)| !s.same_evaluation(first)) {
        bail!(
            "{} and {} come from different evaluations (checkpoint, dataset, images, --batch-size, --seed or angles)",
            first_path.display(),
            p.display()
        );
    }
    let set: Vec<(Shard, &std::path::Path)> = shards.iter().map(|(s, p)| (s.shard, *p)).collect();
    shard::check_complete(&set, "eval")?;
    let mut tally = first.tally.clone();
    for (s, p) in &shards[1..] {
        tally.merge(&s.tally).with_context(|| format!("{}", p.display()))?;
    }
    Ok((first.clone(), tally))
}
