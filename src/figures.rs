//! rotvar's results drawn as the figures users expect (docs/reproduce.md lists them), on top of the
//! generic `plot` module: accuracy versus angle, the class × angle heatmap, training curves,
//! V heatmap strips, per-layer mean V, and the image grids of rotations, kernels and feature maps.

use crate::angle_eval::TransformEvaluation;
use crate::inspect::{self, RotationDifference};
use crate::measure::output::Summary;
use crate::measure::LayerVariance;
use crate::models::Model;
use crate::plot::{self, GridNormalize, Heatmap, ImageGrid, LineChart, Panel, Series, Strips};
use crate::run::TrainRecord;
use crate::train::DeviceDataset;
use anyhow::Result;
use std::path::Path;

fn degrees(a: f32) -> String {
    format!("{a}°")
}

/// Accuracy (%) versus rotation angle (or the point of any set of transformations), one curve
/// per model: the rotated model solid, the unrotated dashed (`dashed` per curve), with the
/// accuracy on the randomly rotated (transformed) test set in the legend.
pub fn accuracy_vs_angle(path: &Path, title: &str, curves: &[(&str, &TransformEvaluation, bool)]) -> Result<()> {
    let series = curves
        .iter()
        .enumerate()
        .map(|(i, (name, ev, dashed))| Series {
            name: format!("{name} ({}: {:.1}%)", ev.random_name(), 100.0 * ev.random_accuracy),
            xs: ev.per_point.iter().map(|r| r.x).collect(),
            ys: ev.per_point.iter().map(|r| 100.0 * r.accuracy).collect(),
            dashed: *dashed,
            color: Some(i),
            markers: true,
        })
        .collect();
    let x_label = curves.first().map_or(String::new(), |(_, ev, _)| ev.quantity.clone());
    let ticks = curves.first().map(|(_, ev, _)| {
        let step = if ev.per_point.len() > 12 { ev.per_point.len().div_ceil(12) } else { 1 };
        ev.per_point.iter().step_by(step).map(|r| r.x).collect()
    });
    plot::line_chart(
        path,
        &LineChart {
            title: title.into(),
            x_label,
            y_label: "test accuracy (%)".into(),
            series,
            y_range: Some((0.0, 100.0)),
            x_ticks: ticks,
            svg: true,
            ..Default::default()
        },
    )
}

/// Loss versus rotation angle, like [`accuracy_vs_angle`].
pub fn loss_vs_angle(path: &Path, title: &str, curves: &[(&str, &TransformEvaluation, bool)]) -> Result<()> {
    let series = curves
        .iter()
        .enumerate()
        .map(|(i, (name, ev, dashed))| Series {
            name: name.to_string(),
            xs: ev.per_point.iter().map(|r| r.x).collect(),
            ys: ev.per_point.iter().map(|r| r.loss).collect(),
            dashed: *dashed,
            color: Some(i),
            markers: true,
        })
        .collect();
    plot::line_chart(
        path,
        &LineChart {
            title: title.into(),
            x_label: curves.first().map_or(String::new(), |(_, ev, _)| ev.quantity.clone()),
            y_label: "test loss (mean NLL, nats)".into(),
            series,
            svg: true,
            ..Default::default()
        },
    )
}

/// Accuracy (%) per class (rows) and angle, or point of the set (columns).
pub fn class_angle_heatmap(path: &Path, title: &str, ev: &TransformEvaluation) -> Result<()> {
    let classes = ev.class_names.len();
    let mut values = Vec::with_capacity(classes * ev.per_point.len());
    for c in 0..classes {
        values.extend(ev.per_point.iter().map(|r| 100.0 * r.class_accuracy[c]));
    }
    plot::heatmap(
        path,
        &Heatmap {
            title: title.into(),
            x_label: ev.quantity.clone(),
            y_label: "class".into(),
            x_labels: ev.per_point.iter().map(|r| r.label.clone()).collect(),
            y_labels: ev.class_names.clone(),
            values,
            value_label: "accuracy (%)".into(),
            range: Some((0.0, 100.0)),
            annotate: ev.per_point.len() <= 16,
            svg: true,
        },
    )
}

