//! The evaluation and measurement commands: `eval`, `measure`, `measure-pair`, and the merges
//! of sharded runs (their arguments are defined with the others in `mod.rs`).

use super::*;

pub(super) fn cmd_eval(a: EvalArgs) -> Result<()> {
    if let Some(json) = &a.json {
        fsio::check_output(json, &[&a.checkpoint])?;
    }
    let b = open_backend(a.device)?;
    let (model, meta) = checkpoint::load(&a.checkpoint, &b)?;
    let name = a.dataset.clone().unwrap_or_else(|| meta.dataset.clone());
    let test_set = load_split(&name, a.data_dir.as_deref(), Split::Test, a.limit)?;
    meta.check_dataset(&test_set, &a.checkpoint)?;
    let data = DeviceDataset::upload(&test_set, &meta.normalization, &b)?;
    let set = match (&a.angles, a.transform.is_empty()) {
        (Some(spec), _) => Some(TransformSet::rotations(&angle_eval::parse_angles(spec)?)),
        (None, false) => Some(TransformSet::parse(&a.transform)?),
        (None, true) => None,
    };
    if set.is_none() && a.shard.is_some() {
        bail!("--shard splits an evaluation over a set of transformations: give --angles or --transform too");
    }
    if let Some(set) = &set {
        let out = a.out.clone().unwrap_or_else(|| a.checkpoint.parent().map(Path::to_path_buf).unwrap_or_default());
        if let Some(which) = a.shard {
            let range = which.range(data.len(), a.batch_size);
            if range.is_empty() {
                bail!(
                    "shard {which} is empty: {} test images make fewer than {} batches of {}; use fewer shards or a smaller --batch-size",
                    data.len(),
                    which.n,
                    a.batch_size
                );
            }
            let tally = angle_eval::tally_transforms(&model, &data, set, a.batch_size, a.seed, range, a.quiet)?;
            let shard = angle_eval::TransformShard {
                kind: angle_eval::SHARD_KIND.into(),
                checkpoint_sha256: data::fetch::sha256_hex(&std::fs::read(&a.checkpoint)?),
                arch: meta.arch.clone(),
                augment: meta.augment.to_string(),
                dataset: name.clone(),
                class_names: meta.class_names.clone(),
                total_images: data.len(),
                batch: a.batch_size,
                random_seed: a.seed,
                shard: which,
                tally,
            };
            let path = out.join(angle_eval::TransformShard::file_name(set, which));
            write_json(&path, &shard)?;
            println!("wrote shard {which}: {}", path.display());
            return Ok(());
        }
        let ev = angle_eval::evaluate(&model, &data, set, a.batch_size, a.seed, &meta.class_names, a.quiet)?;
        println!(
            "{} ({}) on {name} test ({} images), {} {} in {:.1}s:",
            meta.arch,
            meta.augment,
            ev.images,
            set.len(),
            if ev.rotations() { "angles" } else { "transformations" },
            ev.seconds
        );
        print!("{}", ev.table());
        if let Some(path) = &a.json {
            write_json(path, &ev)?;
        }
        let title = format!("{} ({}) on {name}", meta.arch, meta.augment);
        return write_angle_outputs(&out, &title, &meta.augment.to_string(), &ev);
    }
    let start = Instant::now();
    let e = train::evaluate(&model, &data, a.batch_size)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} on {name} test ({} images): loss {:.4}, accuracy {:.2}% ({:.1}s)",
        meta.arch,
        e.total,
        e.loss,
        100.0 * e.accuracy,
        secs
    );
    println!("{:>12} {:>9} {:>7}", "class", "accuracy", "images");
    for (i, (c, t)) in e.per_class.iter().enumerate() {
        let label = meta.class_names.get(i).cloned().unwrap_or_else(|| i.to_string());
        println!("{label:>12} {:>8.2}% {t:>7}", 100.0 * *c as f64 / (*t).max(1) as f64);
    }
    if let Some(path) = &a.json {
        write_json(path, &e)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

pub(super) fn cmd_measure(a: MeasureArgs) -> Result<()> {
    let b = open_backend(a.opts.device)?;
    let out = a.out.clone().unwrap_or_else(|| a.checkpoint.parent().map(Path::to_path_buf).unwrap_or_default());
    if let Some(which) = a.shard {
        let path = job::measure_shard(&b, &a.checkpoint, &a.opts.options()?, which, &out)?;
        println!("wrote shard {which}: {}", path.display());
        return Ok(());
    }
    let m = job::measure_checkpoint(&b, &a.checkpoint, &a.opts.options()?, &out)?;
    println!(
        "{} ({}): V over {} test images x {} {}, per {}, {:.1}s",
        m.meta.arch,
        m.meta.augment,
        m.summary.samples,
        m.summary.rotations,
        transformations_noun(&m.summary),
        match a.opts.per {
            Per::Element => "element".to_string(),
            Per::Map => format!("map ({})", a.opts.reduce),
        },
        m.seconds
    );
    print!("{}", output::table(&m.summary));
    figures::variance_strips(
        &out.join("variance_strips.png"),
        &format!("{} ({}): V per unit", m.meta.arch, m.meta.augment),
        &m.layers,
        &m.meta.class_names,
    )?;
    eprintln!(
        "wrote {}, {} and variance_strips.png",
        out.join(job::TENSORS).display(),
        out.join(job::SUMMARY).display()
    );
    Ok(())
}

/// "rotations" or "transformations": what a measurement varied.
fn transformations_noun(s: &output::Summary) -> &'static str {
    match &s.config {
        Some(c) if !c.transforms.rotation_only() => "transformations",
        _ => "rotations",
    }
}

