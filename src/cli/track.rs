//! `train --measure-every`: V per layer between epochs, for `train` and `train-pair`.

use super::{figures, job, limits, run, MapReduce, MeasureOptions, Per};
use anyhow::Result;
use clap::Args;
use std::path::Path;

/// V during training (`--measure-every`), for train and train-pair.
#[derive(Args, Clone)]
pub(super) struct TrackArgs {
    /// Measure V per layer every N epochs (and after the last) on the first --measure-limit test
    /// images, with `measure`'s defaults (16 rotations, per map, mean): recorded in
    /// metrics.json ("variance") and drawn in variance_during_training.png.
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = limits::EPOCHS.usize_parser())]
    measure_every: Option<usize>,
    #[arg(long, value_name = "N", requires = "measure_every", allow_hyphen_values = true,
          value_parser = limits::MEASURE_LIMIT.usize_parser(),
          help = limits::MEASURE_LIMIT.help("With --measure-every: test images measured, the first N (default 1000)"))]
    measure_limit: Option<usize>,
}

impl TrackArgs {
    pub(super) fn probe(&self, quiet: bool) -> Result<Option<run::EpochProbe<'static>>> {
        let Some(every) = self.measure_every else { return Ok(None) };
        job::epoch_probe(every, &measure_defaults(self.measure_limit.or(Some(1000)), quiet)).map(Some)
    }
}

/// `measure`'s default settings on the first `limit` test images.
fn measure_defaults(limit: Option<usize>, quiet: bool) -> MeasureOptions {
    MeasureOptions {
        rotations: 16,
        transforms: None,
        per: Per::Map,
        reduce: MapReduce::Mean,
        batch: 256,
        dataset: None,
        data_dir: None,
        limit,
        quiet,
    }
}

/// variance_during_training.png in `out`, when the run measured V between epochs.
pub(super) fn draw_variance_track(out: &Path, title: &str, record: &run::TrainRecord) -> Result<()> {
    if record.variance.is_empty() {
        return Ok(());
    }
    let path = out.join("variance_during_training.png");
    figures::variance_during_training(&path, title, &record.variance)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
