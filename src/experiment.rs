//! `rotvar experiment`: the whole study in one command. Train the unrotated/rotated pair (or
//! reuse a run directory), evaluate both versus angle, measure V for both, draw every figure,
//! and write `report.md` with the key numbers beside the figures.

use crate::angle_eval::{self, TransformEvaluation};
use crate::backend::{BackendRef, MapReduce};
use crate::checkpoint;
use crate::figures;
use crate::fsio::{write_atomic, write_json};
use crate::inspect;
use crate::limits;
use crate::measure::job::{self, MeasureOptions, Measured};
use crate::measure::output;
use crate::measure::Per;
use crate::optim::{OptimConfig, OptimizerKind};
use crate::run::{self, DataSource, PairManifest, PairOptions, TrainRecord};
use crate::transform::TransformSet;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    pub model: String,
    pub data: DataSource,
    pub out: PathBuf,
    /// Epochs of the unrotated and rotated model (None: the reference protocol's).
    pub epochs: (Option<usize>, Option<usize>),
    pub lr: Option<f32>,
    pub batch_size: usize,
    pub seed: u64,
    /// `--angles` spec of the accuracy-versus-angle evaluation.
    pub angles: String,
    pub rotations: usize,
    pub per: Per,
    pub reduce: MapReduce,
    /// Test images the variance measure runs over (None: all).
    pub measure_limit: Option<usize>,
    /// Measure V every N epochs while training, too (`--measure-every`).
    pub measure_every: Option<usize>,
    /// Also evaluate both models over this set of transformations (`--transform`): its own
    /// figure and report section.
    pub transforms: Option<TransformSet>,
    /// Retrain models already in `out` instead of reusing or continuing them.
    pub overwrite: bool,
    pub quiet: bool,
}

impl ExperimentOptions {
    /// `--quick`: LeNet on the bundled sample, short schedules, a measure over 500 test images;
    /// about a minute on a laptop CPU.
    pub fn quick(out: PathBuf) -> ExperimentOptions {
        ExperimentOptions {
            model: "lenet".into(),
            data: DataSource { dataset: "mnist-sample".into(), data_dir: None, train_limit: None, test_limit: None },
            out,
            epochs: (Some(3), Some(6)),
            lr: None,
            batch_size: 256,
            seed: 0,
            angles: "0:360:15".into(),
            rotations: 16,
            per: Per::Map,
            reduce: MapReduce::Mean,
            measure_limit: Some(500),
            measure_every: None,
            transforms: None,
            overwrite: false,
            quiet: false,
        }
    }
}

struct Member {
    label: &'static str,
    record: TrainRecord,
    angles: TransformEvaluation,
    transformed: Option<TransformEvaluation>,
    measured: Measured,
    difference: inspect::RotationDifference,
}

fn read_record(dir: &Path) -> Result<TrainRecord> {
    let path = dir.join("metrics.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a rotvar metrics file", path.display()))
}

