//! The augmentation-encoding study: the RankNet loss and its gradient against a hand
//! computation, the pair sampler, the head, and heads that learn zoom from a frozen backbone.

use rotvar::autograd::Tape;
use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::BackendRef;
use rotvar::data::Normalization;
use rotvar::data::{Dataset, Split};
use rotvar::models::{InputSpec, Model};
use rotvar::nn::Forward;
use rotvar::rank::{
    brighten, default_layers, draw_pairs, head, rank_backbone, ranknet_loss, Augmentation, RankOptions,
};
use rotvar::rng::Rng;
use rotvar::tensor::Tensor;
use rotvar::train::DeviceDataset;

fn cpu() -> BackendRef {
    CpuBackend::shared()
}

fn softplus(x: f64) -> f64 {
    (1.0 + x.exp()).ln()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn ranknet_loss_and_gradient_match_a_hand_computation() {
    // Pairs (f(a), f(b)): (2, 0.5) with a larger, (−1, 1) with b larger, (0.3, 0.3) with a larger.
    let s = [2.0f32, 0.5, -1.0, 1.0, 0.3, 0.3];
    let a_larger = [true, false, true];
    let scores = Tensor::parameter(&cpu(), &[6, 1], &s).unwrap();
    let tape = Tape::start().unwrap();
    let loss = ranknet_loss(&scores, &a_larger).unwrap();
    let grads = tape.backward(&loss).unwrap();
    // loss = mean log(1 + exp(−y·(f(a) − f(b)))), y = ±1.
    let y = |i: usize| if a_larger[i] { 1.0 } else { -1.0 };
    let d = |i: usize| (s[2 * i] - s[2 * i + 1]) as f64;
    let want: f64 = (0..3).map(|i| softplus(-y(i) * d(i))).sum::<f64>() / 3.0;
    assert!((want - (softplus(-1.5) + softplus(-2.0) + 2f64.ln()) / 3.0).abs() < 1e-12);
    let got = loss.scalar().unwrap() as f64;
    assert!((got - want).abs() < 1e-6, "loss {got}, want {want}");
    // d/d f(a) = −y·σ(−y·d)/P, d/d f(b) = the negative.
    let g = grads.get(&scores).unwrap().to_vec().unwrap();
    for i in 0..3 {
        let ga = -y(i) * sigmoid(-y(i) * d(i)) / 3.0;
        assert!((g[2 * i] as f64 - ga).abs() < 1e-6, "pair {i}: d/df(a) {} vs {ga}", g[2 * i]);
        assert!((g[2 * i + 1] as f64 + ga).abs() < 1e-6, "pair {i}: d/df(b) {} vs {}", g[2 * i + 1], -ga);
    }
    // A tie costs log 2, whichever copy is the larger.
    let tie = Tensor::from_vec(&cpu(), &[2, 1], &[0.7, 0.7]).unwrap();
    for a in [true, false] {
        let l = ranknet_loss(&tie, &[a]).unwrap().scalar().unwrap() as f64;
        assert!((l - 2f64.ln()).abs() < 1e-6);
    }
    assert!(ranknet_loss(&tie, &[true, false]).is_err(), "two pairs need four scores");
}

#[test]
fn pairs_are_two_different_factors_drawn_evenly_and_reproducibly() {
    let images: Vec<u32> = (10..510).collect();
    let pairs = draw_pairs(&images, 5, 4, &mut Rng::new(3)).unwrap();
    assert_eq!(pairs.len(), 2000);
    assert!(pairs.iter().all(|p| p.a != p.b && p.a < 5 && p.b < 5));
    assert!(pairs.chunks(4).zip(&images).all(|(c, &i)| c.iter().all(|p| p.image == i)));
    // Each of the 20 ordered pairs of distinct factors about 100 times.
    let mut count = [[0usize; 5]; 5];
    pairs.iter().for_each(|p| count[p.a][p.b] += 1);
    for (a, row) in count.iter().enumerate() {
        for (b, &c) in row.iter().enumerate() {
            if a != b {
                assert!((60..=140).contains(&c), "({a}, {b}) drawn {c} times of 2000");
            }
        }
    }
    assert_eq!(pairs, draw_pairs(&images, 5, 4, &mut Rng::new(3)).unwrap());
    assert!(draw_pairs(&images, 1, 4, &mut Rng::new(3)).is_err());
}

#[test]
fn the_head_scores_each_copy_and_the_default_layers_are_block_outputs() {
    let b = cpu();
    let h = head(&b, 12, 16, &mut Rng::new(1)).unwrap();
    let x = Tensor::from_vec(&b, &[6, 12], &(0..72).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>()).unwrap();
    assert_eq!(h.forward(&x, &mut Forward::eval()).unwrap().shape(), &[6, 1]);
    // dropout 0.2 → fc1 (12·16 + 16) → ReLU → dropout 0.2 → fc2 (16 + 1).
    let params: usize = h.parameters().iter().map(|p| p.tensor.numel()).sum();
    assert_eq!(params, 12 * 16 + 16 + 16 + 1);
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let convbn = Model::build("convbn", spec, &b, 0).unwrap();
    assert_eq!(default_layers(&convbn), ["pool1", "pool2", "pool3", "fc1.act"]);
}

/// Blobs of one size per class at varying places: zooming changes their apparent size.
fn blobs(n: usize, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let labels: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
    let mut images = vec![0u8; n * 784];
    for (i, &l) in labels.iter().enumerate() {
        let (cy, cx) = (11.0 + 6.0 * rng.next_f32() as f64, 11.0 + 6.0 * rng.next_f32() as f64);
        let r2 = if l == 0 { 20.0 } else { 40.0 };
        for y in 0..28 {
            for x in 0..28 {
                let d2 = (y as f64 - cy).powi(2) + (x as f64 - cx).powi(2);
                images[i * 784 + y * 28 + x] = if d2 < r2 { 230 } else { 10 };
            }
        }
    }
    Dataset {
        name: "blobs".into(),
        split: Split::Test,
        images,
        labels,
        n,
        channels: 1,
        height: 28,
        width: 28,
        class_names: vec!["small".into(), "large".into()],
    }
}

#[test]
fn heads_learn_which_copy_is_zoomed_more_from_a_frozen_backbone() {
    let b = cpu();
    let (train, test) = (blobs(96, 1), blobs(48, 2));
    let norm = train.channel_stats();
    let (train_data, test_data) =
        (DeviceDataset::upload(&train, &norm, &b).unwrap(), DeviceDataset::upload(&test, &norm, &b).unwrap());
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 2 };
    let model = Model::build("lenet", spec, &b, 4).unwrap();
    let before: Vec<Vec<f32>> = model.parameters().iter().map(|p| p.tensor.to_vec().unwrap()).collect();
    let o = RankOptions {
        factors: vec![0.5, 0.7, 0.9],
        pairs_per_image: 2,
        layers: Some(vec!["pool1".into(), "fc1.act".into()]),
        head_epochs: 4,
        batch: 32,
        hidden: 64,
        ..RankOptions::default()
    };
    let train_pairs = draw_pairs(&(0..96).collect::<Vec<_>>(), 3, 2, &mut Rng::new(5)).unwrap();
    let test_pairs = draw_pairs(&(0..48).collect::<Vec<_>>(), 3, 2, &mut Rng::new(6)).unwrap();
    let layers =
        rank_backbone(&model, &norm, &train_data, &train_pairs, &test_data, &test_pairs, &o, "test", true).unwrap();
    assert_eq!(layers.iter().map(|l| l.layer.as_str()).collect::<Vec<_>>(), ["pool1", "fc1.act"]);
    assert_eq!(layers[0].features, 6 * 14 * 14);
    for l in &layers {
        assert!(l.accuracy > 0.75, "{}: ranking accuracy {} is not far above chance", l.layer, l.accuracy);
        assert!(l.test_loss < 2f64.ln(), "{}: test loss {} not below log 2", l.layer, l.test_loss);
        let n_a = test_pairs.iter().filter(|p| o.factors[p.a] > o.factors[p.b]).count() as f64;
        let n = test_pairs.len() as f64;
        let mixed = (l.accuracy_a_larger * n_a + l.accuracy_b_larger * (n - n_a)) / n;
        assert!((mixed - l.accuracy).abs() < 1e-12, "the split accuracies average to the whole");
    }
    // The backbone is frozen: not one weight moved.
    let after: Vec<Vec<f32>> = model.parameters().iter().map(|p| p.tensor.to_vec().unwrap()).collect();
    assert_eq!(before, after);
    let o = RankOptions { layers: Some(vec!["conv9".into()]), ..o };
    let e =
        rank_backbone(&model, &norm, &train_data, &train_pairs, &test_data, &test_pairs, &o, "t", true).unwrap_err();
    assert!(format!("{e:#}").contains("no layer 'conv9'"), "{e:#}");
}

