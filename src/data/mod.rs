//! Datasets: MNIST (IDX files, raw or gzipped), a bundled MNIST sample, and CIFAR-10 (binary
//! batches), all loaded into one in-memory [`Dataset`] of raw `u8` pixels in NCHW order.
//!
//! Pixels stay `u8` until [`Dataset::to_f32_normalized`] so that a 60,000-image training set costs
//! 47 MB instead of 188 MB, and so that normalization can use statistics chosen by the caller
//! (rotvar normalizes both splits with the *training* statistics; see docs/protocol.md).
//!
//! Where the files go: `<data_dir>/mnist/` and `<data_dir>/cifar-10-batches-bin/`, with
//! `data_dir` from [`resolve_data_dir`].

pub mod cifar;
pub mod fetch;
pub mod mnist;
pub mod sample;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    /// "mnist", "mnist-sample" or "cifar10".
    pub name: String,
    pub split: Split,
    /// `n * channels * height * width` raw pixels, NCHW. CIFAR keeps the file's planar layout
    /// (all R, then all G, then all B per image), which already is CHW.
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// MNIST: "0".."9"; CIFAR-10: from `batches.meta.txt`.
    pub class_names: Vec<String>,
}

/// Per-channel mean and standard deviation of pixels scaled to [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// The normalized value of a raw black pixel, per channel (−mean/std): what rotation and
    /// zoom fill uncovered pixels with, as if the raw images had been rotated with black fill.
    pub fn black(&self) -> Vec<f32> {
        self.mean.iter().zip(self.divisors()).map(|(m, s)| -m / s).collect()
    }

    /// What each channel is divided by: its std, or 1 for a constant channel (std 0), which is
    /// only centred, so nothing downstream meets inf or NaN.
    pub fn divisors(&self) -> Vec<f32> {
        self.std.iter().map(|&s| if s > 0.0 && s.is_finite() { s } else { 1.0 }).collect()
    }
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Values per image: `channels * height * width`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Per-channel mean and population standard deviation of `pixel / 255`.
    ///
    /// Sums are accumulated exactly in integers and only the final division happens in f64, so
    /// the result does not depend on summation order or dataset size. An empty dataset gives
    /// mean 0 and std 1 (a no-op normalization) rather than NaN.
    pub fn channel_stats(&self) -> Normalization {
        let c = self.channels;
        let plane = self.height * self.width;
        let mut sum = vec![0u64; c];
        let mut sum_sq = vec![0u64; c];
        if plane > 0 && c > 0 {
            for image in self.images.chunks_exact(c * plane).take(self.n) {
                for (ch, pixels) in image.chunks_exact(plane).enumerate() {
                    let (mut s, mut s2) = (0u64, 0u64);
                    for &p in pixels {
                        let p = p as u64;
                        s += p;
                        s2 += p * p;
                    }
                    sum[ch] += s;
                    sum_sq[ch] += s2;
                }
            }
        }
        let count = (self.n * plane) as f64;
        let mut mean = Vec::with_capacity(c);
        let mut std = Vec::with_capacity(c);
        for ch in 0..c {
            if count == 0.0 {
                mean.push(0.0);
                std.push(1.0);
                continue;
            }
            let m = sum[ch] as f64 / count;
            // Clamp: E[x^2] - E[x]^2 can round to a tiny negative for constant channels.
            let var = (sum_sq[ch] as f64 / count - m * m).max(0.0);
            mean.push((m / 255.0) as f32);
            std.push((var.sqrt() / 255.0) as f32);
        }
        Normalization { mean, std }
    }

    /// `(x / 255 - mean[c]) / std[c]` for every pixel, NCHW.
    ///
    /// A channel whose std is zero or not finite (a constant channel) is only centred, not
    /// scaled, so the output never contains inf/NaN.
    ///
    /// Panics if `norm` has a different number of channels than the dataset; use
    /// [`Dataset::try_to_f32_normalized`] when `norm` comes from a file.
    pub fn to_f32_normalized(&self, norm: &Normalization) -> Vec<f32> {
        match self.try_to_f32_normalized(norm) {
            Ok(v) => v,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Like [`Dataset::to_f32_normalized`], but a channel-count mismatch is an error.
    pub fn try_to_f32_normalized(&self, norm: &Normalization) -> Result<Vec<f32>> {
        let c = self.channels;
        if norm.mean.len() != c || norm.std.len() != c {
            bail!(
                "normalization has {} means and {} stds but dataset '{}' has {} channel(s); \
                 statistics from a different dataset cannot be used",
                norm.mean.len(),
                norm.std.len(),
                self.name,
                c
            );
        }
        let plane = self.height * self.width;
        let total = self.n * c * plane;
        if self.images.len() < total {
            bail!("dataset '{}' holds {} pixel bytes but n*c*h*w = {}", self.name, self.images.len(), total);
        }
        let std = norm.divisors();
        let mut out = Vec::with_capacity(total);
        if plane > 0 && c > 0 {
            for image in self.images[..total].chunks_exact(c * plane) {
                for (ch, pixels) in image.chunks_exact(plane).enumerate() {
                    let (m, s) = (norm.mean[ch], std[ch]);
                    out.extend(pixels.iter().map(|&p| (p as f32 / 255.0 - m) / s));
                }
            }
        }
        Ok(out)
    }

    pub fn labels_f32(&self) -> Vec<f32> {
        self.labels.iter().map(|&l| l as f32).collect()
    }

    /// The first `min(n, len)` records, e.g. for `--limit`.
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.n);
        let pixels = (n * self.image_len()).min(self.images.len());
        Dataset {
            name: self.name.clone(),
            split: self.split,
            images: self.images[..pixels].to_vec(),
            labels: self.labels[..n.min(self.labels.len())].to_vec(),
            n,
            channels: self.channels,
            height: self.height,
            width: self.width,
            class_names: self.class_names.clone(),
        }
    }

    /// Records per class. Sized to cover every label present even if `class_names` is short, so
    /// a hand-built dataset cannot make this index out of bounds.
    pub fn class_counts(&self) -> Vec<usize> {
        let max_label = self.labels.iter().copied().max().map_or(0, |m| m as usize + 1);
        let mut counts = vec![0usize; self.num_classes().max(max_label)];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// `--data-dir` if given, else `$ROTVAR_DATA` if set and non-empty, else `./data`.
pub fn resolve_data_dir(cli: Option<&Path>) -> PathBuf {
    if let Some(dir) = cli {
        return dir.to_path_buf();
    }
    match std::env::var_os("ROTVAR_DATA") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("./data"),
    }
}