pub fn run(b: &BackendRef, o: &ExperimentOptions) -> Result<PathBuf> {
    let start = Instant::now();
    let out = &o.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // Every argument is checked before the first epoch: a typo must not cost a training run.
    let angles = angle_eval::parse_angles(&o.angles)?;
    limits::ROTATIONS.check_usize(o.rotations)?;
    if let Some(n) = o.measure_limit {
        limits::MEASURE_LIMIT.check_usize(n)?;
    }
    // Models already in `out` are reused when finished and continued when not, provided they
    // were trained with this configuration (train_pair checks every field and names the first
    // that differs).
    let opts = PairOptions {
        model: o.model.clone(),
        data: o.data.clone(),
        epochs: o.epochs,
        lr: o.lr,
        batch_size: o.batch_size,
        optim: OptimConfig::new(OptimizerKind::Adam, 1e-3, 0.0),
        seed: o.seed,
        overwrite: o.overwrite,
        quiet: o.quiet,
    };
    let mut measure_opts = MeasureOptions {
        rotations: o.rotations,
        transforms: None,
        per: o.per,
        reduce: o.reduce,
        batch: 256,
        dataset: None,
        data_dir: o.data.data_dir.clone(),
        limit: o.measure_limit.or(o.data.test_limit),
        quiet: o.quiet,
    };
    // V during training uses the final measure's settings and images, so its last point is
    // the final measure.
    let mut probe = o.measure_every.map(|every| job::epoch_probe(every, &measure_opts)).transpose()?;
    let manifest: PairManifest = run::train_pair(b, &opts, out, probe.as_mut())?;
    measure_opts.dataset = Some(manifest.dataset.clone());
    let figs = out.join("figures");
    std::fs::create_dir_all(&figs).with_context(|| format!("cannot create {}", figs.display()))?;
    let mut members = Vec::new();
    for (label, m) in [("unrotated", &manifest.unrotated), ("rotated", &manifest.rotated)] {
        let dir = out.join(&m.dir);
        let ckpt = out.join(&m.checkpoint);
        let (model, meta) = checkpoint::load(&ckpt, b)?;
        let test = job::checkpoint_test_data(
            &meta,
            &ckpt,
            Some(&manifest.dataset),
            o.data.data_dir.as_deref(),
            o.data.test_limit,
            b,
        )?;
        eprintln!("{label}: accuracy versus angle ({} angles, {} test images)", angles.len(), test.len());
        let ev = angle_eval::evaluate_angles(&model, &test, &angles, 4096, o.seed, &meta.class_names, o.quiet)?;
        write_json(&dir.join("angles.json"), &ev)?;
        write_atomic(&dir.join("angles.csv"), ev.to_csv().as_bytes())?;
        figures::class_angle_heatmap(
            &figs.join(format!("class_angle_{label}.png")),
            &format!("{} {label}: accuracy per class and angle", manifest.model),
            &ev,
        )?;
        figures::kernel_grid(
            &figs.join(format!("kernels_{label}.png")),
            &format!("{} {label}: first-layer kernels", manifest.model),
            &model,
        )?;
        if label == "rotated" {
            // The test images under rotation: the same for both models (same data, same fill).
            let grid_angles: Vec<f32> = (0..8).map(|i| i as f32 * 45.0).collect();
            figures::rotation_grid(&figs.join("rotations.png"), &test, 6, &grid_angles)?;
        }
        let fm_dir = figs.join(format!("feature_maps_{label}"));
        std::fs::create_dir_all(&fm_dir)?;
        let fm_angles: Vec<f32> = (0..8).map(|i| i as f32 * 45.0).collect();
        figures::feature_maps(&fm_dir, &model, &test, 0, &fm_angles, 8)?;
        let difference = inspect::rotation_difference(&model, &test, 100, &angle_eval::parse_angles("0:360:45")?[1..])?;
        eprintln!("{label}: measuring V ({} rotations)", o.rotations);
        let measured = job::measure_checkpoint(b, &ckpt, &measure_opts, &dir)?;
        figures::variance_strips(
            &figs.join(format!("variance_strips_{label}.png")),
            &format!("{} {label}: V per unit (columns: layers; panels: classes, all, stratified)", manifest.model),
            &measured.layers,
            &meta.class_names,
        )?;
        let record = read_record(&out.join(&m.dir))?;
        if !record.variance.is_empty() {
            figures::variance_during_training(
                &figs.join(format!("variance_during_training_{label}.png")),
                &format!("{} {label}: V per layer during training", manifest.model),
                &record.variance,
            )?;
        }
        let transformed = match &o.transforms {
            Some(set) => {
                eprintln!("{label}: accuracy under {} ({} transformations)", set.spec(), set.len());
                let ev = angle_eval::evaluate(&model, &test, set, 4096, o.seed, &meta.class_names, o.quiet)?;
                write_json(&dir.join("transform.json"), &ev)?;
                write_atomic(&dir.join("transform.csv"), ev.to_csv().as_bytes())?;
                Some(ev)
            }
            None => None,
        };
        members.push(Member { label, record, angles: ev, transformed, measured, difference });
    }
    let (u, r) = (&members[0], &members[1]);
    let name = &manifest.model;
    figures::accuracy_vs_angle(
        &figs.join("accuracy_vs_angle.png"),
        &format!("{name} on {}: accuracy versus rotation", manifest.dataset),
        &[("rotated", &r.angles, false), ("unrotated", &u.angles, true)],
    )?;
    figures::loss_vs_angle(
        &figs.join("loss_vs_angle.png"),
        &format!("{name} on {}: loss versus rotation", manifest.dataset),
        &[("rotated", &r.angles, false), ("unrotated", &u.angles, true)],
    )?;
    if let (Some(ut), Some(rt)) = (&u.transformed, &r.transformed) {
        figures::accuracy_vs_angle(
            &figs.join("accuracy_vs_transform.png"),
            &format!("{name} on {}: accuracy under {}", manifest.dataset, rt.transforms),
            &[("rotated", rt, false), ("unrotated", ut, true)],
        )?;
    }
    figures::training_curves(&figs, &[("rotated", &r.record, false), ("unrotated", &u.record, true)])?;
    figures::layer_means(
        &figs.join("layer_means.png"),
        &format!("{name}: mean V per layer (lower = more invariant)"),
        &u.measured.summary,
        &r.measured.summary,
    )?;
    figures::rotation_difference(
        &figs.join("rotation_difference.png"),
        &format!("{name}: how much activations move under rotation"),
        &u.difference,
        &r.difference,
    )?;
    let report = report(&manifest, &members, o, start.elapsed().as_secs_f64());
    let path = out.join("report.md");
    write_atomic(&path, report.as_bytes())?;
    Ok(path)
}

