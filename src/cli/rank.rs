//! `rotvar rank`: the augmentation-encoding study (docs/rank-study.md).

use super::open_backend;
use crate::augment::Augment;
use crate::backend::DeviceRequest;
use crate::data::{self, Split};
use crate::limits;
use crate::optim::{OptimConfig, OptimizerKind};
use crate::rank::{self, Augmentation, Backbone, RankData, RankOptions};
use crate::run::{self, DataSource};
use crate::train::TrainConfig;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(super) struct RankArgs {
    /// A backbone checkpoint written by `rotvar train --limit N` (the training images after the
    /// first N train the heads). Repeat to compare backbones, e.g. one trained with
    /// --augment zoom=0.5:1 and one without.
    #[arg(long, value_name = "CHECKPOINT")]
    backbone: Vec<PathBuf>,
    /// Train ConvBN backbones on 80% of the bundled MNIST sample first (without augmentation, and
    /// with the ranked one where training has it: zoom=0.5:1 or rotate=0:60), then rank them:
    /// the whole study in a few minutes on a CPU.
    #[arg(long, conflicts_with = "backbone")]
    quick: bool,
    /// The augmentation whose strength is ranked.
    #[arg(long, value_enum, default_value_t = Augmentation::Zoom)]
    augmentation: Augmentation,
    /// Strengths the two copies of a pair are drawn from (two different ones): zoom factors
    /// (default 0.5,0.6,0.7,0.8,0.9), angles in degrees (0,15,30,45,60) or brightness factors
    /// (0.5,0.75,1,1.25,1.5).
    #[arg(long, alias = "factors", value_delimiter = ',', allow_hyphen_values = true)]
    levels: Option<Vec<f32>>,
    /// Pairs per image.
    #[arg(long, default_value_t = 4, allow_hyphen_values = true, value_parser = limits::RANK_PAIRS.usize_parser())]
    pairs: usize,
    /// Backbone layers to put a head on, comma-separated (default: every pooling output and
    /// hidden fully connected layer).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<String>>,
    #[arg(long, default_value_t = 3, allow_hyphen_values = true, value_parser = limits::EPOCHS.usize_parser(),
          help = limits::EPOCHS.help("Epochs of head training"))]
    head_epochs: usize,
    #[arg(long, default_value_t = 64, allow_hyphen_values = true, value_parser = limits::TRAIN_BATCH.usize_parser(),
          help = limits::TRAIN_BATCH.help("Pairs per head training step"))]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true, value_parser = limits::LR.f32_parser(),
          help = limits::LR.help("Learning rate of the heads (Adam)"))]
    lr: f32,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::TRAIN_LIMIT.usize_parser(),
          help = limits::TRAIN_LIMIT.help("At most N held-out training images for the heads (default: all held out)"))]
    head_limit: Option<usize>,
    #[arg(long, allow_hyphen_values = true, value_parser = limits::TEST_LIMIT.usize_parser(),
          help = limits::TEST_LIMIT.help("Test pairs from the first N test images (default: all; 500 with --quick)"))]
    test_limit: Option<usize>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    /// Directory for rank.json, rank.csv, rank.md and rank_accuracy.png (with --quick, the
    /// backbones too).
    #[arg(long, default_value = "runs/rank")]
    out: PathBuf,
    #[arg(long)]
    quiet: bool,
}

pub(super) fn cmd_rank(a: RankArgs) -> Result<()> {
    let b = open_backend(a.device)?;
    let mut o = RankOptions {
        augmentation: a.augmentation,
        factors: a.levels.clone().unwrap_or_else(|| a.augmentation.default_levels()),
        pairs_per_image: a.pairs,
        layers: a.layers.clone(),
        head_epochs: a.head_epochs,
        batch: a.batch_size,
        lr: a.lr,
        seed: a.seed,
        ..RankOptions::default()
    };
    let mut test_limit = a.test_limit;
    let backbones = if a.quick {
        test_limit = test_limit.or(Some(500));
        o.head_epochs = a.head_epochs.min(2);
        quick_backbones(&b, &a)?
    } else {
        if a.backbone.is_empty() {
            bail!("rank: give one or more --backbone CHECKPOINT (written by `rotvar train --limit N`), or --quick");
        }
        a.backbone
            .iter()
            .map(|p| {
                let meta = crate::checkpoint::read_meta(p)?;
                let label =
                    if meta.augment.is_none() { "unaugmented".into() } else { format!("augmented ({})", meta.augment) };
                Ok(Backbone { label, checkpoint: p.clone() })
            })
            .collect::<Result<Vec<_>>>()?
    };
    let d = RankData { data_dir: a.data_dir.clone(), head_limit: a.head_limit, test_limit };
    let report = rank::run_study(&b, &backbones, &o, &d, &a.out, a.quiet)?;
    print!("{}", report.markdown());
    eprintln!(
        "wrote rank.json, rank.csv, rank.md and rank_accuracy.png in {} ({:.0}s)",
        a.out.display(),
        report.seconds
    );
    Ok(())
}

/// `--quick`: ConvBN on the first 80% of the bundled sample, 2 epochs, without augmentation and
/// with the ranked one where training has it (continued or reused when already in the output
/// directory).
fn quick_backbones(b: &crate::backend::BackendRef, a: &RankArgs) -> Result<Vec<Backbone>> {
    let n = data::sample::SAMPLE_TRAIN_LEN * 4 / 5;
    let source =
        DataSource { dataset: "mnist-sample".into(), data_dir: None, train_limit: Some(n), test_limit: Some(500) };
    let train_set = source.load(Split::Train)?;
    let test_set = source.load(Split::Test)?;
    let mut out = Vec::new();
    let mut members = vec![("unaugmented".to_string(), Augment::NONE)];
    match a.augmentation {
        Augmentation::Zoom => members.push(("zoom-augmented".into(), "zoom=0.5:1".parse()?)),
        Augmentation::Rotate => members.push(("rotate-augmented".into(), "rotate=0:60".parse()?)),
        // Training has no photometric augmentation (yet): only the unaugmented backbone.
        Augmentation::Brightness => {}
    }
    for (label, augment) in members {
        let cfg = TrainConfig {
            model: "convbn".into(),
            dataset: train_set.name.clone(),
            epochs: 2,
            batch_size: 64,
            optim: OptimConfig::new(OptimizerKind::Adam, 1e-3, 0.0),
            seed: a.seed,
            augment,
        };
        let dir = a.out.join(format!("backbone-{label}"));
        run::check_continuable(&dir, &cfg, train_set.len(), test_set.len())?;
        run::train_model(b, &cfg, &train_set, &test_set, &dir, a.quiet, run::Existing::Continue, None)?;
        out.push(Backbone { label, checkpoint: dir.join("model.safetensors") });
    }
    Ok(out)
}