#[test]
fn rotation_and_brightness_are_ranked_too() {
    let b = cpu();
    let (train, test) = (blobs(64, 3), blobs(32, 4));
    let norm = train.channel_stats();
    let (train_data, test_data) =
        (DeviceDataset::upload(&train, &norm, &b).unwrap(), DeviceDataset::upload(&test, &norm, &b).unwrap());
    let model = Model::build("lenet", InputSpec { channels: 1, height: 28, width: 28, classes: 2 }, &b, 4).unwrap();
    let train_pairs = draw_pairs(&(0..64).collect::<Vec<_>>(), 3, 2, &mut Rng::new(5)).unwrap();
    let test_pairs = draw_pairs(&(0..32).collect::<Vec<_>>(), 3, 2, &mut Rng::new(6)).unwrap();
    // Brightness is detectable from any layer; a blob is round, so rotating it changes little
    // besides its corners, and the test only asks that rotation runs and stays a probability.
    for (aug, levels, floor) in
        [(Augmentation::Brightness, vec![0.5, 1.0, 1.5], 0.75), (Augmentation::Rotate, vec![0.0, 30.0, 60.0], 0.0)]
    {
        let o = RankOptions {
            augmentation: aug,
            factors: levels,
            pairs_per_image: 2,
            layers: Some(vec!["pool1".into()]),
            head_epochs: 3,
            batch: 32,
            hidden: 32,
            ..RankOptions::default()
        };
        let l =
            rank_backbone(&model, &norm, &train_data, &train_pairs, &test_data, &test_pairs, &o, "t", true).unwrap();
        assert!((floor..=1.0).contains(&l[0].accuracy), "{aug:?}: {}", l[0].accuracy);
    }
}