/// The JSON, CSV and two figures of an evaluation over a set of transformations, in `out`:
/// angles.json, angles.csv, accuracy_vs_angle.png and class_angle.png for rotations,
/// transform.json, ... accuracy_vs_transform.png and class_transform.png otherwise.
fn write_angle_outputs(out: &Path, title: &str, augment: &str, ev: &angle_eval::TransformEvaluation) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (stem, noun, what) = if ev.rotations() {
        ("angles", "angle", "rotation")
    } else {
        ("transform", "transform", ev.transforms.as_str())
    };
    write_json(&out.join(format!("{stem}.json")), ev)?;
    write_atomic(&out.join(format!("{stem}.csv")), ev.to_csv().as_bytes())?;
    figures::accuracy_vs_angle(
        &out.join(format!("accuracy_vs_{noun}.png")),
        &format!("{title}: accuracy versus {what}"),
        &[(augment, ev, augment == "none")],
    )?;
    figures::class_angle_heatmap(
        &out.join(format!("class_{noun}.png")),
        &format!("{title}: accuracy per class and {}", if ev.rotations() { "angle" } else { "transformation" }),
        ev,
    )?;
    eprintln!("wrote {stem}.json, {stem}.csv, accuracy_vs_{noun}.png and class_{noun}.png in {}", out.display());
    Ok(())
}

pub(super) fn cmd_eval_merge(a: MeasureMergeArgs) -> Result<()> {
    let (first, tally) = angle_eval::merge_shards(&a.shards)?;
    let ev = tally.finish(&first.class_names, first.random_seed, 0.0)?;
    println!(
        "{} ({}) on {} test ({} images), {} {}, merged from {} shards:",
        first.arch,
        first.augment,
        first.dataset,
        ev.images,
        ev.per_point.len(),
        if ev.rotations() { "angles" } else { "transformations" },
        a.shards.len()
    );
    print!("{}", ev.table());
    let title = format!("{} ({}) on {}", first.arch, first.augment, first.dataset);
    write_angle_outputs(&a.out, &title, &first.augment, &ev)
}

pub(super) fn cmd_measure_merge(a: MeasureMergeArgs) -> Result<()> {
    let (layers, summary, source) = job::merge_shards(&a.shards, &a.out)?;
    println!(
        "{} ({}): V over {} test images x {} {}, merged from {} shards",
        source.arch,
        source.augment,
        summary.samples,
        summary.rotations,
        transformations_noun(&summary),
        a.shards.len()
    );
    print!("{}", output::table(&summary));
    figures::variance_strips(
        &a.out.join("variance_strips.png"),
        &format!("{} ({}): V per unit", source.arch, source.augment),
        &layers,
        &source.class_names,
    )?;
    eprintln!("wrote {} and {}", a.out.join(job::TENSORS).display(), a.out.join(job::SUMMARY).display());
    Ok(())
}

pub(super) fn cmd_measure_pair(a: MeasurePairArgs) -> Result<()> {
    let manifest = run::read_manifest(&a.run_dir)?;
    let b = open_backend(a.opts.device)?;
    let mut summaries = Vec::new();
    for member in [&manifest.unrotated, &manifest.rotated] {
        let dir = a.run_dir.join(&member.dir);
        let m = job::measure_checkpoint(&b, &a.run_dir.join(&member.checkpoint), &a.opts.options()?, &dir)?;
        figures::variance_strips(
            &dir.join("variance_strips.png"),
            &format!("{} {}: V per unit", m.meta.arch, member.dir),
            &m.layers,
            &m.meta.class_names,
        )?;
        eprintln!("{}: measured in {:.1}s, wrote {}", member.dir, m.seconds, dir.join(job::TENSORS).display());
        summaries.push(m.summary);
    }
    print!("{}", output::pair_table(&summaries[0], &summaries[1]));
    let plot = a.run_dir.join("layer_means.png");
    figures::layer_means(&plot, &format!("{}: mean V per layer", manifest.model), &summaries[0], &summaries[1])?;
    eprintln!("wrote {}", plot.display());
    Ok(())
}
