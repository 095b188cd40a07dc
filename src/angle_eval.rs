//! Accuracy and loss versus a transformation (docs/protocol.md, step 2): the test set under
//! each point of a set of transformations (rotation angles by default; zoom, translation,
//! flips and their grids with `--transform`), per-class × per-point accuracy, group accuracy,
//! and accuracy on a randomly transformed copy.
//!
//! Each forward pass carries several points of the same images: the batch is gathered once per
//! point on the device and every copy gets its own sampling matrix, so one pass and one small
//! readback (the log-probabilities) serve them all.

use crate::augment::FULL_TURN;
use crate::backend::{rotation_matrix, Affine, Interp, IDENTITY};
use crate::measure::shard::{self, Shard};
use crate::models::Model;
use crate::nn::Forward;
use crate::ops;
use crate::progress;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::train::fed_passes::{FedPasses, Pass};
use crate::train::DeviceDataset;
use crate::transform::{Transform, TransformSet};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

pub use crate::transform::parse_angles;

/// The evaluation at one point of the set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointResult {
    pub transform: Transform,
    /// How tables and heatmaps name the point (`30°`, `0.5`, `hflip, zoom 0.5`).
    pub label: String,
    /// Where plots put it: the axis's value for a one-axis set (the angle, the zoom factor, ...),
    /// else the point's index.
    pub x: f64,
    pub loss: f64,
    pub accuracy: f64,
    /// Per class: accuracy on that class's images at this point.
    pub class_accuracy: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransformEvaluation {
    pub images: usize,
    pub class_names: Vec<String>,
    /// The set, as `--transform` text (`rotate=0,90,180,270` for `--angles`).
    pub transforms: String,
    /// What `x` of each point measures, for a plot's axis.
    pub quantity: String,
    pub per_point: Vec<PointResult>,
    /// Mean over images of the fraction of its transformed copies classified correctly.
    pub group_accuracy: f64,
    /// Accuracy on the untransformed test set (the "original accuracy" next to group accuracy).
    pub original_accuracy: f64,
    pub original_loss: f64,
    /// Accuracy and loss on a copy of the test set where each image gets its own random
    /// transformation, drawn from `random_seed`: for a set of rotations, an angle uniform in
    /// [−180°, 180°) (the protocol's randomly rotated test set); otherwise a point of the set,
    /// each equally likely.
    pub random_accuracy: f64,
    pub random_loss: f64,
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
    /// Per image: how many of its copies under the first `group_points` points were right.
    image_correct: Vec<u32>,
    group_points: usize,
}

impl Tally {
    fn new(images: usize, points: usize, group_points: usize, classes: usize) -> Tally {
        Tally {
            group_points,
            classes,
            loss: vec![0.0; points],
            correct: vec![0; points],
            class_correct: vec![0; points * classes],
            image_correct: vec![0; images],
        }
    }

    /// Row r of `logp` is image `idx[r % idx.len()]` under angle `point_of[r]`.
    fn add(&mut self, logp: &[f32], idx: &[u32], point_of: &[usize], data: &DeviceDataset) {
        let k = self.classes;
        for (r, row) in logp.chunks_exact(k).enumerate() {
            let image = idx[r % idx.len()] as usize;
            let label = data.labels_host[image] as usize;
            let a = point_of[r];
            // First maximum on ties, as argmax_rows.
            let pred = row.iter().enumerate().fold(0, |best, (j, &v)| if v > row[best] { j } else { best });
            self.loss[a] -= row[label] as f64;
            if pred == label {
                self.correct[a] += 1;
                self.class_correct[a * k + label] += 1;
                if a < self.group_points {
                    self.image_correct[image] += 1;
                }
            }
        }
    }
}

/// Log-probabilities of each pass, in order: on a backend with graphs, passes of the shapes
/// `feeds` serve are fed from device tables and replayed (train/fed_passes.rs), the others (and
/// every pass elsewhere) run plain. Both give the same bits.
fn pass_logps(model: &Model, data: &DeviceDataset, feeds: &mut [FedPasses], passes: &[Pass]) -> Result<Vec<Vec<f32>>> {
    let mut out: Vec<Option<Vec<f32>>> = vec![None; passes.len()];
    for f in feeds.iter_mut() {
        let mine: Vec<usize> =
            (0..passes.len()).filter(|&i| passes[i].rows.len() == f.copies() && out[i].is_none()).collect();
        for chunk in mine.chunks(f.capacity()) {
            let group: Vec<&Pass> = chunk.iter().map(|&i| &passes[i]).collect();
            for (&i, logp) in chunk.iter().zip(f.run(model, data, &group)?) {
                out[i] = Some(logp);
            }
        }
    }
    out.into_iter()
        .zip(passes)
        .map(|(o, p)| match o {
            Some(logp) => Ok(logp),
            None => {
                let (x, _) = data.batch(&p.rows)?;
                let x: Tensor = ops::warp(&x, &p.mats, Interp::Bilinear, &data.fill)?;
                model.forward(&x, &mut Forward::eval())?.to_vec()
            }
        })
        .collect()
}