/// Ranking accuracy (%) per backbone layer, one curve per backbone, with chance (50%) dashed:
/// the augmentation-encoding study (`rotvar rank`).
pub fn rank_accuracy(path: &Path, report: &crate::rank::RankReport) -> Result<()> {
    let Some(first) = report.backbones.first() else {
        anyhow::bail!("no backbone to draw");
    };
    let n = first.layers.len();
    let mut series: Vec<Series> = report
        .backbones
        .iter()
        .enumerate()
        .map(|(i, b)| Series {
            name: format!("{} (trained with {})", b.label, b.augment),
            xs: (0..b.layers.len()).map(|x| x as f64).collect(),
            ys: b.layers.iter().map(|l| 100.0 * l.accuracy).collect(),
            dashed: false,
            color: Some(i),
            markers: true,
        })
        .collect();
    series.push(Series {
        name: "chance".into(),
        xs: vec![0.0, (n.max(2) - 1) as f64],
        ys: vec![100.0 * report.chance; 2],
        dashed: true,
        color: Some(report.backbones.len()),
        markers: false,
    });
    plot::line_chart(
        path,
        &LineChart {
            title: format!(
                "Which copy has the stronger {}? Ranking accuracy of a head on each layer",
                report.augmentation
            ),
            x_label: "backbone layer (frozen features)".into(),
            y_label: "ranking accuracy on test pairs (%)".into(),
            series,
            y_range: Some((0.0, 100.0)),
            categorical_x: Some(first.layers.iter().map(|l| l.layer.clone()).collect()),
            svg: true,
            ..Default::default()
        },
    )
}

/// Mean V per layer (stratified; over all samples where that is missing) against the epoch, one
/// curve per layer, from `train --measure-every`.
pub fn variance_during_training(path: &Path, title: &str, track: &[crate::run::VarianceSnapshot]) -> Result<()> {
    let Some(first) = track.first() else {
        anyhow::bail!("no measurement during training to draw");
    };
    let series = first
        .layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let points: Vec<(f64, f64)> = track
                .iter()
                .filter_map(|s| {
                    let l = s.layers.iter().find(|l| l.name == layer.name)?;
                    Some((s.epoch as f64, l.mean_v_stratified.or(l.mean_v_all)?))
                })
                .collect();
            Series {
                name: layer.name.clone(),
                xs: points.iter().map(|p| p.0).collect(),
                ys: points.iter().map(|p| p.1).collect(),
                dashed: false,
                color: Some(i),
                markers: true,
            }
        })
        .collect();
    plot::line_chart(
        path,
        &LineChart {
            title: title.into(),
            x_label: "epoch".into(),
            y_label: format!("mean V per layer (stratified; {} test images)", first.samples),
            series,
            x_ticks: Some(track.iter().map(|s| s.epoch as f64).collect()),
            svg: true,
            ..Default::default()
        },
    )
}

/// Test accuracy and training loss per epoch, one pair of curves per run (dashed = unrotated).
pub fn training_curves(dir: &Path, runs: &[(&str, &TrainRecord, bool)]) -> Result<()> {
    let mut acc = Vec::new();
    let mut loss = Vec::new();
    for (i, (name, r, dashed)) in runs.iter().enumerate() {
        let xs: Vec<f64> = r.epochs.iter().map(|m| m.epoch as f64).collect();
        let test_acc = r.epochs.iter().map(|m| m.test_accuracy.map_or(f64::NAN, |a| 100.0 * a)).collect();
        let train_acc = r.epochs.iter().map(|m| 100.0 * m.train_accuracy).collect();
        acc.push(Series {
            name: format!("{name}: test"),
            xs: xs.clone(),
            ys: test_acc,
            dashed: *dashed,
            color: Some(2 * i),
            markers: true,
        });
        acc.push(Series {
            name: format!("{name}: train"),
            xs: xs.clone(),
            ys: train_acc,
            dashed: *dashed,
            color: Some(2 * i + 1),
            markers: false,
        });
        loss.push(Series {
            name: format!("{name}: test"),
            xs: xs.clone(),
            ys: r.epochs.iter().map(|m| m.test_loss.unwrap_or(f64::NAN)).collect(),
            dashed: *dashed,
            color: Some(2 * i),
            markers: true,
        });
        loss.push(Series {
            name: format!("{name}: train"),
            xs,
            ys: r.epochs.iter().map(|m| m.train_loss).collect(),
            dashed: *dashed,
            color: Some(2 * i + 1),
            markers: false,
        });
    }
    let chart = |title: &str, y: &str, series| LineChart {
        title: title.into(),
        x_label: "epoch".into(),
        y_label: y.into(),
        series,
        svg: true,
        ..Default::default()
    };
    plot::line_chart(&dir.join("training_accuracy.png"), &chart("Training: accuracy per epoch", "accuracy (%)", acc))?;
    plot::line_chart(&dir.join("training_loss.png"), &chart("Training: loss per epoch", "loss (mean NLL, nats)", loss))
}

