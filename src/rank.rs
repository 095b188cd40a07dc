//! Do CNNs encode the augmentation they saw? (docs/rank-study.md; Yan & Huang, IJCNN 2021.)
//!
//! A frozen backbone sees two copies of one image at two strengths of one augmentation (zoom
//! factors, rotation angles or brightness factors). For each chosen layer, a small head scores
//! each copy from that layer's features and learns, with the RankNet loss, to score the copy
//! with the larger strength higher. Its ranking accuracy on pairs made from the test set says
//! how explicitly the layer still carries the augmentation; chance is 50%.
//!
//! One backbone forward pass per batch of pairs serves the heads of every layer; the backbone
//! runs in eval mode outside any tape, so nothing of it is recorded or updated.

use crate::autograd::Tape;
use crate::backend::{Affine, BackendRef, Interp, IDENTITY};
use crate::data::Normalization;
use crate::models::Model;
use crate::nn::{Forward, Layer, Linear, Sequential};
use crate::ops;
use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
use crate::progress;
use crate::rng::{splitmix64, Rng};
use crate::tensor::Tensor;
use crate::train::DeviceDataset;
use crate::transform::Transform;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The augmentation whose strength the heads rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Augmentation {
    /// Zoom about the centre by a factor (> 1 enlarges), through the resampling of every other
    /// transformation.
    Zoom,
    /// Rotation by an angle in degrees, counter-clockwise as displayed.
    Rotate,
    /// Raw pixel values multiplied by a factor and clipped to [0, 255].
    Brightness,
}

impl Augmentation {
    pub fn name(self) -> &'static str {
        match self {
            Augmentation::Zoom => "zoom",
            Augmentation::Rotate => "rotate",
            Augmentation::Brightness => "brightness",
        }
    }

    /// The strengths a pair's copies are drawn from by default: the notebook's zoom factors,
    /// rotations up to 60°, brightness from half to one and a half.
    pub fn default_levels(self) -> Vec<f32> {
        match self {
            Augmentation::Zoom => vec![0.5, 0.6, 0.7, 0.8, 0.9],
            Augmentation::Rotate => vec![0.0, 15.0, 30.0, 45.0, 60.0],
            Augmentation::Brightness => vec![0.5, 0.75, 1.0, 1.25, 1.5],
        }
    }

    /// The sampling matrix of a copy at strength `s` (the identity for brightness).
    fn matrix(self, s: f32) -> Affine {
        match self {
            Augmentation::Zoom => Transform { zoom: s, ..Transform::default() }.matrix(),
            Augmentation::Rotate => Transform::rotation(s).matrix(),
            Augmentation::Brightness => IDENTITY,
        }
    }
}

/// Settings of the study (the defaults follow the student reimplementation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankOptions {
    pub augmentation: Augmentation,
    /// The strengths a pair's two copies are drawn from (two different ones per pair): zoom
    /// factors, angles in degrees or brightness factors.
    pub factors: Vec<f32>,
    /// Pairs drawn per image.
    pub pairs_per_image: usize,
    /// Backbone intermediates to put a head on (`None`: [`default_layers`]).
    pub layers: Option<Vec<String>>,
    pub head_epochs: usize,
    /// Pairs per head training step.
    pub batch: usize,
    pub lr: f32,
    /// Width of the head's hidden layer.
    pub hidden: usize,
    pub seed: u64,
}

impl Default for RankOptions {
    fn default() -> Self {
        RankOptions {
            augmentation: Augmentation::Zoom,
            factors: Augmentation::Zoom.default_levels(),
            pairs_per_image: 4,
            layers: None,
            head_epochs: 3,
            batch: 64,
            lr: 1e-3,
            hidden: 1024,
            seed: 0,
        }
    }
}

/// Two copies of one image: at factor index `a` and at factor index `b` (a ≠ b).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub image: u32,
    pub a: usize,
    pub b: usize,
}

