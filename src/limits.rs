//! The bounds of every number a user can hand rotvar: command-line flags and the sizes read from
//! a checkpoint's metadata.
//!
//! They live in one table so that `--help`, the parse error and the library's own checks state
//! the same range. The bounds are generous for real studies and exist to turn a typo (`1e12`
//! rotations, `--threads 100000`) into an error before any allocation, not to second-guess
//! sensible settings.

use anyhow::{bail, Result};

/// A closed or half-open interval of allowed values, with the flag (or field) it governs.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub name: &'static str,
    pub lo: f64,
    pub hi: f64,
    /// `lo` itself is not allowed (a learning rate must be > 0).
    pub lo_open: bool,
    /// `hi` itself is not allowed (momentum must be < 1).
    pub hi_open: bool,
}

const fn closed(name: &'static str, lo: f64, hi: f64) -> Bound {
    Bound { name, lo, hi, lo_open: false, hi_open: false }
}

pub const THREADS: Bound = closed("--threads", 1.0, 256.0);
pub const EPOCHS: Bound = closed("--epochs", 1.0, 100_000.0);
pub const ROTATED_EPOCHS: Bound = closed("--rotated-epochs", 1.0, 100_000.0);
/// Training batches are batch-normalized: one sample has no batch statistics.
pub const TRAIN_BATCH: Bound = closed("--batch-size", 2.0, 65_536.0);
pub const EVAL_BATCH: Bound = closed("--batch-size", 1.0, 65_536.0);
pub const LR: Bound = Bound { name: "--lr", lo: 0.0, hi: 100.0, lo_open: true, hi_open: false };
pub const WEIGHT_DECAY: Bound = closed("--weight-decay", 0.0, 1.0);
pub const MOMENTUM: Bound = Bound { name: "--momentum", lo: 0.0, hi: 1.0, lo_open: false, hi_open: true };
/// Training needs a batch of two.
pub const TRAIN_LIMIT: Bound = closed("--limit", 2.0, 100_000_000.0);
pub const TEST_LIMIT: Bound = closed("--test-limit", 1.0, 100_000_000.0);
pub const EVAL_LIMIT: Bound = closed("--limit", 1.0, 100_000_000.0);
pub const MEASURE_LIMIT: Bound = closed("--measure-limit", 1.0, 100_000_000.0);
/// V_t over one rotation is zero by construction: at least two.
pub const ROTATIONS: Bound = closed("--rotations", 2.0, 4096.0);
/// Evaluation angles (`--angles`, `images --angles`).
pub const ANGLES: Bound = closed("--angles", 1.0, 3600.0);
/// `rank --pairs`: pairs drawn per image.
pub const RANK_PAIRS: Bound = closed("--pairs", 1.0, 100.0);
pub const IMAGES_COUNT: Bound = closed("--count", 1.0, 1024.0);
pub const BENCH_IMAGES: Bound = closed("--images", 1.0, 10_000_000.0);
pub const BENCH_ANGLES: Bound = closed("--angles", 1.0, 4096.0);
pub const BENCH_STEPS: Bound = closed("--steps", 1.0, 1_000_000.0);
pub const BENCH_WARMUP: Bound = closed("--warmup", 0.0, 100_000.0);
pub const SELFTEST_STEPS: Bound = closed("--steps", 1.0, 1_000_000.0);

/// `--augment rotate=LO:HI` in degrees: ten turns either way is already more than anyone means.
pub const AUGMENT_DEGREES: Bound = closed("--augment rotate", -3600.0, 3600.0);
/// `--augment zoom=LO:HI`: a factor; 0 would collapse the image to a point.
pub const AUGMENT_ZOOM: Bound = Bound { name: "--augment zoom", lo: 0.0, hi: 100.0, lo_open: true, hi_open: false };

/// Sizes in a checkpoint's metadata. The largest model at the largest input stays within a few
/// GB of parameters, so a corrupt header cannot ask for more than the machine has.
pub const INPUT_CHANNELS: Bound = closed("input channels", 1.0, 16.0);
pub const INPUT_SIDE: Bound = closed("input height/width", 1.0, 256.0);
pub const CLASSES: Bound = closed("classes", 2.0, 1000.0);

impl Bound {
    /// The range in words, as `--help` and errors show it: "1 ≤ N ≤ 256", "0 < X ≤ 100".
    pub fn range(&self) -> String {
        let (l, h) = (fmt_num(self.lo), fmt_num(self.hi));
        format!("{l} {} value {} {h}", if self.lo_open { "<" } else { "≤" }, if self.hi_open { "<" } else { "≤" })
    }

    /// Help text with the range appended.
    pub fn help(&self, text: &str) -> String {
        format!("{text} [{}]", self.range())
    }

    pub fn contains(&self, v: f64) -> bool {
        let above = if self.lo_open { v > self.lo } else { v >= self.lo };
        let below = if self.hi_open { v < self.hi } else { v <= self.hi };
        above && below
    }

    fn refuse(&self, v: &str) -> String {
        format!("{} {v} is out of range: the allowed range is {}", self.name, self.range())
    }

    /// Check a count that arrived other than through clap (library callers, config files).
    pub fn check_usize(&self, v: usize) -> Result<usize> {
        if !self.contains(v as f64) {
            bail!(self.refuse(&v.to_string()));
        }
        Ok(v)
    }

    pub fn check_f32(&self, v: f32) -> Result<f32> {
        if !v.is_finite() || !self.contains(v as f64) {
            bail!(self.refuse(&v.to_string()));
        }
        Ok(v)
    }

    /// A clap value parser for a count within this bound.
    pub fn usize_parser(self) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
        move |s: &str| {
            let v: usize = s.trim().parse().map_err(|_| {
                format!("{} '{s}' is not a whole number (the allowed range is {})", self.name, self.range())
            })?;
            if self.contains(v as f64) {
                Ok(v)
            } else {
                Err(self.refuse(s))
            }
        }
    }

    /// A clap value parser for a real number within this bound; NaN and infinities are refused.
    pub fn f32_parser(self) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
        move |s: &str| {
            let v: f32 = s
                .trim()
                .parse()
                .map_err(|_| format!("{} '{s}' is not a number (the allowed range is {})", self.name, self.range()))?;
            if v.is_finite() && self.contains(v as f64) {
                Ok(v)
            } else {
                Err(self.refuse(s))
            }
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_accept_the_range_and_name_the_flag_outside_it() {
        let p = THREADS.usize_parser();
        assert_eq!(p("1"), Ok(1));
        assert_eq!(p("256"), Ok(256));
        let e = p("0").unwrap_err();
        assert!(e.contains("--threads 0") && e.contains("1 ≤ value ≤ 256"), "{e}");
        assert!(p("100000").is_err());
        assert!(p("1e3").unwrap_err().contains("not a whole number"));
        let lr = LR.f32_parser();
        assert!(lr("0").is_err() && lr("-1").is_err() && lr("NaN").is_err() && lr("inf").is_err());
        assert_eq!(lr("0.001"), Ok(0.001));
        let m = MOMENTUM.f32_parser();
        assert!(m("-5").unwrap_err().contains("0 ≤ value < 1"));
        assert!(m("1").is_err());
        assert_eq!(m("0"), Ok(0.0));
        assert!(ROTATIONS.check_usize(1).is_err());
        assert!(ROTATIONS.check_usize(16).is_ok());
        assert!(THREADS.help("CPU threads").ends_with("[1 ≤ value ≤ 256]"));
    }
}