/// The additive part of an evaluation: sums and counts over a set of test images, so the
/// tallies of shards of the test set add up to the whole one's ([`TransformTally::merge`]) and
/// [`TransformTally::finish`] divides once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransformTally {
    /// The requested set (the identity is evaluated too, as an extra column when absent).
    pub set: TransformSet,
    pub classes: usize,
    pub images: usize,
    /// Per evaluated point: summed loss, correct predictions; per (point, class): correct.
    pub loss: Vec<f64>,
    pub correct: Vec<u64>,
    pub class_correct: Vec<u64>,
    pub class_counts: Vec<u64>,
    /// Σ over images of how many of its copies under the requested points were right.
    pub group_hits: u64,
    pub random_loss: f64,
    pub random_correct: u64,
}

/// The matrices evaluated for a request: the set's, plus the identity when no point of it is
/// one; and where the identity is.
fn with_identity(set: &TransformSet) -> (Vec<Affine>, usize) {
    let mut all = set.matrices();
    let identity = all.iter().position(|m| *m == IDENTITY);
    if identity.is_none() {
        all.push(IDENTITY);
    }
    (all, identity.unwrap_or(set.len()))
}

/// Evaluate `model` on `data` rotated by every angle of `angles`: [`evaluate`] over
/// [`TransformSet::rotations`].
pub fn evaluate_angles(
    model: &Model,
    data: &DeviceDataset,
    angles: &[f32],
    batch: usize,
    random_seed: u64,
    class_names: &[String],
    quiet: bool,
) -> Result<TransformEvaluation> {
    evaluate(model, data, &TransformSet::rotations(angles), batch, random_seed, class_names, quiet)
}

/// Evaluate `model` on `data` under every point of `set` (bilinear, fill = raw black), with at
/// most `batch` transformed images per forward pass.
pub fn evaluate(
    model: &Model,
    data: &DeviceDataset,
    set: &TransformSet,
    batch: usize,
    random_seed: u64,
    class_names: &[String],
    quiet: bool,
) -> Result<TransformEvaluation> {
    let start = std::time::Instant::now();
    let tally = tally_transforms(model, data, set, batch, random_seed, 0..data.len(), quiet)?;
    tally.finish(class_names, random_seed, start.elapsed().as_secs_f64())
}