/// `per_image` pairs for each image, in image order, each of two different factor indices
/// drawn uniformly from `factors` (so every ordered pair of distinct factors is equally likely).
pub fn draw_pairs(images: &[u32], factors: usize, per_image: usize, rng: &mut Rng) -> Result<Vec<Pair>> {
    if factors < 2 {
        bail!("rank: the pairs need at least two different factors, got {factors}");
    }
    let mut out = Vec::with_capacity(images.len() * per_image);
    for &image in images {
        for _ in 0..per_image {
            let a = rng.below(factors as u64) as usize;
            // One of the other factors-1, uniformly.
            let b = (a + 1 + rng.below(factors as u64 - 1) as usize) % factors;
            out.push(Pair { image, a, b });
        }
    }
    Ok(out)
}

/// The RankNet loss of scores `[2P, 1]` laid out as (f(a₀), f(b₀), f(a₁), f(b₁), …): the mean over
/// pairs of log(1 + exp(−y·(f(a) − f(b)))) with y = +1 where `a_larger[i]` (copy a has the larger
/// factor) and −1 otherwise. It is a two-class cross-entropy on the rows [f(a), f(b)] whose right
/// class is the copy with the larger factor, so it rides on log_softmax and nll_loss and their
/// tested kernels and gradients.
pub fn ranknet_loss(scores: &Tensor, a_larger: &[bool]) -> Result<Tensor> {
    let p = a_larger.len();
    if scores.shape() != [2 * p, 1] {
        bail!("ranknet_loss: scores of shape {:?} for {p} pairs (expected [{}, 1])", scores.shape(), 2 * p);
    }
    let logits = ops::reshape(scores, &[p, 2])?;
    let logp = ops::log_softmax(&logits)?;
    let target: Vec<f32> = a_larger.iter().map(|&a| if a { 0.0 } else { 1.0 }).collect();
    let target = Tensor::from_vec(scores.backend(), &[p], &target)?;
    ops::nll_loss(&logp, &target)
}

/// The scoring head on `features` inputs: dropout 0.2 → fc `hidden` → ReLU → dropout 0.2 → fc 1.
pub fn head(b: &BackendRef, features: usize, hidden: usize, rng: &mut Rng) -> Result<Sequential> {
    let mut s = Sequential::new();
    s.push("dropout1", Layer::Dropout(0.2))
        .push("fc1", Layer::Linear(Linear::new(b, rng, features, hidden)?))
        .push("fc1.act", Layer::Relu)
        .push("dropout2", Layer::Dropout(0.2))
        .push("fc2", Layer::Linear(Linear::new(b, rng, hidden, 1)?));
    Ok(s)
}

/// The intermediates a head goes on by default: every block output (pooling layers) and every
/// hidden fully connected layer after its activation, in the model's order; every intermediate
/// but the log-probabilities for a model without pooling.
pub fn default_layers(model: &Model) -> Vec<String> {
    let names = model.intermediate_names();
    let picked: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("pool") || (n.starts_with("fc") && n.ends_with(".act")))
        .cloned()
        .collect();
    if picked.is_empty() {
        names.into_iter().filter(|n| n != "log_softmax").collect()
    } else {
        picked
    }
}

/// Ranking accuracy of one layer's head on the test pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRank {
    pub layer: String,
    /// Values per image at this layer (the head's input width).
    pub features: usize,
    /// Fraction of test pairs whose scores order the copies as their factors do (ties count as
    /// wrong). Chance is 0.5.
    pub accuracy: f64,
    /// The same over the pairs whose copy a has the larger factor, and over those whose copy b has.
    pub accuracy_a_larger: f64,
    pub accuracy_b_larger: f64,
    /// Mean RankNet loss of the last head epoch (training pairs, dropout on) and on the test pairs.
    pub train_loss: f64,
    pub test_loss: f64,
}

/// One backbone's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneRank {
    pub label: String,
    pub checkpoint: String,
    pub arch: String,
    /// The backbone's own training augmentation.
    pub augment: String,
    pub head_train_pairs: usize,
    pub test_pairs: usize,
    pub layers: Vec<LayerRank>,
}

