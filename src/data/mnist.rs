//! MNIST in the IDX format: `<data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte`,
//! each either gzipped (`.gz`) or raw.
//!
//! Every check here produces an error that names the file, says what is wrong with it and what
//! to do, because a half-downloaded or mislabeled data file otherwise shows up much later as a
//! baffling accuracy number. Nothing indexes unchecked into file contents, and header dimensions
//! are multiplied with overflow checks before anything is allocated.

use super::{dir_note, not_a_file, read_file, Dataset, Split, DATA_DIR_HINT};
use anyhow::{anyhow, bail, Result};
use byteorder::{BigEndian, ReadBytesExt};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Subdirectory of the data directory that holds the MNIST files.
pub const MNIST_SUBDIR: &str = "mnist";

pub const IMAGES_MAGIC: u32 = 0x0000_0803;
pub const LABELS_MAGIC: u32 = 0x0000_0801;
pub const NUM_CLASSES: usize = 10;

/// File base names (without `.gz`) in the order train images, train labels, test images,
/// test labels.
pub const FILE_NAMES: [&str; 4] =
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

/// Decompressed size cap. The real training images are 47 MB; the cap only exists so that a
/// hostile or corrupt `.gz` cannot exhaust memory.
const MAX_DECOMPRESSED: u64 = 1 << 30;

/// (images, labels) base names for a split.
pub fn split_files(split: Split) -> (&'static str, &'static str) {
    match split {
        Split::Train => (FILE_NAMES[0], FILE_NAMES[1]),
        Split::Test => (FILE_NAMES[2], FILE_NAMES[3]),
    }
}

/// The file for `base` in `dir`, preferring the gzipped form: that is what `rotvar fetch mnist`
/// writes and verifies, so it wins over a possibly stale raw copy.
pub fn locate(dir: &Path, base: &str) -> Option<PathBuf> {
    let gz = dir.join(format!("{base}.gz"));
    if gz.is_file() {
        return Some(gz);
    }
    let raw = dir.join(base);
    raw.is_file().then_some(raw)
}

/// The first of `<base>.gz` and `<base>` in `dir` that exists but is not a regular file (a
/// directory, say), with what it is instead. Only consulted when [`locate`] finds no file.
fn blocker(dir: &Path, base: &str) -> Option<(PathBuf, &'static str)> {
    [dir.join(format!("{base}.gz")), dir.join(base)].into_iter().find_map(|p| not_a_file(&p).map(|what| (p, what)))
}

pub fn class_names() -> Vec<String> {
    (0..NUM_CLASSES).map(|d| d.to_string()).collect()
}

/// Loads one MNIST split from `<data_dir>/mnist/`.
///
/// As a convenience, if that directory holds none of the split's files but `data_dir` itself
/// holds both, `data_dir` is used, so `--data-dir path/to/mnist` also works.
pub fn load_mnist(data_dir: &Path, split: Split) -> Result<Dataset> {
    let (images_name, labels_name) = split_files(split);
    let primary = data_dir.join(MNIST_SUBDIR);
    let in_primary =
        [images_name, labels_name].iter().any(|b| locate(&primary, b).is_some() || blocker(&primary, b).is_some());
    let in_parent = [images_name, labels_name].iter().all(|b| locate(data_dir, b).is_some());
    let dir = if !in_primary && in_parent { data_dir.to_path_buf() } else { primary };

    let images_path = locate(&dir, images_name);
    let labels_path = locate(&dir, labels_name);
    let (images_path, labels_path) = match (images_path, labels_path) {
        (Some(i), Some(l)) => (i, l),
        (i, l) => {
            let absent = [(i.is_none(), images_name), (l.is_none(), labels_name)];
            if let Some((path, what)) = absent.iter().filter(|(a, _)| *a).find_map(|(_, b)| blocker(&dir, b)) {
                bail!(
                    "MNIST {split} data: {} {what}; rotvar expects the IDX file {} there. Remove or \
                     rename it, then run `rotvar fetch mnist` (with the same --data-dir) to download \
                     the files, or copy them there by hand.\n{DATA_DIR_HINT}",
                    path.display(),
                    path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                );
            }
            let mut missing = Vec::new();
            if i.is_none() {
                missing.push(images_name);
            }
            if l.is_none() {
                missing.push(labels_name);
            }
            return Err(missing_files_error(&dir, split, &missing));
        }
    };

    let images_what = images_path.display().to_string();
    let labels_what = labels_path.display().to_string();
    let image_bytes = decode_maybe_gzip(read_file(&images_path)?, &images_what)?;
    let (n, rows, cols, images) = parse_idx_images(&image_bytes, &images_what)?;
    drop(image_bytes);
    let label_bytes = decode_maybe_gzip(read_file(&labels_path)?, &labels_what)?;
    let labels = parse_idx_labels(&label_bytes, &labels_what)?;

    build_dataset("mnist", split, n, rows, cols, images, labels, &images_what, &labels_what)
}

/// Cross-file checks shared by the on-disk loader and the bundled sample.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_dataset(
    name: &str,
    split: Split,
    n: usize,
    rows: usize,
    cols: usize,
    images: Vec<u8>,
    labels: Vec<u8>,
    images_what: &str,
    labels_what: &str,
) -> Result<Dataset> {
    if labels.len() != n {
        bail!(
            "label count mismatch: {images_what} holds {n} images but {labels_what} holds {} \
             labels; both files must come from the same split of the same download \
             (re-download them with `rotvar fetch mnist`)",
            labels.len()
        );
    }
    if n == 0 {
        bail!("{images_what} holds no images (its header declares a count of 0)");
    }
    Ok(Dataset {
        name: name.to_string(),
        split,
        images,
        labels,
        n,
        channels: 1,
        height: rows,
        width: cols,
        class_names: class_names(),
    })
}