fn pct(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

fn report(manifest: &PairManifest, members: &[Member], o: &ExperimentOptions, seconds: f64) -> String {
    let (u, r) = (&members[0], &members[1]);
    let mut s = String::new();
    let _ = writeln!(s, "# {} on {}: how invariant to rotation, and where?\n", manifest.model, manifest.dataset);
    let _ = writeln!(
        s,
        "rotvar {} (commit {}), device: {}, seed {}. Generated in {:.0}s.\n",
        manifest.rotvar_version, manifest.git_commit, manifest.device, manifest.seed, seconds
    );
    let _ = writeln!(s, "## Training\n");
    let _ = writeln!(s, "| model | augmentation | epochs | final test accuracy | training time |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (m, member) in [(&manifest.unrotated, u), (&manifest.rotated, r)] {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0}s |",
            member.label,
            m.config.augment,
            m.epochs_trained,
            m.final_test_accuracy.map_or("-".into(), pct),
            m.train_seconds
        );
    }
    let _ = writeln!(
        s,
        "\n![training accuracy](figures/training_accuracy.png)\n![training loss](figures/training_loss.png)\n"
    );
    let _ = writeln!(s, "## Accuracy versus rotation\n");
    let _ = writeln!(s, "| model | original | group accuracy | randomly rotated | worst angle |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for m in [u, r] {
        let worst = m.angles.per_point.iter().min_by(|a, b| a.accuracy.total_cmp(&b.accuracy));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            m.label,
            pct(m.angles.original_accuracy),
            pct(m.angles.group_accuracy),
            pct(m.angles.random_accuracy),
            worst.map_or("-".into(), |w| format!("{} at {}", pct(w.accuracy), w.label))
        );
    }
    let _ = writeln!(
        s,
        "\nAngles: `{}`, bilinear, black fill, counter-clockwise; group accuracy = mean over images of the fraction \
         of their rotated copies classified correctly. Per-angle numbers: `unrotated/angles.csv`, `rotated/angles.csv`.\n",
        o.angles
    );
    let _ = writeln!(s, "![accuracy versus angle](figures/accuracy_vs_angle.png)\n");
    let _ = writeln!(s, "![loss versus angle](figures/loss_vs_angle.png)\n");
    let _ = writeln!(s, "![class x angle, unrotated](figures/class_angle_unrotated.png)\n![class x angle, rotated](figures/class_angle_rotated.png)\n");
    if let (Some(ut), Some(rt)) = (&u.transformed, &r.transformed) {
        let _ = writeln!(s, "## Accuracy under `{}`\n", rt.transforms);
        let _ = writeln!(s, "| model | original | group accuracy | {} | worst point |", rt.random_name());
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (m, ev) in [(u, ut), (r, rt)] {
            let worst = ev.per_point.iter().min_by(|a, b| a.accuracy.total_cmp(&b.accuracy));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                m.label,
                pct(ev.original_accuracy),
                pct(ev.group_accuracy),
                pct(ev.random_accuracy),
                worst.map_or("-".into(), |w| format!("{} at {}", pct(w.accuracy), w.label))
            );
        }
        let _ = writeln!(
            s,
            "\nThe grid's points, bilinear, black fill (docs/transformations.md). Per point: `unrotated/transform.csv`, \
             `rotated/transform.csv`.\n\n![accuracy under the transformations](figures/accuracy_vs_transform.png)\n"
        );
    }
    let _ = writeln!(s, "## The variance measure V = V_t / V_x\n");
    let sm = &r.measured.summary;
    let _ = writeln!(
        s,
        "{} test images x {} rotations (evenly spaced from -180°), units per {} ({}). V is a ratio of standard \
         deviations (the published measure's convention); V < 1: the unit varies less under rotation than across \
         images. Arrays per unit: `*/variance.safetensors`; summaries: `*/variance.json`.\n",
        sm.samples,
        sm.rotations,
        format!("{:?}", o.per).to_lowercase(),
        o.reduce
    );
    let _ = writeln!(s, "```\n{}```\n", output::pair_table(&u.measured.summary, &r.measured.summary));
    let _ = writeln!(s, "![mean V per layer](figures/layer_means.png)\n");
    let _ = writeln!(s, "![V strips, unrotated](figures/variance_strips_unrotated.png)\n![V strips, rotated](figures/variance_strips_rotated.png)\n");
    if !u.record.variance.is_empty() && !r.record.variance.is_empty() {
        let _ = writeln!(
            s,
            "V per layer during training (`--measure-every`, same images and settings; numbers in \
             `*/metrics.json`):\n\n![V during training, unrotated](figures/variance_during_training_unrotated.png)\n\
             ![V during training, rotated](figures/variance_during_training_rotated.png)\n"
        );
    }
    let _ = writeln!(s, "## Looking inside\n");
    let _ = writeln!(s, "![test images under rotation](figures/rotations.png)\n");
    let _ = writeln!(
        s,
        "![kernels, unrotated](figures/kernels_unrotated.png) ![kernels, rotated](figures/kernels_rotated.png)\n"
    );
    let _ = writeln!(s, "![activation change under rotation](figures/rotation_difference.png)\n");
    let _ = writeln!(s, "Feature maps of one test image under rotation: `figures/feature_maps_unrotated/`, `figures/feature_maps_rotated/`.");
    s
}
