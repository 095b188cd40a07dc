//! Accuracy versus angle: the angle specs, and every figure of `evaluate_angles` against a
//! direct computation (one rotation and one forward pass per image and angle).

use rotvar::angle_eval::{evaluate, evaluate_angles, parse_angles};
use rotvar::backend::cpu::CpuBackend;
use rotvar::backend::{BackendRef, Interp};
use rotvar::data::{Dataset, Split};
use rotvar::models::{InputSpec, Model};
use rotvar::nn::Forward;
use rotvar::ops;
use rotvar::train::DeviceDataset;
use rotvar::transform::TransformSet;

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
        assert_eq!(ev.per_point.len(), angles.len());
        for (a, r) in ev.per_point.iter().enumerate() {
            let acc = correct[a].iter().filter(|&&c| c).count() as f64 / n as f64;
            assert_eq!((r.transform.rotate, r.x), (angles[a], angles[a] as f64));
            assert!((r.accuracy - acc).abs() < 1e-12, "batch {batch} angle {}: {} vs {acc}", r.label, r.accuracy);
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
        assert_eq!(ev.original_accuracy, ev.per_point[0].accuracy);
        assert!((0.0..=1.0).contains(&ev.random_accuracy));
        // The random angles come from the seed, not from the batching.
        if let Some((acc, l)) = previous {
            assert_eq!(acc, ev.random_accuracy, "batch {batch}");
            assert!((l - ev.random_loss).abs() < 1e-5, "batch {batch}");
        }
        previous = Some((ev.random_accuracy, ev.random_loss));
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

#[test]
fn a_grid_of_zoom_and_flips_matches_a_direct_computation() {
    let be: BackendRef = CpuBackend::shared();
    let ds = synthetic(17, 6);
    let norm = ds.channel_stats();
    let data = DeviceDataset::upload(&ds, &norm, &be).unwrap();
    let input = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let model = Model::build("lenet", input, &be, 5).unwrap();
    // No identity in the set: zoom 1 is absent, so the original accuracy is an extra column.
    let set = TransformSet::parse(&["zoom=0.5,0.8,1.6".into(), "hflip".into()]).unwrap();
    assert_eq!(set.len(), 6);
    assert!(set.points.iter().all(|t| !t.is_identity()));
    let n = ds.len();
    let direct = |m: rotvar::backend::Affine| -> Vec<(bool, f64)> {
        (0..n)
            .map(|i| {
                let (x, _) = data.batch(&[i as u32]).unwrap();
                let x = ops::warp(&x, &[m], Interp::Bilinear, &norm.black()).unwrap();
                let logp = model.forward(&x, &mut Forward::eval()).unwrap().to_vec().unwrap();
                let label = ds.labels[i] as usize;
                let pred = (0..10).fold(0, |b, j| if logp[j] > logp[b] { j } else { b });
                (pred == label, -logp[label] as f64)
            })
            .collect()
    };
    let per_point: Vec<Vec<(bool, f64)>> = set.points.iter().map(|t| direct(t.matrix())).collect();
    let original = direct(rotvar::backend::IDENTITY);
    let acc = |v: &[(bool, f64)]| v.iter().filter(|c| c.0).count() as f64 / n as f64;
    for batch in [3, 1000] {
        let ev = evaluate(&model, &data, &set, batch, 2, &ds.class_names, true).unwrap();
        assert!(!ev.rotations());
        assert_eq!(ev.per_point.len(), 6);
        for (p, r) in ev.per_point.iter().enumerate() {
            assert_eq!(r.transform, set.points[p]);
            assert_eq!(r.x, p as f64, "two axes: points are plotted at their index");
            assert!(
                (r.accuracy - acc(&per_point[p])).abs() < 1e-12,
                "{}: {} vs {}",
                r.label,
                r.accuracy,
                acc(&per_point[p])
            );
            let loss = per_point[p].iter().map(|c| c.1).sum::<f64>() / n as f64;
            assert!((r.loss - loss).abs() < 1e-5 * (1.0 + loss), "{}: loss {} vs {loss}", r.label, r.loss);
        }
        assert!((ev.original_accuracy - acc(&original)).abs() < 1e-12);
        let group = (0..n).map(|i| per_point.iter().filter(|v| v[i].0).count() as f64).sum::<f64>() / (n * 6) as f64;
        assert!((ev.group_accuracy - group).abs() < 1e-12);
        // Each image of the random copy gets one point of the grid, so its accuracy lies between
        // the worst and best per-image outcomes over the grid.
        let lo = (0..n).filter(|&i| per_point.iter().all(|v| v[i].0)).count() as f64 / n as f64;
        let hi = (0..n).filter(|&i| per_point.iter().any(|v| v[i].0)).count() as f64 / n as f64;
        assert!((lo..=hi).contains(&ev.random_accuracy), "{lo} <= {} <= {hi}", ev.random_accuracy);
        let csv = ev.to_csv();
        assert!(
            csv.starts_with("transform,rotate_deg,zoom,translate_x,translate_y,hflip,vflip,loss,accuracy,acc_0,"),
            "{csv}"
        );
        assert_eq!(csv.lines().count(), 7);
        assert!(ev.table().contains("randomly transformed"), "{}", ev.table());
    }
}

#[test]
fn transform_specs_parse_into_grids() {
    let one = |s: &str| TransformSet::parse(&[s.to_string()]);
    let zoom = one("zoom=0.5:1.5:11").unwrap();
    assert_eq!(zoom.len(), 11);
    assert_eq!(zoom.points[0].zoom, 0.5);
    assert_eq!(zoom.points[10].zoom, 1.5);
    assert_eq!(zoom.points[5].zoom, 1.0, "the middle of 0.5:1.5:11 is exactly 1");
    assert!(zoom.points[5].is_identity());
    let shift = one("translate=-4:4:9").unwrap();
    assert_eq!(shift.xs(), (-4..=4).map(|v| v as f64).collect::<Vec<_>>());
    assert_eq!(one("translate-y=1,2").unwrap().points[1].translate, [0.0, 2.0]);
    assert_eq!(one("rotate=0:360:90").unwrap().xs(), vec![0.0, 90.0, 180.0, 270.0]);
    let flip = one("hflip").unwrap();
    assert_eq!((flip.points[0].hflip, flip.points[1].hflip), (false, true));
    // Axes combine: the first varies slowest.
    let grid = TransformSet::parse(&["zoom=0.5,2".into(), "vflip".into(), "rotate=0,90".into()]).unwrap();
    assert_eq!(grid.len(), 8);
    assert_eq!((grid.points[3].zoom, grid.points[3].vflip, grid.points[3].rotate), (0.5, true, 90.0));
    assert_eq!((grid.points[4].zoom, grid.points[4].vflip, grid.points[4].rotate), (2.0, false, 0.0));
    // The set survives JSON (shards and configs store it).
    let back: TransformSet = serde_json::from_str(&serde_json::to_string(&grid).unwrap()).unwrap();
    assert_eq!(back, grid);
    for bad in [
        "zoom",
        "zoom=0",
        "zoom=2:1:3",
        "zoom=0.5:1.5:0",
        "zoom=0.5:1.5:1",
        "zoom=-1,1",
        "zoom=1:2:x",
        "translate=1000,0",
        "hflip=1",
        "shear=0.1",
        "rotate=0:360:0",
        "translate=0:1:5000",
    ] {
        let e = one(bad).unwrap_err();
        assert!(format!("{e:#}").contains("--transform"), "{bad}: {e:#}");
    }
    let e = TransformSet::parse(&["zoom=0.5:1.5:100".into(), "rotate=0:360:5".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("at most"), "{e:#}");
    assert!(serde_json::from_str::<TransformSet>(r#"[{"zoom":[0.0]}]"#).is_err(), "a zero zoom read from a file");
}