fn missing_files_error(dir: &Path, split: Split, missing: &[&str]) -> anyhow::Error {
    let list: Vec<String> = missing.iter().map(|b| format!("{b}.gz")).collect();
    let dir_note = dir_note(dir);
    anyhow!(
        "MNIST {split} data not found: missing {} in {}{dir_note}. Each file may also be \
         stored uncompressed, without the .gz suffix.\n\
         To fix: run `rotvar fetch mnist` (with the same --data-dir) to download and verify the \
         files, or copy them into that directory by hand, or use `--dataset mnist-sample` for \
         the bundled real MNIST subset (5,000 train / 1,000 test images).\n{DATA_DIR_HINT}",
        list.join(" and "),
        dir.display()
    )
}

/// Returns `bytes` decompressed if they are gzip data, unchanged otherwise.
///
/// The format is sniffed from the content rather than the file name because browsers often
/// decompress a download but keep its `.gz` name; such a file is still perfectly good.
pub fn decode_maybe_gzip(bytes: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes.as_slice()).take(MAX_DECOMPRESSED + 1).read_to_end(&mut out).map_err(
        |e| {
            anyhow!(
                "{what}: corrupt gzip data ({e}); the file is damaged or was only partly \
                 downloaded. Delete it and re-download it (`rotvar fetch mnist`)"
            )
        },
    )?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        bail!(
            "{what}: gzip data decompresses to more than {} MiB, far more than any MNIST file; \
             the file is corrupt or not MNIST",
            MAX_DECOMPRESSED >> 20
        );
    }
    Ok(out)
}

/// Parses an IDX3 unsigned-byte image file (already decompressed). Returns
/// `(count, rows, cols, pixels)`. `what` names the file in error messages.
pub fn parse_idx_images(bytes: &[u8], what: &str) -> Result<(usize, usize, usize, Vec<u8>)> {
    let (dims, data) = parse_idx(bytes, what, IMAGES_MAGIC, "images")?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if n > 0 && (rows == 0 || cols == 0) {
        bail!("{what}: header declares {n} images of {rows}x{cols} pixels; images cannot be empty");
    }
    Ok((n, rows, cols, data.to_vec()))
}

/// Parses an IDX1 unsigned-byte label file (already decompressed) and checks every label is a
/// digit 0..9. `what` names the file in error messages.
pub fn parse_idx_labels(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    let (_, data) = parse_idx(bytes, what, LABELS_MAGIC, "labels")?;
    if let Some((i, &l)) = data.iter().enumerate().find(|(_, &l)| l as usize >= NUM_CLASSES) {
        bail!(
            "{what}: label {l} at index {i} is out of range (MNIST labels are 0..9); the file is \
             corrupt or not an MNIST label file. Re-download it (`rotvar fetch mnist`)"
        );
    }
    Ok(data.to_vec())
}

/// Validates an IDX header against `magic` and the file length; returns the dimensions and the
/// exact data slice.
fn parse_idx<'a>(bytes: &'a [u8], what: &str, magic: u32, kind: &str) -> Result<(Vec<usize>, &'a [u8])> {
    let redownload = "Re-download it with `rotvar fetch mnist`";
    let want_rank = (magic & 0xff) as usize;
    let mut header = bytes;
    let found = match header.read_u32::<BigEndian>() {
        Ok(m) => m,
        Err(_) => bail!(
            "{what}: truncated header: the file is only {} bytes, too short to hold an IDX \
             header (it is empty, incomplete or not an MNIST file). {redownload}",
            bytes.len()
        ),
    };
    // IDX magic: two zero bytes, a type code (0x08 = unsigned byte), then the rank.
    if found & 0xffff_ff00 != magic & 0xffff_ff00 {
        let gz = if bytes.starts_with(&[0x1f, 0x8b]) { " The data is still gzip-compressed." } else { "" };
        bail!(
            "{what}: bad magic number 0x{found:08x}, expected 0x{magic:08x} (IDX unsigned-byte \
             {kind}); this is neither an MNIST IDX file nor gzip data, or it is corrupt.{gz} \
             {redownload}"
        );
    }
    let rank = (found & 0xff) as usize;
    if rank != want_rank {
        let looks_like = match rank {
            1 => " (it looks like a labels file)",
            3 => " (it looks like an images file)",
            _ => "",
        };
        bail!(
            "{what}: wrong rank: magic 0x{found:08x} declares {rank} dimension(s), but MNIST \
             {kind} need {want_rank}{looks_like}. Check that the file names are not swapped, \
             or re-download it with `rotvar fetch mnist`"
        );
    }
    let header_len = 4 + 4 * rank;
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        match header.read_u32::<BigEndian>() {
            Ok(d) => dims.push(d as usize),
            Err(_) => bail!(
                "{what}: truncated header: the file is {} bytes but its {rank}-dimensional IDX \
                 header alone needs {header_len}. {redownload}",
                bytes.len()
            ),
        }
    }
    let dims_text = dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| {
        anyhow!(
            "{what}: header dimensions {dims_text} are impossibly large (their product \
                 overflows); the file is corrupt. {redownload}"
        )
    })?;
    let actual = header.len();
    if actual < expected {
        bail!(
            "{what}: truncated: the header declares {dims_text} {kind} = {expected} data bytes \
             but only {actual} follow; the file is incomplete. Delete it and re-download it \
             (`rotvar fetch mnist`)"
        );
    }
    if actual > expected {
        bail!(
            "{what}: too long: {} unexpected bytes follow the {expected} data bytes that the \
             header declares ({dims_text} {kind}); the header and the data disagree, so the file \
             is corrupt. {redownload}",
            actual - expected
        );
    }
    Ok((dims, header))
}