/// Heatmap strips of V: one panel per class, plus "all" and "stratified"; one column per
/// layer, one cell per unit; shared robust colour limit.
pub fn variance_strips(path: &Path, title: &str, layers: &[LayerVariance], class_names: &[String]) -> Result<()> {
    let panel = |name: String, pick: &dyn Fn(&LayerVariance) -> Vec<f64>| Panel {
        title: name,
        layers: layers.iter().map(|l| (l.name.clone(), pick(l))).collect(),
    };
    let mut panels =
        vec![panel("all".into(), &|l| l.all.v.clone()), panel("stratified".into(), &|l| l.stratified.clone())];
    let classes = layers.first().map_or(0, |l| l.classes.len());
    for k in 0..classes {
        let name = class_names.get(k).map_or_else(|| format!("class {k}"), |c| format!("class {c}"));
        panels.push(panel(name, &|l| l.classes[k].v.clone()));
    }
    plot::heatmap_strips(
        path,
        &Strips { title: title.into(), panels, value_label: "V = V_t / V_x".into(), ..Default::default() },
    )
}

/// Per-layer mean of finite V: rotated model solid, unrotated dashed; all samples and
/// stratified.
pub fn layer_means(path: &Path, title: &str, unrotated: &Summary, rotated: &Summary) -> Result<()> {
    let names: Vec<String> = rotated.layers.iter().map(|l| l.name.clone()).collect();
    let pick = |s: &Summary, strat: bool| -> Vec<f64> {
        s.layers.iter().map(|l| if strat { l.mean_v_stratified } else { l.mean_v_all }.unwrap_or(f64::NAN)).collect()
    };
    let series = vec![
        Series {
            name: "rotated, all".into(),
            ys: pick(rotated, false),
            color: Some(0),
            markers: true,
            ..Default::default()
        },
        Series {
            name: "unrotated, all".into(),
            ys: pick(unrotated, false),
            dashed: true,
            color: Some(0),
            markers: true,
            ..Default::default()
        },
        Series {
            name: "rotated, stratified".into(),
            ys: pick(rotated, true),
            color: Some(1),
            markers: true,
            ..Default::default()
        },
        Series {
            name: "unrotated, stratified".into(),
            ys: pick(unrotated, true),
            dashed: true,
            color: Some(1),
            markers: true,
            ..Default::default()
        },
    ];
    plot::line_chart(
        path,
        &LineChart {
            title: title.into(),
            x_label: "layer".into(),
            y_label: "mean V (finite units)".into(),
            series,
            categorical_x: Some(names),
            svg: true,
            ..Default::default()
        },
    )
}

/// Test images (rows) and their rotations (columns), as the model sees them (normalized,
/// bilinear, black fill).
pub fn rotation_grid(path: &Path, data: &DeviceDataset, images: usize, angles: &[f32]) -> Result<()> {
    let n = images.min(data.len());
    let [c, h, w] = data.item_shape;
    let mut all = Vec::with_capacity(n * angles.len() * c * h * w);
    for i in 0..n as u32 {
        let (x, _) = data.batch(&vec![i; angles.len()])?;
        all.extend(crate::ops::rotate(&x, angles, crate::backend::Interp::Bilinear, &data.fill)?.to_vec()?);
    }
    plot::image_grid(
        path,
        &ImageGrid {
            images: all,
            n: n * angles.len(),
            c,
            h,
            w,
            cols: angles.len(),
            scale: if h <= 32 { 3 } else { 1 },
            row_labels: Some((0..n).map(|i| format!("#{i} ({})", data.labels_host[i])).collect()),
            col_labels: Some(angles.iter().map(|&a| degrees(a)).collect()),
            title: Some("Test images and their rotations (counter-clockwise, bilinear, black fill)".into()),
            normalize: GridNormalize::Global,
        },
    )
}