/// Multiply the raw pixel values of each image (row) of the normalized batch `x` by its factor,
/// clipped to raw [0, 255], and normalize again. On the host: the images make one round trip
/// per batch of pairs, which the study can afford (training never uses this).
pub fn brighten(x: &Tensor, factors: &[f32], norm: &Normalization) -> Result<Tensor> {
    let (n, c) = (x.dim(0), x.dim(1));
    if factors.len() != n || norm.mean.len() != c {
        bail!("brighten: {} factors for {n} images, {} means for {c} channels", factors.len(), norm.mean.len());
    }
    let d = norm.divisors();
    let mut v = x.to_vec()?;
    let plane = v.len() / (n * c).max(1);
    for (i, image) in v.chunks_mut(c * plane).enumerate() {
        for (ch, p) in image.chunks_mut(plane).enumerate() {
            let (m, s) = (norm.mean[ch], d[ch]);
            p.iter_mut().for_each(|x| *x = (((*x * s + m) * factors[i]).clamp(0.0, 1.0) - m) / s);
        }
    }
    Tensor::from_vec(x.backend(), x.shape(), &v)
}

/// Every chosen layer's features for a batch of P pairs, flattened to [2P, F] in the order
/// (a₀, b₀, a₁, b₁, …): the 2P copies made in one pass, one backbone pass in eval mode.
fn layer_features(
    model: &Model,
    data: &DeviceDataset,
    norm: &Normalization,
    pairs: &[Pair],
    o: &RankOptions,
    layers: &[String],
) -> Result<Vec<Tensor>> {
    let rows: Vec<u32> = pairs.iter().flat_map(|p| [p.image, p.image]).collect();
    let strength: Vec<f32> = pairs.iter().flat_map(|p| [o.factors[p.a], o.factors[p.b]]).collect();
    let (x, _) = data.batch(&rows)?;
    let x = match o.augmentation {
        Augmentation::Brightness => brighten(&x, &strength, norm)?,
        a => {
            let copies: Vec<Affine> = strength.iter().map(|&s| a.matrix(s)).collect();
            ops::warp(&x, &copies, Interp::Bilinear, &data.fill)?
        }
    };
    let mut found: Vec<Option<Tensor>> = vec![None; layers.len()];
    let mut observe = |name: &str, t: &Tensor| -> Result<()> {
        if let Some(i) = layers.iter().position(|l| l == name) {
            found[i] = Some(t.detach());
        }
        Ok(())
    };
    model.forward(&x, &mut Forward::observe(&mut observe))?;
    found
        .into_iter()
        .zip(layers)
        .map(|(t, name)| {
            let t = t.with_context(|| format!("rank: the backbone reported no intermediate named {name}"))?;
            let n = t.dim(0);
            ops::reshape(&t, &[n, t.numel() / n])
        })
        .collect()
}