#[test]
fn brightness_scales_raw_pixels_and_clips_them() {
    let b = cpu();
    // Raw values 0, 51, 204, 255 in one 2×2 image, normalized with mean 0.2, std 0.5.
    let norm = Normalization { mean: vec![0.2], std: vec![0.5] };
    let raw = [0.0f32, 0.2, 0.8, 1.0];
    let x: Vec<f32> = raw.iter().map(|r| (r - 0.2) / 0.5).collect();
    let x = Tensor::from_vec(&b, &[2, 1, 1, 2], &x).unwrap();
    let y = brighten(&x, &[1.5, 0.5], &norm).unwrap().to_vec().unwrap();
    let want_raw = [0.0f32, 0.3, 0.4, 0.5]; // image 0 ×1.5, image 1 ×0.5 (1.2 clipped would not arise)
    for (i, (&g, &w)) in y.iter().zip(&want_raw).enumerate() {
        assert!((g * 0.5 + 0.2 - w).abs() < 1e-6, "pixel {i}: raw {} vs {w}", g * 0.5 + 0.2);
    }
    let y = brighten(&x, &[2.0, 1.0], &norm).unwrap().to_vec().unwrap();
    assert!((y[1] * 0.5 + 0.2 - 0.4).abs() < 1e-6);
    assert!((y[3] * 0.5 + 0.2 - 1.0).abs() < 1e-6, "255 stays 255 at factor 1");
    let y = brighten(&Tensor::from_vec(&b, &[1, 1, 1, 2], &[(0.8 - 0.2) / 0.5, 0.0]).unwrap(), &[2.0], &norm).unwrap();
    assert!((y.to_vec().unwrap()[0] * 0.5 + 0.2 - 1.0).abs() < 1e-6, "0.8 × 2 clips to 1");
    assert!(brighten(&x, &[1.0], &norm).is_err(), "one factor per image");
}
