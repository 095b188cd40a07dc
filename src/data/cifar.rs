//! CIFAR-10, binary version: `<data_dir>/cifar-10-batches-bin/` as extracted from
//! `cifar-10-binary.tar.gz`.
//!
//! Each batch file is a sequence of records of 1 label byte followed by 3,072 pixel bytes
//! (1,024 R, then 1,024 G, then 1,024 B, each plane row-major 32x32). The official files hold
//! exactly 10,000 records each; the loader accepts any positive whole number of records so that
//! tests and hand-made subsets can use small files, but rejects a length that is not a multiple
//! of the record size, since that means truncation or a different format.

use super::{dir_note, not_a_file, read_file, Dataset, Split, DATA_DIR_HINT};
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

pub const CIFAR_SUBDIR: &str = "cifar-10-batches-bin";
pub const CHANNELS: usize = 3;
pub const SIDE: usize = 32;
pub const IMAGE_BYTES: usize = CHANNELS * SIDE * SIDE;
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Records in each official batch file.
pub const RECORDS_PER_BATCH: usize = 10_000;
pub const TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
pub const TEST_FILE: &str = "test_batch.bin";
pub const META_FILE: &str = "batches.meta.txt";
/// Used when `batches.meta.txt` is absent; identical to the official file's content.
pub const DEFAULT_CLASS_NAMES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
pub const DOWNLOAD_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

pub fn split_files(split: Split) -> Vec<&'static str> {
    match split {
        Split::Train => TRAIN_FILES.to_vec(),
        Split::Test => vec![TEST_FILE],
    }
}

/// Loads one CIFAR-10 split from `<data_dir>/cifar-10-batches-bin/`; the training split is the
/// five data batches concatenated in order.
///
/// If that directory holds none of the split's files but `data_dir` itself holds them all,
/// `data_dir` is used, so `--data-dir path/to/cifar-10-batches-bin` also works.
pub fn load_cifar10(data_dir: &Path, split: Split) -> Result<Dataset> {
    let names = split_files(split);
    let primary = data_dir.join(CIFAR_SUBDIR);
    let in_primary = names.iter().any(|f| primary.join(f).is_file() || not_a_file(&primary.join(f)).is_some());
    let in_parent = names.iter().all(|f| data_dir.join(f).is_file());
    let dir = if !in_primary && in_parent { data_dir.to_path_buf() } else { primary };

    if let Some((path, what)) = names.iter().find_map(|f| not_a_file(&dir.join(f)).map(|w| (dir.join(f), w))) {
        bail!(
            "CIFAR-10 {split} data: {} {what}; rotvar expects a CIFAR-10 binary batch there. \
             Remove or rename it, then re-extract the binary version ({DOWNLOAD_URL}) inside the \
             data directory.\n{DATA_DIR_HINT}",
            path.display()
        );
    }
    let missing: Vec<&str> = names.iter().copied().filter(|f| !dir.join(f).is_file()).collect();
    if !missing.is_empty() {
        let dir_note = dir_note(&dir);
        bail!(
            "CIFAR-10 {split} data not found: missing {} in {}{dir_note}.\n\
             To fix: download the binary version ({DOWNLOAD_URL}) and extract it inside the data \
             directory; it creates {CIFAR_SUBDIR}/ with data_batch_1..5.bin, test_batch.bin and \
             {META_FILE}.\n{DATA_DIR_HINT}",
            missing.join(", "),
            dir.display()
        );
    }

    let class_names = read_class_names(&dir.join(META_FILE))?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for name in &names {
        let path = dir.join(name);
        let bytes = read_file(&path)?;
        append_batch(&bytes, &path, class_names.len(), &mut labels, &mut images)?;
    }
    Ok(Dataset {
        name: "cifar10".to_string(),
        split,
        n: labels.len(),
        images,
        labels,
        channels: CHANNELS,
        height: SIDE,
        width: SIDE,
        class_names,
    })
}

/// Splits one batch file into labels and planar pixels, appending to the outputs.
fn append_batch(
    bytes: &[u8],
    path: &Path,
    num_classes: usize,
    labels: &mut Vec<u8>,
    images: &mut Vec<u8>,
) -> Result<()> {
    if bytes.is_empty() {
        bail!("{}: file is empty; re-extract it from cifar-10-binary.tar.gz", path.display());
    }
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        bail!(
            "{}: length {} is not a multiple of the {RECORD_BYTES}-byte CIFAR-10 record \
             (1 label + {IMAGE_BYTES} pixels); it holds {} whole records plus {} stray bytes, so \
             it is truncated or not a CIFAR-10 binary batch (the Python-pickle version is a \
             different format). Re-extract it from cifar-10-binary.tar.gz",
            path.display(),
            bytes.len(),
            bytes.len() / RECORD_BYTES,
            bytes.len() % RECORD_BYTES
        );
    }
    let records = bytes.len() / RECORD_BYTES;
    labels.reserve(records);
    images.reserve(records * IMAGE_BYTES);
    for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let (label, pixels) = record.split_at(1);
        if label[0] as usize >= num_classes {
            bail!(
                "{}: record {i} has label {}, but CIFAR-10 labels are 0..{}; the file is corrupt \
                 or not a CIFAR-10 batch. Re-extract it from cifar-10-binary.tar.gz",
                path.display(),
                label[0],
                num_classes - 1
            );
        }
        labels.push(label[0]);
        images.extend_from_slice(pixels);
    }
    Ok(())
}

/// Class names from `batches.meta.txt` (one per line, blank lines ignored), or the standard
/// names if the file is absent.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    if let Some(what) = not_a_file(path) {
        bail!(
            "{} {what}; it should be a text file with the 10 class names, one per line. Remove or \
             rename it (without it the standard names are used)",
            path.display()
        );
    }
    if !path.exists() {
        return Ok(DEFAULT_CLASS_NAMES.iter().map(|s| s.to_string()).collect());
    }
    let bytes = read_file(path)?;
    let text =
        String::from_utf8(bytes).map_err(|_| anyhow!("{}: not UTF-8 text; expected 10 class names", path.display()))?;
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if names.len() != DEFAULT_CLASS_NAMES.len() {
        bail!(
            "{}: expected {} class names (one per line) but found {}; fix or delete the file \
             (without it the standard names are used)",
            path.display(),
            DEFAULT_CLASS_NAMES.len(),
            names.len()
        );
    }
    Ok(names)
}

/// Writes `labels.len()` records in the exact CIFAR-10 binary format. `images` holds the
/// records' pixels back to back, each 3,072 bytes in planar R, G, B order. Any record count is
/// accepted (official files have 10,000).
pub fn write_cifar_batch(path: &Path, labels: &[u8], images: &[u8]) -> Result<()> {
    let expected = labels.len().checked_mul(IMAGE_BYTES).context("record count overflows")?;
    if images.len() != expected {
        bail!(
            "write_cifar_batch({}): {} labels need {expected} pixel bytes but {} were given",
            path.display(),
            labels.len(),
            images.len()
        );
    }
    let mut out = Vec::with_capacity(labels.len() * RECORD_BYTES);
    for (label, pixels) in labels.iter().zip(images.chunks_exact(IMAGE_BYTES)) {
        out.push(*label);
        out.extend_from_slice(pixels);
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}