/// Train one head per layer on `train` pairs of `data_train`, then measure them on `test`
/// pairs of `data_test` (both normalized with `norm`, the backbone's statistics).
#[allow(clippy::too_many_arguments)]
pub fn rank_backbone(
    model: &Model,
    norm: &Normalization,
    data_train: &DeviceDataset,
    train_pairs: &[Pair],
    data_test: &DeviceDataset,
    test_pairs: &[Pair],
    o: &RankOptions,
    label: &str,
    quiet: bool,
) -> Result<Vec<LayerRank>> {
    if train_pairs.is_empty() || test_pairs.is_empty() {
        bail!("rank: no pairs to train the heads on or to test them on");
    }
    let names = model.intermediate_names();
    let layers = o.layers.clone().unwrap_or_else(|| default_layers(model));
    if let Some(bad) = layers.iter().find(|l| !names.contains(l)) {
        bail!("rank: the backbone has no layer '{bad}'; its layers are {}", names.join(", "));
    }
    let larger = |p: &Pair| o.factors[p.a] > o.factors[p.b];
    // Each head's input width, from one pair.
    let widths: Vec<usize> =
        layer_features(model, data_train, norm, &train_pairs[..1], o, &layers)?.iter().map(|t| t.dim(1)).collect();
    let mut rng = Rng::derive(o.seed, "rank-heads");
    let mut heads = Vec::new();
    for &w in &widths {
        let h = head(data_train.images.backend(), w, o.hidden, &mut rng)?;
        let opt = Optimizer::new(OptimConfig::new(OptimizerKind::Adam, o.lr, 0.0), h.parameters())?;
        heads.push((h, opt, 0.0f64));
    }
    let steps = train_pairs.len().div_ceil(o.batch) * o.head_epochs;
    let pb = (!quiet).then(|| progress::bar(steps as u64, &format!("{label}: {} heads", layers.len())));
    let mut order = train_pairs.to_vec();
    let mut shuffle = Rng::derive(o.seed, "rank-order");
    let mut step = 0u64;
    for _ in 0..o.head_epochs {
        shuffle.shuffle(&mut order);
        for (_, _, loss_sum) in heads.iter_mut() {
            *loss_sum = 0.0;
        }
        for chunk in order.chunks(o.batch) {
            let feats = layer_features(model, data_train, norm, chunk, o, &layers)?;
            let target: Vec<bool> = chunk.iter().map(larger).collect();
            for (li, ((h, opt, loss_sum), x)) in heads.iter_mut().zip(&feats).enumerate() {
                let tape = Tape::start()?;
                let seed = splitmix64(o.seed ^ (step << 8) ^ li as u64);
                let scores = h.forward(x, &mut Forward::train(seed))?;
                let loss = ranknet_loss(&scores, &target)?;
                let grads = tape.backward(&loss)?;
                opt.step(&grads)?;
                let l = loss.scalar()? as f64;
                if !l.is_finite() {
                    bail!("rank: the head on {} diverged (loss {l}); lower --lr", layers[li]);
                }
                *loss_sum += l * chunk.len() as f64;
            }
            step += 1;
            if let Some(pb) = &pb {
                pb.inc(1);
            }
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    // Test pairs: scores in eval mode (dropout off).
    let mut hits = vec![[0usize; 2]; layers.len()];
    let mut test_loss = vec![0.0f64; layers.len()];
    for chunk in test_pairs.chunks(o.batch.max(256)) {
        let feats = layer_features(model, data_test, norm, chunk, o, &layers)?;
        let target: Vec<bool> = chunk.iter().map(larger).collect();
        for (li, ((h, _, _), x)) in heads.iter().zip(&feats).enumerate() {
            let scores = h.forward(x, &mut Forward::eval())?;
            test_loss[li] += ranknet_loss(&scores, &target)?.scalar()? as f64 * chunk.len() as f64;
            let s = scores.to_vec()?;
            for (i, &a_larger) in target.iter().enumerate() {
                let (fa, fb) = (s[2 * i], s[2 * i + 1]);
                if (a_larger && fa > fb) || (!a_larger && fb > fa) {
                    hits[li][usize::from(!a_larger)] += 1;
                }
            }
        }
    }
    let n_a = test_pairs.iter().filter(|p| larger(p)).count();
    let n_b = test_pairs.len() - n_a;
    let frac = |h: usize, n: usize| if n == 0 { f64::NAN } else { h as f64 / n as f64 };
    Ok(layers
        .iter()
        .enumerate()
        .map(|(li, name)| LayerRank {
            layer: name.clone(),
            features: widths[li],
            accuracy: frac(hits[li][0] + hits[li][1], test_pairs.len()),
            accuracy_a_larger: frac(hits[li][0], n_a),
            accuracy_b_larger: frac(hits[li][1], n_b),
            train_loss: heads[li].2 / train_pairs.len() as f64,
            test_loss: test_loss[li] / test_pairs.len() as f64,
        })
        .collect())
}

/// Everything `rotvar rank` writes to rank.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankReport {
    pub kind: String,
    pub augmentation: String,
    pub options: RankOptions,
    pub chance: f64,
    pub backbones: Vec<BackboneRank>,
    pub seconds: f64,
}

impl RankReport {
    /// One row per backbone and layer.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "backbone,augment,layer,features,accuracy,accuracy_a_larger,accuracy_b_larger,train_loss,test_loss\n",
        );
        for b in &self.backbones {
            for l in &b.layers {
                let _ = writeln!(
                    out,
                    "{},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6}",
                    b.label,
                    b.augment.replace(',', ";"),
                    l.layer,
                    l.features,
                    l.accuracy,
                    l.accuracy_a_larger,
                    l.accuracy_b_larger,
                    l.train_loss,
                    l.test_loss
                );
            }
        }
        out
    }

    /// The report's section: a table of ranking accuracy per layer, one column per backbone.
    pub fn markdown(&self) -> String {
        let factors: Vec<String> = self.options.factors.iter().map(|f| f.to_string()).collect();
        let aug = self.options.augmentation.name();
        let mut out = format!(
            "## Does the backbone encode {aug}? (ranking accuracy per layer)\n\n\
             A head on each layer's frozen features learns which of two copies of an image has the larger \
             {aug} strength (levels {}, {} pairs per image, RankNet loss, {} head epochs). Accuracy on pairs made \
             from test images; **chance is {:.0}%**. The columns in brackets split the pairs by which copy had \
             the larger strength (a / b).\n\n| layer |",
            factors.join(", "),
            self.options.pairs_per_image,
            self.options.head_epochs,
            100.0 * self.chance
        );
        for b in &self.backbones {
            let _ = write!(out, " {} (trained with `{}`) |", b.label, b.augment);
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(self.backbones.len()));
        out.push('\n');
        if let Some(first) = self.backbones.first() {
            for (i, l) in first.layers.iter().enumerate() {
                let _ = write!(out, "| {} ({} features) |", l.layer, l.features);
                for b in &self.backbones {
                    match b.layers.get(i) {
                        Some(r) => {
                            let _ = write!(
                                out,
                                " {:.1}% ({:.1}% / {:.1}%) |",
                                100.0 * r.accuracy,
                                100.0 * r.accuracy_a_larger,
                                100.0 * r.accuracy_b_larger
                            );
                        }
                        None => out.push_str(" - |"),
                    }
                }
                out.push('\n');
            }
        }
        for b in &self.backbones {
            let _ = writeln!(
                out,
                "\n{}: `{}` ({}), heads trained on {} pairs of held-out training images, tested on {} pairs.",
                b.label, b.checkpoint, b.arch, b.head_train_pairs, b.test_pairs
            );
        }
        out
    }
}

