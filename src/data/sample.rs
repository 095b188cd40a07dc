//! A bundled subset of the real MNIST: the first 5,000 training and the first 1,000 test
//! images/labels, byte-for-byte prefixes of the official files, stored as gzipped IDX files in
//! `src/data/mnist_sample/` and compiled into the binary.
//!
//! It exists so that rotvar runs (and its tests exercise real digits) with no download at all.
//! The IDX headers are rewritten to the sample counts; everything after the header is an exact
//! prefix of the official data, which the `mnist_sample_is_prefix_of_real_mnist` test checks.
//!
//! To regenerate the files (deterministic: gzip level 9, no file name, mtime 0):
//!
//! ```text
//! cargo test --test data_loaders -- --ignored regenerate_mnist_sample
//! ```
//!
//! which reads the real files from `$ROTVAR_MNIST_SOURCE`, else from the MNIST folder the test
//! suite uses (see `tests/data_loaders.rs`), and calls [`write_sample_files`].

use super::mnist::{build_dataset, decode_maybe_gzip, parse_idx_images, parse_idx_labels};
use super::{Dataset, Split};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

pub const SAMPLE_TRAIN_LEN: usize = 5_000;
pub const SAMPLE_TEST_LEN: usize = 1_000;

const TRAIN_IMAGES: &[u8] = include_bytes!("mnist_sample/train-images-idx3-ubyte.gz");
const TRAIN_LABELS: &[u8] = include_bytes!("mnist_sample/train-labels-idx1-ubyte.gz");
const TEST_IMAGES: &[u8] = include_bytes!("mnist_sample/t10k-images-idx3-ubyte.gz");
const TEST_LABELS: &[u8] = include_bytes!("mnist_sample/t10k-labels-idx1-ubyte.gz");

/// Loads the bundled sample (name `"mnist-sample"`): 5,000 training or 1,000 test images.
pub fn load_mnist_sample(split: Split) -> Result<Dataset> {
    let (images_gz, labels_gz, want, prefix) = match split {
        Split::Train => (TRAIN_IMAGES, TRAIN_LABELS, SAMPLE_TRAIN_LEN, "train"),
        Split::Test => (TEST_IMAGES, TEST_LABELS, SAMPLE_TEST_LEN, "t10k"),
    };
    // The data is compiled in, so failures here mean a broken build, not a user mistake; the
    // messages still say which embedded file is at fault.
    let images_what = format!("bundled mnist-sample {prefix}-images-idx3-ubyte.gz");
    let labels_what = format!("bundled mnist-sample {prefix}-labels-idx1-ubyte.gz");
    let image_bytes = decode_maybe_gzip(images_gz.to_vec(), &images_what)?;
    let (n, rows, cols, images) = parse_idx_images(&image_bytes, &images_what)?;
    let label_bytes = decode_maybe_gzip(labels_gz.to_vec(), &labels_what)?;
    let labels = parse_idx_labels(&label_bytes, &labels_what)?;
    if n != want {
        bail!("{images_what} holds {n} images, expected {want}; regenerate the sample");
    }
    build_dataset("mnist-sample", split, n, rows, cols, images, labels, &images_what, &labels_what)
}

/// Writes the four sample files into `out_dir` from the official (gzipped or raw) MNIST files in
/// `source_dir`. Each output is the source's header with its count replaced, followed by the
/// first records of the source's data, gzipped deterministically.
pub fn write_sample_files(source_dir: &Path, out_dir: &Path) -> Result<()> {
    let jobs = [
        ("train-images-idx3-ubyte", SAMPLE_TRAIN_LEN),
        ("train-labels-idx1-ubyte", SAMPLE_TRAIN_LEN),
        ("t10k-images-idx3-ubyte", SAMPLE_TEST_LEN),
        ("t10k-labels-idx1-ubyte", SAMPLE_TEST_LEN),
    ];
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    for (base, count) in jobs {
        let path = super::mnist::locate(source_dir, base)
            .with_context(|| format!("{base}(.gz) not found in {}", source_dir.display()))?;
        let what = path.display().to_string();
        let bytes = decode_maybe_gzip(super::read_file(&path)?, &what)?;
        let idx = if base.contains("images") {
            let (n, rows, cols, pixels) = parse_idx_images(&bytes, &what)?;
            if n < count {
                bail!("{what} holds only {n} images, fewer than the {count} the sample needs");
            }
            let mut idx = Vec::new();
            for v in [0x0803u32, count as u32, rows as u32, cols as u32] {
                idx.extend_from_slice(&v.to_be_bytes());
            }
            idx.extend_from_slice(&pixels[..count * rows * cols]);
            idx
        } else {
            let labels = parse_idx_labels(&bytes, &what)?;
            if labels.len() < count {
                bail!("{what} holds only {} labels, fewer than {count}", labels.len());
            }
            let mut idx = Vec::new();
            for v in [0x0801u32, count as u32] {
                idx.extend_from_slice(&v.to_be_bytes());
            }
            idx.extend_from_slice(&labels[..count]);
            idx
        };
        let out_path = out_dir.join(format!("{base}.gz"));
        let file = std::fs::File::create(&out_path).with_context(|| format!("cannot create {}", out_path.display()))?;
        // mtime 0 and no embedded file name, like `gzip -n`, so regenerating gives the same bytes.
        let mut gz = flate2::GzBuilder::new().mtime(0).write(file, flate2::Compression::best());
        gz.write_all(&idx)?;
        gz.finish()?.sync_all()?;
    }
    Ok(())
}