/// The first convolution's kernels, one cell per (output, input) channel pair.
pub fn kernel_grid(path: &Path, title: &str, model: &Model) -> Result<()> {
    let (shape, w) = inspect::first_layer_kernels(model)?;
    let (o, i, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
    // RGB kernels are shown as colour images; otherwise every input channel separately.
    let (n, c) = if i == 3 { (o, 3) } else { (o * i, 1) };
    plot::image_grid(
        path,
        &ImageGrid {
            images: w,
            n,
            c,
            h: kh,
            w: kw,
            cols: if c == 3 { o.min(16) } else { (o * i).min(16) },
            scale: (48 / kh.max(1)).max(1),
            row_labels: None,
            col_labels: None,
            title: Some(title.into()),
            normalize: GridNormalize::Symmetric,
        },
    )
}

/// For one test image and its rotations (rows), the first channels (columns) of every conv
/// layer's output: one PNG per layer in `dir`, named `feature_maps_<layer>.png`. Returns the
/// files written.
pub fn feature_maps(
    dir: &Path,
    model: &Model,
    data: &DeviceDataset,
    image: u32,
    angles: &[f32],
    channels: usize,
) -> Result<Vec<String>> {
    let acts = inspect::activations(model, data, &vec![image; angles.len()], angles)?;
    let mut written = Vec::new();
    for (name, shape, values) in acts {
        // Feature maps of conv layers (and their activations); pools are smaller copies.
        if shape.len() != 4 || !name.starts_with("conv") {
            continue;
        }
        let (a, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        let keep = c.min(channels);
        let mut images = Vec::with_capacity(a * keep * h * w);
        for r in 0..a {
            images.extend_from_slice(&values[r * c * h * w..][..keep * h * w]);
        }
        let file = format!("feature_maps_{name}.png");
        plot::image_grid(
            &dir.join(&file),
            &ImageGrid {
                images,
                n: a * keep,
                c: 1,
                h,
                w,
                cols: keep,
                scale: (84 / h.max(1)).max(1),
                row_labels: Some(angles.iter().map(|&x| degrees(x)).collect()),
                col_labels: Some((0..keep).map(|k| format!("ch {k}")).collect()),
                title: Some(format!("{name}: feature maps of test image #{image} under rotation")),
                normalize: GridNormalize::Global,
            },
        )?;
        written.push(file);
    }
    Ok(written)
}

/// Per layer, mean relative |a(x) − a(rot x)| averaged over angles: rotated solid, unrotated
/// dashed.
pub fn rotation_difference(
    path: &Path,
    title: &str,
    unrotated: &RotationDifference,
    rotated: &RotationDifference,
) -> Result<()> {
    let mean = |d: &RotationDifference| -> Vec<f64> {
        d.relative.iter().map(|r| r.iter().sum::<f64>() / r.len().max(1) as f64).collect()
    };
    plot::line_chart(
        path,
        &LineChart {
            title: title.into(),
            x_label: "layer".into(),
            y_label: "mean |a(x) − a(rot x)| / mean |a(x)|".into(),
            series: vec![
                Series {
                    name: "rotated".into(),
                    ys: mean(rotated),
                    color: Some(0),
                    markers: true,
                    ..Default::default()
                },
                Series {
                    name: "unrotated".into(),
                    ys: mean(unrotated),
                    dashed: true,
                    color: Some(0),
                    markers: true,
                    ..Default::default()
                },
            ],
            categorical_x: Some(rotated.layers.clone()),
            svg: true,
            ..Default::default()
        },
    )
}