pub const KIND: &str = "rotvar-rank";

/// One backbone of a study: a checkpoint written by `rotvar train` on the first N training
/// images, so that the images after them are held out for the heads.
pub struct Backbone {
    pub label: String,
    pub checkpoint: std::path::PathBuf,
}

/// Where the data comes from and how much of it the study uses.
pub struct RankData {
    pub data_dir: Option<std::path::PathBuf>,
    /// At most this many held-out training images for the heads (None: all held out).
    pub head_limit: Option<usize>,
    /// The first N test images make the test pairs (None: all).
    pub test_limit: Option<usize>,
}

/// Rank every backbone and write rank.json, rank.csv, rank_accuracy.png and rank.md into `out`.
pub fn run_study(
    b: &crate::backend::BackendRef,
    backbones: &[Backbone],
    o: &RankOptions,
    d: &RankData,
    out: &std::path::Path,
    quiet: bool,
) -> Result<RankReport> {
    use crate::data::{self, Split};
    if backbones.is_empty() {
        bail!("rank: give at least one --backbone checkpoint (or --quick)");
    }
    let (lo, hi) = match o.augmentation {
        Augmentation::Rotate => (-3600.0, 3600.0),
        Augmentation::Zoom | Augmentation::Brightness => (f32::MIN_POSITIVE, 100.0),
    };
    if o.factors.len() < 2 || o.factors.iter().any(|&f| !(lo..=hi).contains(&f)) {
        bail!(
            "rank: --levels needs at least two {} strengths, each within [{lo}, {hi}]; got {:?}",
            o.augmentation.name(),
            o.factors
        );
    }
    let mut distinct = o.factors.clone();
    distinct.sort_by(f32::total_cmp);
    distinct.dedup();
    if distinct.len() != o.factors.len() {
        bail!("rank: --factors {:?} repeats a factor; a pair needs two different ones", o.factors);
    }
    let start = std::time::Instant::now();
    let mut results = Vec::new();
    for bb in backbones {
        let (model, meta) = crate::checkpoint::load(&bb.checkpoint, b)?;
        let record = crate::run::saved_record(&bb.checkpoint)
            .with_context(|| format!("rank needs to know which training images {} saw", bb.checkpoint.display()))?;
        let dir = data::resolve_data_dir(d.data_dir.as_deref());
        let train = data::load(&meta.dataset, Split::Train, &dir)?;
        let seen = record.train_images;
        if seen >= train.len() {
            bail!(
                "{} was trained on all {} training images of {}, so none are held out for the heads: train the \
                 backbone with --limit {} (80%) and rank it again",
                bb.checkpoint.display(),
                train.len(),
                meta.dataset,
                train.len() * 4 / 5
            );
        }
        let end = d.head_limit.map_or(train.len(), |n| (seen + n).min(train.len()));
        let mut test = data::load(&meta.dataset, Split::Test, &dir)?;
        if let Some(n) = d.test_limit {
            test = test.take(n);
        }
        meta.check_dataset(&test, &bb.checkpoint)?;
        let train_data = DeviceDataset::upload(&train, &meta.normalization, b)?;
        let test_data = DeviceDataset::upload(&test, &meta.normalization, b)?;
        let held_out: Vec<u32> = (seen as u32..end as u32).collect();
        let test_images: Vec<u32> = (0..test.len() as u32).collect();
        let n = o.factors.len();
        let train_pairs = draw_pairs(&held_out, n, o.pairs_per_image, &mut Rng::derive(o.seed, "rank-train-pairs"))?;
        let test_pairs = draw_pairs(&test_images, n, o.pairs_per_image, &mut Rng::derive(o.seed, "rank-test-pairs"))?;
        eprintln!(
            "{}: {} ({}), heads on {} held-out training images (after the first {seen}), {} test images",
            bb.label,
            meta.arch,
            meta.augment,
            held_out.len(),
            test.len()
        );
        let layers = rank_backbone(
            &model,
            &meta.normalization,
            &train_data,
            &train_pairs,
            &test_data,
            &test_pairs,
            o,
            &bb.label,
            quiet,
        )?;
        for l in &layers {
            eprintln!("  {:<12} ranking accuracy {:.1}%", l.layer, 100.0 * l.accuracy);
        }
        results.push(BackboneRank {
            label: bb.label.clone(),
            checkpoint: bb.checkpoint.display().to_string(),
            arch: meta.arch.clone(),
            augment: meta.augment.to_string(),
            head_train_pairs: train_pairs.len(),
            test_pairs: test_pairs.len(),
            layers,
        });
    }
    let report = RankReport {
        kind: KIND.into(),
        augmentation: o.augmentation.name().into(),
        options: o.clone(),
        chance: 0.5,
        backbones: results,
        seconds: start.elapsed().as_secs_f64(),
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::fsio::write_json(&out.join("rank.json"), &report)?;
    crate::fsio::write_atomic(&out.join("rank.csv"), report.to_csv().as_bytes())?;
    crate::fsio::write_atomic(&out.join("rank.md"), report.markdown().as_bytes())?;
    crate::figures::rank_accuracy(&out.join("rank_accuracy.png"), &report)?;
    Ok(report)
}
