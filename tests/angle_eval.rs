//! Accuracy versus angle: the angle specs, and every figure of `evaluate_angles` against a
//! direct computation (one rotation and one forward pass per image and angle).

use rotvar::angle_eval::{evaluate_angles, parse_angles};
use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::{BackendRef, Interp};
use rotvar::data::{Dataset, Split};
use rotvar::models::{InputSpec, Model};
use rotvar::nn::Forward;
use rotvar::ops;
use rotvar::train::DeviceDataset;

mod common;
use common::Rng;

#[test]
fn angle_specs() {
    assert_eq!(parse_angles("0,90,180,270").unwrap(), vec![0.0, 90.0, 180.0, 270.0]);
    assert_eq!(parse_angles("0:360:45").unwrap(), vec![0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0]);
    assert_eq!(parse_angles("0:360:10").unwrap().len(), 36);
    assert_eq!(parse_angles("-180:180:22.5").unwrap().len(), 16);
    let four = parse_angles("4").unwrap();
    assert_eq!(four, vec![0.0, 90.0, 180.0, 270.0]);
    assert_eq!(parse_angles("16").unwrap()[1], 22.5);
    assert_eq!(parse_angles("0,90,180,270,360").unwrap().len(), 5);
    for bad in ["", "0", "abc", "0:360", "0:360:0", "0:360:-5", "10:0:5", "1,x", "1:2:3:4", "nan,1"] {
        let e = parse_angles(bad).unwrap_err();
        assert!(format!("{e:#}").contains("--angles"), "{bad}: {e:#}");
    }
}

fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = Rng(seed);
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    // Blobs whose position depends on the label, so a briefly trained model is far from chance
    // and rotation changes its answers.
    let mut images = vec![0u8; n * 28 * 28];
    for (i, &l) in labels.iter().enumerate() {
        let (cy, cx) = (6 + (l as usize % 4) * 5, 6 + (l as usize / 4) * 7);
        for y in 0..28 {
            for x in 0..28 {
                let d2 = (y as f64 - cy as f64).powi(2) + (x as f64 - cx as f64).powi(2);
                let v = 255.0 * (-d2 / 8.0).exp() + 30.0 * rng.unit();
                images[i * 784 + y * 28 + x] = v.min(255.0) as u8;
            }
        }
    }
    Dataset {
        name: "synthetic".into(),
        split: Split::Test,
        images,
        labels,
        n,
        channels: 1,
        height: 28,
        width: 28,
        class_names: (0..10).map(|c| c.to_string()).collect(),
    }
}

#[test]
fn every_figure_matches_a_direct_computation_for_any_batch_size() {
    let be: BackendRef = CpuBackend::shared();
    let ds = synthetic(23, 4);
    let norm = ds.channel_stats();
    let data = DeviceDataset::upload(&ds, &norm, &be).unwrap();
    let input = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let model = Model::build("lenet", input, &be, 3).unwrap();
    // 30° is not a multiple of 90: bilinear sampling and the fill matter.
    let angles = parse_angles("0,30,90,200").unwrap();
    // Direct: one image, one angle at a time through ops::rotate.
    let n = ds.len();
    let mut correct = vec![vec![false; n]; angles.len()];
    let mut loss = vec![0.0f64; angles.len()];
    for (a, &angle) in angles.iter().enumerate() {
        for i in 0..n {
            let (x, _) = data.batch(&[i as u32]).unwrap();
            let x = ops::rotate(&x, &[angle], Interp::Bilinear, &norm.black()).unwrap();
            let logp = model.forward(&x, &mut Forward::eval()).unwrap().to_vec().unwrap();
            let label = ds.labels[i] as usize;
            let pred = (0..10).fold(0, |b, j| if logp[j] > logp[b] { j } else { b });
            correct[a][i] = pred == label;
            loss[a] -= logp[label] as f64;
        }
    }
    let mut previous: Option<(f64, f64)> = None;
    for batch in [1, 5, 1000] {
        let ev = evaluate_angles(&model, &data, &angles, batch, 9, &ds.class_names, true).unwrap();
        assert_eq!(ev.per_angle.len(), angles.len());
        for (a, r) in ev.per_angle.iter().enumerate() {
            let acc = correct[a].iter().filter(|&&c| c).count() as f64 / n as f64;
            assert_eq!(r.angle, angles[a]);
            assert!((r.accuracy - acc).abs() < 1e-12, "batch {batch} angle {}: {} vs {acc}", r.angle, r.accuracy);
            assert!((r.loss - loss[a] / n as f64).abs() < 1e-5 * (1.0 + r.loss), "batch {batch}: loss {}", r.loss);
            for c in 0..10 {
                let members: Vec<usize> = (0..n).filter(|&i| ds.labels[i] as usize == c).collect();
                let want = members.iter().filter(|&&i| correct[a][i]).count() as f64 / members.len() as f64;
                assert!((r.class_accuracy[c] - want).abs() < 1e-12, "class {c}");
            }
        }
        let group = (0..n).map(|i| (0..angles.len()).filter(|&a| correct[a][i]).count() as f64).sum::<f64>()
            / (n * angles.len()) as f64;
        assert!((ev.group_accuracy - group).abs() < 1e-12, "group accuracy {} vs {group}", ev.group_accuracy);
        assert_eq!(ev.original_accuracy, ev.per_angle[0].accuracy);
        assert!((0.0..=1.0).contains(&ev.random_rotation_accuracy));
        // The random angles come from the seed, not from the batching.
        if let Some((acc, l)) = previous {
            assert_eq!(acc, ev.random_rotation_accuracy, "batch {batch}");
            assert!((l - ev.random_rotation_loss).abs() < 1e-5, "batch {batch}");
        }
        previous = Some((ev.random_rotation_accuracy, ev.random_rotation_loss));
        let csv = ev.to_csv();
        assert_eq!(csv.lines().count(), 1 + angles.len());
        assert!(csv.starts_with("angle_deg,loss,accuracy,acc_0,"), "{csv}");
    }
    // 0° left out of the set: the original accuracy is still reported, group accuracy is over
    // the requested angles only.
    let ev = evaluate_angles(&model, &data, &angles[1..], 7, 9, &ds.class_names, true).unwrap();
    let acc0 = correct[0].iter().filter(|&&c| c).count() as f64 / n as f64;
    assert!((ev.original_accuracy - acc0).abs() < 1e-12);
    let group = (0..n).map(|i| (1..angles.len()).filter(|&a| correct[a][i]).count() as f64).sum::<f64>()
        / (n * (angles.len() - 1)) as f64;
    assert!((ev.group_accuracy - group).abs() < 1e-12);
}