pub const DATASETS: &[&str] = &["mnist", "mnist-sample", "cifar10"];

/// Channels, height and width of a named dataset's images.
pub fn known_shape(name: &str) -> Option<[usize; 3]> {
    match name {
        "mnist" | "mnist-sample" => Some([1, 28, 28]),
        "cifar10" => Some([3, 32, 32]),
        _ => None,
    }
}

/// Loads dataset `name` (one of [`DATASETS`]) from `data_dir`; `mnist-sample` is built in and
/// ignores `data_dir`.
pub fn load(name: &str, split: Split, data_dir: &Path) -> Result<Dataset> {
    match name {
        "mnist" => mnist::load_mnist(data_dir, split),
        "mnist-sample" => sample::load_mnist_sample(split),
        "cifar10" => cifar::load_cifar10(data_dir, split),
        _ => bail!("unknown dataset '{name}'; available datasets: {}", DATASETS.join(", ")),
    }
}

/// Reads a file, mapping "not found" and other I/O failures to messages that name the path.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

/// If something exists at `path` but is not a regular file (a directory, a dangling symbolic
/// link, a FIFO or device), says what it is, e.g. "is a directory, not a file". `None` when the
/// path is a regular file (or a link to one) or nothing is there at all.
///
/// Loaders check this before calling a data file "missing": a directory where a file belongs
/// needs a different fix (remove it) than an absent file (download it), and reading a FIFO would
/// block forever.
pub(crate) fn not_a_file(path: &Path) -> Option<&'static str> {
    let link = std::fs::symlink_metadata(path).ok()?;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => None,
        Ok(m) if m.is_dir() => Some("is a directory, not a file"),
        Ok(_) => Some("is not a regular file (a FIFO, socket or device)"),
        Err(_) if link.file_type().is_symlink() => Some("is a symbolic link to a path that does not exist"),
        Err(_) => Some("exists but cannot be inspected (check its permissions)"),
    }
}

/// " (the directory does not exist)" or " (it is a file, not a directory)" for a data directory
/// that is not a directory; "" when it is one. Appended to "files are missing" errors.
pub(crate) fn dir_note(dir: &Path) -> &'static str {
    if dir.is_dir() {
        ""
    } else if dir.exists() {
        " (that path is a file, not a directory)"
    } else {
        " (the directory does not exist)"
    }
}

/// The advice appended to every "files are missing" error.
pub(crate) const DATA_DIR_HINT: &str =
    "The data directory is chosen by --data-dir, else the ROTVAR_DATA environment variable, \
     else ./data.";