/// The tally of [`evaluate`] over the images `range` of `data` only (a shard).
///
/// Images go in blocks of `batch` counted from the first test image: each block's transformed
/// copies in passes of at most `batch` images, then the block once more under its random
/// transformations. A shard made of whole blocks therefore runs exactly the forward passes of the whole
/// evaluation (a GEMM's rounding depends on how many images share it).
pub fn tally_transforms(
    model: &Model,
    data: &DeviceDataset,
    set: &TransformSet,
    batch: usize,
    random_seed: u64,
    range: std::ops::Range<usize>,
    quiet: bool,
) -> Result<TransformTally> {
    let (n, k, batch) = (data.len(), data.num_classes, batch.max(1));
    if range.is_empty() || range.end > n {
        bail!("evaluate: images {range:?} of a test set of {n}");
    }
    if set.is_empty() {
        bail!("evaluate: the set of transformations is empty");
    }
    let (mats, _) = with_identity(set);
    let per_pass = (batch / mats.len()).max(1);
    // One transformation per image of the whole test set, drawn in image order, so a shard
    // sees the ones the whole evaluation gives its images.
    let random: Vec<Affine> = if set.rotation_only() {
        let mut rng = Rng::derive(random_seed, "random-rotation");
        (0..n).map(|_| rotation_matrix(rng.uniform(FULL_TURN.0, FULL_TURN.1))).collect()
    } else {
        let mut rng = Rng::derive(random_seed, "random-transform");
        let points = set.matrices();
        (0..n).map(|_| points[rng.below(points.len() as u64) as usize]).collect()
    };
    let blocks = range.len().div_ceil(batch);
    let what = if set.rotation_only() { "angles" } else { "transformations" };
    let pb = (!quiet).then(|| progress::bar(blocks as u64, &format!("{} {what}", set.len())));
    let mut tally = Tally::new(n, mats.len(), set.len(), k);
    let mut rand_tally = Tally::new(n, 1, 1, k);
    let order: Vec<u32> = (range.start as u32..range.end as u32).collect();
    // The two full pass shapes (a whole group of images under every point, a whole block under
    // its random transformations) replay as graphs where the backend has them; a block's
    // passes are read back together.
    let per_block = batch.div_ceil(per_pass) + 1;
    let mut feeds = Vec::new();
    for copies in [per_pass * mats.len(), batch] {
        if feeds.iter().all(|f: &FedPasses| f.copies() != copies) {
            feeds.extend(FedPasses::new(data, copies, per_block)?);
        }
    }
    for block in order.chunks(batch) {
        let mut passes: Vec<Pass> = block
            .chunks(per_pass)
            .map(|idx| Pass {
                rows: (0..mats.len()).flat_map(|_| idx.iter().copied()).collect(),
                mats: mats.iter().flat_map(|m| std::iter::repeat_n(*m, idx.len())).collect(),
            })
            .collect();
        passes.push(Pass { rows: block.to_vec(), mats: block.iter().map(|&i| random[i as usize]).collect() });
        let logps = pass_logps(model, data, &mut feeds, &passes)?;
        let (rand, points) = logps.split_last().context("internal: a block without passes")?;
        for (idx, logp) in block.chunks(per_pass).zip(points) {
            let point_of: Vec<usize> = (0..mats.len()).flat_map(|a| std::iter::repeat_n(a, idx.len())).collect();
            tally.add(logp, idx, &point_of, data);
        }
        rand_tally.add(rand, block, &vec![0; block.len()], data);
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
    Ok(TransformTally {
        set: set.clone(),
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

impl TransformTally {
    /// Add the tally of other images of the same evaluation.
    pub fn merge(&mut self, o: &TransformTally) -> Result<()> {
        if o.set != self.set || o.classes != self.classes || o.loss.len() != self.loss.len() {
            bail!("cannot merge tallies of different transformations or classes");
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
    pub fn finish(&self, class_names: &[String], random_seed: u64, seconds: f64) -> Result<TransformEvaluation> {
        let (all, zero) = with_identity(&self.set);
        let (n, k) = (self.images as f64, self.classes);
        let consistent = self.loss.len() == all.len()
            && self.correct.len() == all.len()
            && self.class_correct.len() == all.len() * k
            && self.class_counts.len() == k
            && self.images > 0;
        if !consistent {
            bail!("a tally of inconsistent lengths (a corrupt shard?)");
        }
        let (xs, labels) = (self.set.xs(), self.set.labels());
        let result = |a: usize| PointResult {
            transform: self.set.points[a],
            label: labels[a].clone(),
            x: xs[a],
            loss: self.loss[a] / n,
            accuracy: self.correct[a] as f64 / n,
            class_accuracy: (0..k)
                .map(|c| match self.class_counts[c] {
                    0 => f64::NAN,
                    count => self.class_correct[a * k + c] as f64 / count as f64,
                })
                .collect(),
        };
        Ok(TransformEvaluation {
            images: self.images,
            class_names: class_names.to_vec(),
            transforms: self.set.spec(),
            quantity: self.set.quantity(),
            per_point: (0..self.set.len()).map(result).collect(),
            group_accuracy: self.group_hits as f64 / (n * self.set.len() as f64),
            original_accuracy: self.correct[zero] as f64 / n,
            original_loss: self.loss[zero] / n,
            random_accuracy: self.random_correct as f64 / n,
            random_loss: self.random_loss / n,
            random_seed,
            seconds,
        })
    }
}

impl TransformEvaluation {
    /// Whether every point is a rotation (then the outputs speak of angles).
    pub fn rotations(&self) -> bool {
        self.transforms.split(';').all(|axis| axis.starts_with("rotate="))
    }

    /// What the random copy of the test set is called in legends and tables.
    pub fn random_name(&self) -> &'static str {
        if self.rotations() {
            "random rotation"
        } else {
            "random transformation"
        }
    }

    /// One row per point: for rotations `angle_deg`, otherwise the point's label and every
    /// parameter; then loss, accuracy and accuracy per class.
    pub fn to_csv(&self) -> String {
        let rotations = self.rotations();
        let mut out = String::from(if rotations {
            "angle_deg"
        } else {
            "transform,rotate_deg,zoom,translate_x,translate_y,hflip,vflip"
        });
        out.push_str(",loss,accuracy");
        for name in &self.class_names {
            let _ = write!(out, ",acc_{}", name.replace([',', '"'], "_"));
        }
        out.push('\n');
        for r in &self.per_point {
            let t = &r.transform;
            if rotations {
                let _ = write!(out, "{}", t.rotate);
            } else {
                let _ = write!(
                    out,
                    "\"{}\",{},{},{},{},{},{}",
                    r.label.replace('"', "'"),
                    t.rotate,
                    t.zoom,
                    t.translate[0],
                    t.translate[1],
                    t.hflip as u8,
                    t.vflip as u8
                );
            }
            let _ = write!(out, ",{:.6},{:.6}", r.loss, r.accuracy);
            for a in &r.class_accuracy {
                let _ = write!(out, ",{a:.6}");
            }
            out.push('\n');
        }
        out
    }

    /// The short table printed at the end of `rotvar eval --angles` / `--transform`.
    pub fn table(&self) -> String {
        let rotations = self.rotations();
        let width = self.per_point.iter().map(|r| r.label.chars().count()).max().unwrap_or(0).max(9);
        let head = if rotations { "angle" } else { "transform" };
        let mut out = format!("{head:>width$} {:>9} {:>9}\n", "loss", "accuracy");
        for r in &self.per_point {
            let _ = writeln!(out, "{:>width$} {:>9.4} {:>8.2}%", r.label, r.loss, 100.0 * r.accuracy);
        }
        let (points, random) =
            if rotations { ("angles", "randomly rotated") } else { ("transformations", "randomly transformed") };
        let _ = writeln!(
            out,
            "original accuracy {:.2}%, group accuracy {:.2}% ({} {points}), {random} test set {:.2}%",
            100.0 * self.original_accuracy,
            100.0 * self.group_accuracy,
            self.per_point.len(),
            100.0 * self.random_accuracy
        );
        out
    }
}

/// `eval --angles/--transform ... --shard K/N`: one shard's tally and what every shard of the evaluation
/// must agree on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransformShard {
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
    pub tally: TransformTally,
}

pub const SHARD_KIND: &str = "rotvar-angles-shard";

impl TransformShard {
    /// `angles.shard-K-of-N.json` for rotations, `transform.shard-K-of-N.json` otherwise.
    pub fn file_name(set: &TransformSet, shard: Shard) -> String {
        let stem = if set.rotation_only() { "angles" } else { "transform" };
        format!("{stem}.shard-{}-of-{}.json", shard.k, shard.n)
    }

    /// Whether `o` is another shard of the same evaluation (all but the shard and its tally).
    fn same_evaluation(&self, o: &TransformShard) -> bool {
        self.checkpoint_sha256 == o.checkpoint_sha256
            && self.dataset == o.dataset
            && self.class_names == o.class_names
            && self.total_images == o.total_images
            && self.batch == o.batch
            && self.random_seed == o.random_seed
            && self.tally.set == o.tally.set
    }
}

/// Read and add a complete set of `eval --angles/--transform --shard` files (any order).
pub fn merge_shards(paths: &[std::path::PathBuf]) -> Result<(TransformShard, TransformTally)> {
    let mut shards = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read shard {}", p.display()))?;
        let s: TransformShard =
            serde_json::from_str(&text).ok().filter(|s: &TransformShard| s.kind == SHARD_KIND).with_context(|| {
                format!("{} is not a shard written by `rotvar eval --angles/--transform ... --shard`", p.display())
            })?;
        shards.push((s, p.as_path()));
    }
    shards.sort_by_key(|(s, _)| s.shard.k);
    let Some((first, first_path)) = shards.first() else {
        bail!("eval-merge: no shard files given");
    };
    if let Some((_, p)) = shards.iter().find(|(s, _)| !s.same_evaluation(first)) {
        bail!(
            "{} and {} come from different evaluations (checkpoint, dataset, images, --batch-size, --seed or transformations)",
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
