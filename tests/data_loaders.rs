//! Dataset loaders: valid round trips, every class of corrupt input, the bundled sample, the
//! real MNIST files when present, and `fetch` against unreachable and local mirrors.
//!
//! Test files are written into temporary directories by the helpers below; the real MNIST tests
//! read `../shared/datasets/mnist` (relative to the crate) or `/work/shared/datasets/mnist` and
//! print a note and return when neither exists.

mod formats;
use formats::{gzip, idx_images, idx_labels};
use rotvar::data::cifar::{load_cifar10, write_cifar_batch};
use rotvar::data::fetch::{fetch_mnist_from, sha256_hex, verify_mnist, MNIST_SHA256};
use rotvar::data::mnist::{load_mnist, parse_idx_images, parse_idx_labels};
use rotvar::data::sample::{load_mnist_sample, write_sample_files};
use rotvar::data::{load, resolve_data_dir, Dataset, Normalization, Split, DATASETS};

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

/// What a small synthetic MNIST split contains.
struct Split3 {
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

const ROWS: usize = 28;
const COLS: usize = 28;

fn synthetic_split(n: usize, seed: u64) -> Split3 {
    Split3 {
        pixels: pseudo_random(n * ROWS * COLS, seed),
        labels: (0..n).map(|i| ((i * 7 + seed as usize) % 10) as u8).collect(),
    }
}

/// Writes valid train (12 records) and test (5 records) MNIST files into `<data_dir>/mnist/`,
/// gzipped or raw. Returns (train, test) contents.
fn write_mnist(data_dir: &Path, gz: bool) -> (Split3, Split3) {
    let dir = data_dir.join("mnist");
    std::fs::create_dir_all(&dir).unwrap();
    let train = synthetic_split(12, 1);
    let test = synthetic_split(5, 2);
    for (prefix, split) in [("train", &train), ("t10k", &test)] {
        let n = split.labels.len() as u32;
        let files = [
            (format!("{prefix}-images-idx3-ubyte"), idx_images(n, 28, 28, &split.pixels)),
            (format!("{prefix}-labels-idx1-ubyte"), idx_labels(&split.labels)),
        ];
        for (name, bytes) in files {
            if gz {
                std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
    (train, test)
}

/// Overwrites one raw MNIST file (base name, no `.gz`) in `<data_dir>/mnist/`.
fn put(data_dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = data_dir.join("mnist").join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_contains(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "expected {needle:?} in error message:\n{text}");
    }
}

/// Error of loading the train split after the caller corrupted one file.
fn train_err(data_dir: &Path) -> String {
    err_text(load_mnist(data_dir, Split::Train))
}

/// The real MNIST directory, if available.
fn real_mnist_dir() -> Option<PathBuf> {
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/mnist"),
        PathBuf::from("/work/shared/datasets/mnist"),
    ];
    let found =
        candidates.into_iter().find(|d| MNIST_SHA256.iter().all(|(base, _)| d.join(format!("{base}.gz")).is_file()));
    if found.is_none() {
        eprintln!("NOTE: real MNIST not found (../shared/datasets/mnist); skipping this test");
    }
    found
}

// ---------------------------------------------------------------- MNIST: valid files

fn check_roundtrip(gz: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let (train, test) = write_mnist(tmp.path(), gz);
    for (split, want) in [(Split::Train, &train), (Split::Test, &test)] {
        let ds = load_mnist(tmp.path(), split).unwrap();
        assert_eq!(ds.name, "mnist");
        assert_eq!(ds.split, split);
        assert_eq!(ds.n, want.labels.len());
        assert_eq!((ds.channels, ds.height, ds.width), (1, 28, 28));
        assert_eq!(ds.images, want.pixels);
        assert_eq!(ds.labels, want.labels);
        let names: Vec<String> = (0..10).map(|d| d.to_string()).collect();
        assert_eq!(ds.class_names, names);
    }
}

#[test]
fn mnist_raw_roundtrip() {
    check_roundtrip(false);
}

#[test]
fn mnist_gz_roundtrip() {
    check_roundtrip(true);
}

#[test]
fn mnist_gz_preferred_over_stale_raw_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), true);
    put(tmp.path(), "train-images-idx3-ubyte", b"stale garbage");
    let ds = load_mnist(tmp.path(), Split::Train).unwrap();
    assert_eq!(ds.images, train.pixels);
}

#[test]
fn mnist_gz_name_with_raw_content_is_accepted() {
    // Browsers often decompress a download but keep the .gz name.
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), true);
    let n = train.labels.len() as u32;
    put(tmp.path(), "train-images-idx3-ubyte.gz", &idx_images(n, 28, 28, &train.pixels));
    let ds = load_mnist(tmp.path(), Split::Train).unwrap();
    assert_eq!(ds.images, train.pixels);
}

#[test]
fn mnist_files_directly_in_data_dir_are_found() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, test) = write_mnist(tmp.path(), true);
    let ds = load_mnist(&tmp.path().join("mnist"), Split::Test).unwrap();
    assert_eq!(ds.labels, test.labels);
}

#[test]
fn mnist_non_square_images_keep_their_shape() {
    let tmp = tempfile::tempdir().unwrap();
    write_mnist(tmp.path(), false);
    let pixels = pseudo_random(3 * 4 * 5, 9);
    put(tmp.path(), "t10k-images-idx3-ubyte", &idx_images(3, 4, 5, &pixels));
    put(tmp.path(), "t10k-labels-idx1-ubyte", &idx_labels(&[0, 9, 4]));
    let ds = load_mnist(tmp.path(), Split::Test).unwrap();
    assert_eq!((ds.n, ds.height, ds.width, ds.image_len()), (3, 4, 5, 20));
    assert_eq!(ds.images, pixels);
}

// ---------------------------------------------------------------- MNIST: corrupt files

#[test]
fn mnist_bad_magic_images() {
    let tmp = tempfile::tempdir().unwrap();
    write_mnist(tmp.path(), false);
    let mut bytes = idx_images(2, 28, 28, &[0; 2 * 784]);
    bytes[..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    put(tmp.path(), "train-images-idx3-ubyte", &bytes);
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-images-idx3-ubyte", "bad magic", "0x12345678", "0x00000803"]);
}

#[test]
fn mnist_bad_magic_labels() {
    let tmp = tempfile::tempdir().unwrap();
    write_mnist(tmp.path(), false);
    let mut bytes = idx_labels(&[0; 12]);
    bytes[2] = 0x0d; // IDX type code for float instead of unsigned byte
    put(tmp.path(), "train-labels-idx1-ubyte", &bytes);
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-labels-idx1-ubyte", "bad magic", "0x00000d01", "0x00000801"]);
}

#[test]
fn mnist_wrong_rank_swapped_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), false);
    // A labels file where the images should be, and vice versa.
    put(tmp.path(), "train-images-idx3-ubyte", &idx_labels(&train.labels));
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-images-idx3-ubyte", "wrong rank", "1 dimension", "labels file"]);

    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), false);
    let n = train.labels.len() as u32;
    put(tmp.path(), "train-labels-idx1-ubyte", &idx_images(n, 28, 28, &train.pixels));
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-labels-idx1-ubyte", "wrong rank", "3 dimension", "images file"]);
}

#[test]
fn mnist_truncated_pixel_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), false);
    let n = train.labels.len() as u32;
    let bytes = idx_images(n, 28, 28, &train.pixels);
    put(tmp.path(), "train-images-idx3-ubyte", &bytes[..bytes.len() - 100]);
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-images-idx3-ubyte", "truncated", "9408 data bytes", "9308"]);
}

#[test]
fn mnist_truncated_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), false);
    let bytes = idx_labels(&train.labels);
    put(tmp.path(), "train-labels-idx1-ubyte", &bytes[..bytes.len() - 1]);
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-labels-idx1-ubyte", "truncated"]);
}

#[test]
fn mnist_truncated_header() {
    for len in [0usize, 2, 4, 9, 15] {
        let tmp = tempfile::tempdir().unwrap();
        write_mnist(tmp.path(), false);
        let bytes = idx_images(12, 28, 28, &[]);
        put(tmp.path(), "train-images-idx3-ubyte", &bytes[..len]);
        let e = train_err(tmp.path());
        assert_contains(&e, &["train-images-idx3-ubyte", "truncated header"]);
    }
}

#[test]
fn mnist_too_long() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), false);
    let n = train.labels.len() as u32;
    let mut bytes = idx_images(n, 28, 28, &train.pixels);
    bytes.extend_from_slice(&[0; 784]);
    put(tmp.path(), "train-images-idx3-ubyte", &bytes);
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-images-idx3-ubyte", "too long", "784 unexpected bytes"]);

    let mut labels = idx_labels(&train.labels);
    labels.push(3);
    let e = err_text(parse_idx_labels(&labels, "some-labels-file"));
    assert_contains(&e, &["some-labels-file", "too long", "1 unexpected bytes"]);
}

#[test]
fn mnist_count_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), true);
    put(tmp.path(), "train-labels-idx1-ubyte.gz", &gzip(&idx_labels(&train.labels[..11])));
    let e = train_err(tmp.path());
    assert_contains(
        &e,
        &[
            "label count mismatch",
            "train-images-idx3-ubyte.gz holds 12 images",
            "train-labels-idx1-ubyte.gz holds 11 labels",
        ],
    );
}

#[test]
fn mnist_label_out_of_range() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), false);
    let mut labels = train.labels.clone();
    labels[5] = 10;
    put(tmp.path(), "train-labels-idx1-ubyte", &idx_labels(&labels));
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-labels-idx1-ubyte", "label 10 at index 5", "out of range"]);
}

#[test]
fn mnist_zero_images_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    write_mnist(tmp.path(), false);
    put(tmp.path(), "train-images-idx3-ubyte", &idx_images(0, 28, 28, &[]));
    put(tmp.path(), "train-labels-idx1-ubyte", &idx_labels(&[]));
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-images-idx3-ubyte", "no images"]);
}

#[test]
fn mnist_corrupt_gzip() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), true);
    let n = train.labels.len() as u32;
    let good = gzip(&idx_images(n, 28, 28, &train.pixels));

    // Damaged in the middle: the deflate stream or the CRC check fails.
    let mut damaged = good.clone();
    let mid = damaged.len() / 2;
    for b in &mut damaged[mid..mid + 16] {
        *b ^= 0x5a;
    }
    put(tmp.path(), "train-images-idx3-ubyte.gz", &damaged);
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-images-idx3-ubyte.gz", "corrupt gzip"]);

    // Cut short, as by an interrupted download.
    put(tmp.path(), "train-images-idx3-ubyte.gz", &good[..good.len() / 2]);
    let e = train_err(tmp.path());
    assert_contains(&e, &["train-images-idx3-ubyte.gz", "corrupt gzip"]);
}

#[test]
fn mnist_missing_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let e = train_err(tmp.path());
    let dir = tmp.path().join("mnist").display().to_string();
    assert_contains(
        &e,
        &[
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            &dir,
            "does not exist",
            "rotvar fetch mnist",
            "--dataset mnist-sample",
            "--data-dir",
            "ROTVAR_DATA",
        ],
    );
    assert!(!e.contains("t10k"), "test files are irrelevant to the train split:\n{e}");

    // Only the one absent file is named.
    write_mnist(tmp.path(), true);
    std::fs::remove_file(tmp.path().join("mnist/t10k-labels-idx1-ubyte.gz")).unwrap();
    let e = err_text(load_mnist(tmp.path(), Split::Test));
    assert_contains(&e, &["t10k-labels-idx1-ubyte.gz", &dir, "rotvar fetch mnist"]);
    assert!(!e.contains("t10k-images"), "images are present, must not be named:\n{e}");
    assert!(!e.contains("does not exist"), "the directory exists:\n{e}");
}

#[test]
fn idx_huge_dimensions_do_not_overflow_or_allocate() {
    let m = u32::MAX;
    // Product overflows 64 bits.
    let e = err_text(parse_idx_images(&idx_images(m, m, m, &[1, 2, 3]), "huge"));
    assert_contains(&e, &["huge", "impossibly large"]);
    // Product fits but vastly exceeds the data: must be reported, not allocated.
    let e = err_text(parse_idx_images(&idx_images(m, 28, 28, &[1, 2, 3]), "big"));
    assert_contains(&e, &["big", "truncated"]);
    let e = err_text(parse_idx_images(&idx_images(2, 0, 28, &[]), "flat"));
    assert_contains(&e, &["flat", "cannot be empty"]);
}

#[test]
fn idx_parsers_never_panic_on_prefixes_or_mutations() {
    let images = idx_images(3, 4, 4, &pseudo_random(48, 3));
    let labels = idx_labels(&[1, 2, 3, 4]);
    // Every strict prefix is invalid; the full file is valid.
    for len in 0..images.len() {
        assert!(parse_idx_images(&images[..len], "p").is_err(), "prefix {len} accepted");
    }
    assert_eq!(parse_idx_images(&images, "p").unwrap().0, 3);
    for len in 0..labels.len() {
        assert!(parse_idx_labels(&labels[..len], "p").is_err(), "prefix {len} accepted");
    }
    // Random header mutations: any result is fine as long as an Ok is self-consistent.
    let noise = pseudo_random(4000, 11);
    for chunk in noise.chunks_exact(4) {
        let mut bytes = images.clone();
        let pos = chunk[0] as usize % 16;
        bytes[pos] = chunk[1];
        bytes[(pos + chunk[2] as usize) % 16] ^= chunk[3];
        if let Ok((n, r, c, px)) = parse_idx_images(&bytes, "m") {
            assert_eq!(px.len(), n * r * c);
        }
        let mut l = labels.clone();
        l[pos % 12] = chunk[1];
        if let Ok(v) = parse_idx_labels(&l, "m") {
            assert!(v.iter().all(|&x| x <= 9));
        }
    }
}

// ---------------------------------------------------------------- CIFAR-10

/// Writes a cifar-10-batches-bin directory with `train_sizes` records in the five train batches
/// and `test_size` in the test batch. Returns (train labels, train pixels, test labels, test
/// pixels) in file order.
fn write_cifar(
    data_dir: &Path,
    train_sizes: [usize; 5],
    test_size: usize,
    meta: Option<&str>,
) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let dir = data_dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let (mut train_labels, mut train_pixels) = (Vec::new(), Vec::new());
    for (i, &n) in train_sizes.iter().enumerate() {
        let labels: Vec<u8> = (0..n).map(|k| ((k + 3 * i) % 10) as u8).collect();
        let pixels = pseudo_random(n * 3072, 100 + i as u64);
        write_cifar_batch(&dir.join(format!("data_batch_{}.bin", i + 1)), &labels, &pixels).unwrap();
        train_labels.extend_from_slice(&labels);
        train_pixels.extend_from_slice(&pixels);
    }
    let test_labels: Vec<u8> = (0..test_size).map(|k| (9 - k % 10) as u8).collect();
    let test_pixels = pseudo_random(test_size * 3072, 200);
    write_cifar_batch(&dir.join("test_batch.bin"), &test_labels, &test_pixels).unwrap();
    if let Some(meta) = meta {
        std::fs::write(dir.join("batches.meta.txt"), meta).unwrap();
    }
    (train_labels, train_pixels, test_labels, test_pixels)
}

const META: &str = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n\n";

#[test]
fn cifar_batch_has_exact_binary_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("b.bin");
    // Image k: R plane all 10k+1, G plane all 10k+2, B plane all 10k+3.
    let mut pixels = Vec::new();
    for k in 0..2u8 {
        for c in 1..=3u8 {
            pixels.extend(std::iter::repeat_n(10 * k + c, 1024));
        }
    }
    write_cifar_batch(&path, &[7, 4], &pixels).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 2 * 3073);
    assert_eq!(bytes[0], 7);
    assert_eq!((bytes[1], bytes[1024], bytes[1025], bytes[2049], bytes[3072]), (1, 1, 2, 3, 3));
    assert_eq!(bytes[3073], 4);
    assert_eq!((bytes[3074], bytes[3073 + 1025], bytes[3073 + 3072]), (11, 12, 13));

    let e = err_text(write_cifar_batch(&path, &[1, 2], &pixels[..3072]));
    assert_contains(&e, &["2 labels need 6144 pixel bytes", "3072"]);
}

#[test]
fn cifar_roundtrip_train_concatenates_five_batches_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let custom = META.replace("cat", "kitty");
    let (tl, tp, sl, sp) = write_cifar(tmp.path(), [3, 1, 4, 1, 5], 6, Some(&custom));
    let train = load_cifar10(tmp.path(), Split::Train).unwrap();
    assert_eq!(train.name, "cifar10");
    assert_eq!(train.split, Split::Train);
    assert_eq!((train.n, train.channels, train.height, train.width), (14, 3, 32, 32));
    assert_eq!(train.labels, tl);
    assert_eq!(train.images, tp);
    assert_eq!(train.class_names[3], "kitty");
    assert_eq!(train.num_classes(), 10);

    let test = load_cifar10(tmp.path(), Split::Test).unwrap();
    assert_eq!((test.n, test.split), (6, Split::Test));
    assert_eq!(test.labels, sl);
    assert_eq!(test.images, sp);
    // The planar layout is kept: pixel (c=1, y=2, x=5) of image 4.
    assert_eq!(test.images[4 * 3072 + 1024 + 2 * 32 + 5], sp[4 * 3072 + 1024 + 69]);
}

#[test]
fn cifar_without_meta_uses_standard_names() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar(tmp.path(), [1; 5], 1, None);
    let ds = load_cifar10(tmp.path(), Split::Test).unwrap();
    let want: Vec<String> = META.split_whitespace().map(String::from).collect();
    assert_eq!(ds.class_names, want);
}

#[test]
fn cifar_files_directly_in_data_dir_are_found() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, _, sl, _) = write_cifar(tmp.path(), [1; 5], 2, Some(META));
    let ds = load_cifar10(&tmp.path().join("cifar-10-batches-bin"), Split::Test).unwrap();
    assert_eq!(ds.labels, sl);
}

#[test]
fn cifar_bad_length_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar(tmp.path(), [2; 5], 2, Some(META));
    let path = tmp.path().join("cifar-10-batches-bin/data_batch_4.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&path, bytes).unwrap();
    let e = err_text(load_cifar10(tmp.path(), Split::Train));
    assert_contains(&e, &["data_batch_4.bin", "not a multiple of the 3073-byte", "1 whole records"]);

    std::fs::write(&path, b"").unwrap();
    let e = err_text(load_cifar10(tmp.path(), Split::Train));
    assert_contains(&e, &["data_batch_4.bin", "empty"]);
}

#[test]
fn cifar_label_out_of_range_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar(tmp.path(), [1; 5], 3, Some(META));
    let path = tmp.path().join("cifar-10-batches-bin/test_batch.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[2 * 3073] = 10;
    std::fs::write(&path, bytes).unwrap();
    let e = err_text(load_cifar10(tmp.path(), Split::Test));
    assert_contains(&e, &["test_batch.bin", "record 2 has label 10"]);
}

#[test]
fn cifar_missing_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let e = err_text(load_cifar10(tmp.path(), Split::Test));
    assert_contains(&e, &["test_batch.bin", "does not exist", "cifar-10-binary.tar.gz", "ROTVAR_DATA"]);

    write_cifar(tmp.path(), [1; 5], 1, Some(META));
    std::fs::remove_file(tmp.path().join("cifar-10-batches-bin/data_batch_3.bin")).unwrap();
    let e = err_text(load_cifar10(tmp.path(), Split::Train));
    assert_contains(&e, &["missing data_batch_3.bin in", "cifar-10-batches-bin"]);
    assert!(!e.contains("data_batch_2"), "present files must not be named:\n{e}");
}

#[test]
fn cifar_meta_with_wrong_count_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar(tmp.path(), [1; 5], 1, Some("cat\ndog\n"));
    let e = err_text(load_cifar10(tmp.path(), Split::Test));
    assert_contains(&e, &["batches.meta.txt", "expected 10 class names", "found 2"]);
}

// ---------------------------------------------------------------- Dataset methods

/// Mean and population std per channel computed the obvious two-pass way.
fn direct_stats(ds: &Dataset) -> (Vec<f64>, Vec<f64>) {
    let plane = ds.height * ds.width;
    let mut means = Vec::new();
    let mut stds = Vec::new();
    for c in 0..ds.channels {
        let values: Vec<f64> = (0..ds.n)
            .flat_map(|i| {
                let start = (i * ds.channels + c) * plane;
                ds.images[start..start + plane].iter().map(|&p| p as f64 / 255.0)
            })
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / values.len() as f64;
        means.push(mean);
        stds.push(var.sqrt());
    }
    (means, stds)
}

fn cifar_with_channel_offsets() -> Dataset {
    // Channels get different distributions so a channel mix-up cannot go unnoticed.
    let n = 7;
    let mut images = pseudo_random(n * 3072, 42);
    for (i, p) in images.iter_mut().enumerate() {
        match (i % 3072) / 1024 {
            0 => *p /= 4,
            1 => *p = 128 + *p / 2,
            _ => {}
        }
    }
    Dataset {
        name: "cifar10".into(),
        split: Split::Train,
        images,
        labels: (0..n as u8).collect(),
        n,
        channels: 3,
        height: 32,
        width: 32,
        class_names: META.split_whitespace().map(String::from).collect(),
    }
}

#[test]
fn channel_stats_match_direct_computation() {
    let ds = cifar_with_channel_offsets();
    let stats = ds.channel_stats();
    let (mean, std) = direct_stats(&ds);
    assert_eq!(stats.mean.len(), 3);
    for c in 0..3 {
        assert!((stats.mean[c] as f64 - mean[c]).abs() < 1e-6, "mean[{c}]");
        assert!((stats.std[c] as f64 - std[c]).abs() < 1e-6, "std[{c}]");
    }
    assert!(stats.mean[0] < 0.13 && stats.mean[1] > 0.7, "channels mixed up: {stats:?}");
}

#[test]
fn to_f32_normalized_matches_formula() {
    let ds = cifar_with_channel_offsets();
    let norm = ds.channel_stats();
    let out = ds.to_f32_normalized(&norm);
    assert_eq!(out.len(), ds.n * 3072);
    for (i, (&p, &v)) in ds.images.iter().zip(&out).enumerate() {
        let c = (i % 3072) / 1024;
        let want = (p as f64 / 255.0 - norm.mean[c] as f64) / norm.std[c] as f64;
        assert!((v as f64 - want).abs() < 1e-5, "element {i}: {v} vs {want}");
    }
    // Normalized with its own statistics: zero mean, unit std per channel.
    for c in 0..3 {
        let vals: Vec<f64> =
            out.chunks_exact(3072).flat_map(|im| im[c * 1024..(c + 1) * 1024].iter().map(|&v| v as f64)).collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let s = (vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / vals.len() as f64).sqrt();
        assert!(m.abs() < 1e-4 && (s - 1.0).abs() < 1e-4, "channel {c}: mean {m}, std {s}");
    }
}

#[test]
fn constant_channel_normalizes_to_finite_values() {
    let mut ds = cifar_with_channel_offsets();
    ds.images.iter_mut().for_each(|p| *p = 51);
    let norm = ds.channel_stats();
    assert!((norm.mean[2] - 0.2).abs() < 1e-7);
    assert_eq!(norm.std, vec![0.0; 3]);
    assert!(ds.to_f32_normalized(&norm).iter().all(|v| v.abs() < 1e-6));
}

#[test]
fn normalization_with_wrong_channel_count_is_rejected() {
    let ds = cifar_with_channel_offsets();
    let norm = Normalization { mean: vec![0.5], std: vec![0.25] };
    let e = err_text(ds.try_to_f32_normalized(&norm));
    assert_contains(&e, &["1 means", "3 channel"]);
    let panicked = std::panic::catch_unwind(|| ds.to_f32_normalized(&norm)).is_err();
    assert!(panicked);
}

#[test]
fn normalization_serde_roundtrip() {
    let norm = Normalization { mean: vec![0.1307], std: vec![0.3081] };
    let json = serde_json::to_string(&norm).unwrap();
    assert_eq!(json, r#"{"mean":[0.1307],"std":[0.3081]}"#);
    assert_eq!(serde_json::from_str::<Normalization>(&json).unwrap(), norm);
}

#[test]
fn take_labels_counts_and_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = write_mnist(tmp.path(), false);
    let ds = load_mnist(tmp.path(), Split::Train).unwrap();
    assert_eq!((ds.len(), ds.is_empty(), ds.image_len(), ds.num_classes()), (12, false, 784, 10));
    assert_eq!(ds.labels_f32(), train.labels.iter().map(|&l| l as f32).collect::<Vec<_>>());

    let mut want = vec![0usize; 10];
    train.labels.iter().for_each(|&l| want[l as usize] += 1);
    assert_eq!(ds.class_counts(), want);

    let head = ds.take(5);
    assert_eq!((head.n, head.labels.len(), head.images.len()), (5, 5, 5 * 784));
    assert_eq!(head.images, train.pixels[..5 * 784]);
    assert_eq!(head.labels, train.labels[..5]);
    assert_eq!(head.name, "mnist");
    assert_eq!(ds.take(1000).n, 12);
    let none = ds.take(0);
    assert!(none.is_empty());
    assert_eq!(none.class_counts(), vec![0; 10]);
    assert_eq!(none.channel_stats(), Normalization { mean: vec![0.0], std: vec![1.0] });
}

// ---------------------------------------------------------------- dispatch and data dir

#[test]
fn load_dispatches_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, test) = write_mnist(tmp.path(), true);
    let (_, _, cifar_test_labels, _) = write_cifar(tmp.path(), [1; 5], 4, Some(META));
    assert_eq!(load("mnist", Split::Test, tmp.path()).unwrap().labels, test.labels);
    assert_eq!(load("cifar10", Split::Test, tmp.path()).unwrap().labels, cifar_test_labels);
    assert_eq!(load("mnist-sample", Split::Test, tmp.path()).unwrap().n, 1000);
    assert_eq!(DATASETS, &["mnist", "mnist-sample", "cifar10"]);
    let e = err_text(load("imagenet", Split::Train, tmp.path()));
    assert_contains(&e, &["imagenet", "mnist", "mnist-sample", "cifar10"]);
}

#[test]
fn resolve_data_dir_precedence() {
    // The only test that touches ROTVAR_DATA, so parallel tests cannot race on it.
    let cli = Path::new("/from/cli");
    std::env::set_var("ROTVAR_DATA", "/from/env");
    assert_eq!(resolve_data_dir(Some(cli)), PathBuf::from("/from/cli"));
    assert_eq!(resolve_data_dir(None), PathBuf::from("/from/env"));
    std::env::set_var("ROTVAR_DATA", "");
    assert_eq!(resolve_data_dir(None), PathBuf::from("./data"));
    std::env::remove_var("ROTVAR_DATA");
    assert_eq!(resolve_data_dir(None), PathBuf::from("./data"));
}

// ---------------------------------------------------------------- bundled sample

#[test]
fn mnist_sample_loads() {
    for (split, n) in [(Split::Train, 5000), (Split::Test, 1000)] {
        let ds = load_mnist_sample(split).unwrap();
        assert_eq!((ds.name.as_str(), ds.split, ds.n), ("mnist-sample", split, n));
        assert_eq!((ds.channels, ds.height, ds.width), (1, 28, 28));
        assert_eq!(ds.images.len(), n * 784);
        // Real digits: every class present in reasonable numbers, mostly-black images.
        let counts = ds.class_counts();
        assert!(counts.iter().all(|&c| c > n / 20), "{counts:?}");
        let mean = ds.channel_stats().mean[0];
        assert!((0.11..0.15).contains(&mean), "mean {mean}");
    }
    // Known first labels of the official files.
    assert_eq!(load_mnist_sample(Split::Train).unwrap().labels[..5], [5, 0, 4, 1, 9]);
    assert_eq!(load_mnist_sample(Split::Test).unwrap().labels[..5], [7, 2, 1, 0, 4]);
}

#[test]
fn mnist_sample_is_prefix_of_real_mnist() {
    let Some(real) = real_mnist_dir() else { return };
    for (split, prefix) in [(Split::Train, "train"), (Split::Test, "t10k")] {
        let sample = load_mnist_sample(split).unwrap();
        let images = gunzip(&std::fs::read(real.join(format!("{prefix}-images-idx3-ubyte.gz"))).unwrap());
        let labels = gunzip(&std::fs::read(real.join(format!("{prefix}-labels-idx1-ubyte.gz"))).unwrap());
        assert_eq!(sample.images[..], images[16..16 + sample.n * 784]);
        assert_eq!(sample.labels[..], labels[8..8 + sample.n]);
    }
}

/// Regenerates `src/data/mnist_sample/*.gz` from the real files. Run explicitly:
/// `cargo test --test data_loaders -- --ignored regenerate_mnist_sample`
/// (source: `$ROTVAR_MNIST_SOURCE`, else the real MNIST directory used by the tests).
#[test]
#[ignore]
fn regenerate_mnist_sample() {
    let source = std::env::var_os("ROTVAR_MNIST_SOURCE")
        .map(PathBuf::from)
        .or_else(real_mnist_dir)
        .expect("set ROTVAR_MNIST_SOURCE to a directory with the official MNIST files");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/data/mnist_sample");
    write_sample_files(&source, &out).unwrap();
    for entry in std::fs::read_dir(&out).unwrap() {
        let entry = entry.unwrap();
        eprintln!("{} {} bytes", entry.path().display(), entry.metadata().unwrap().len());
    }
}

#[test]
fn sample_generator_output_matches_bundled_content() {
    let Some(real) = real_mnist_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    write_sample_files(&real, tmp.path()).unwrap();
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/data/mnist_sample");
    for (base, _) in MNIST_SHA256 {
        let name = format!("{base}.gz");
        let fresh = gunzip(&std::fs::read(tmp.path().join(&name)).unwrap());
        let shipped = gunzip(&std::fs::read(bundled.join(&name)).unwrap());
        assert_eq!(fresh, shipped, "{name}: regenerate the sample");
    }
}

// ---------------------------------------------------------------- real MNIST

#[test]
fn real_mnist_loads_with_known_counts() {
    let Some(real) = real_mnist_dir() else { return };
    let data_dir = real.parent().unwrap();
    let train = load_mnist(data_dir, Split::Train).unwrap();
    assert_eq!((train.n, train.height, train.width), (60_000, 28, 28));
    assert_eq!(train.class_counts(), vec![5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]);
    // The widely quoted MNIST normalization constants.
    let stats = train.channel_stats();
    assert!((stats.mean[0] - 0.1307).abs() < 1e-4, "{stats:?}");
    assert!((stats.std[0] - 0.3081).abs() < 1e-4, "{stats:?}");

    let test = load_mnist(data_dir, Split::Test).unwrap();
    assert_eq!((test.n, test.height, test.width), (10_000, 28, 28));
    assert_eq!(test.class_counts().iter().sum::<usize>(), 10_000);
}

// ---------------------------------------------------------------- fetch and verify

#[test]
fn verify_reports_present_files_only() {
    let Some(real) = real_mnist_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnist");
    std::fs::create_dir_all(&dir).unwrap();
    assert!(verify_mnist(tmp.path()).unwrap().is_empty());

    // A valid gz copy, a valid raw copy, and a corrupted one.
    let copy = |base: &str| std::fs::read(real.join(format!("{base}.gz"))).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte.gz"), copy("train-labels-idx1-ubyte")).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), gunzip(&copy("t10k-labels-idx1-ubyte"))).unwrap();
    let mut bad = gunzip(&copy("t10k-images-idx3-ubyte"));
    bad[5000] ^= 1;
    std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), gzip(&bad)).unwrap();

    let report = verify_mnist(tmp.path()).unwrap();
    assert_eq!(
        report,
        vec![
            ("train-labels-idx1-ubyte.gz".to_string(), true),
            ("t10k-images-idx3-ubyte.gz".to_string(), false),
            ("t10k-labels-idx1-ubyte".to_string(), true),
        ]
    );
}

#[test]
fn hardcoded_hashes_match_shared_readme() {
    // Guards against a typo in the constants, which would make every fetch fail.
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/mnist/README.md");
    let readme = if readme.is_file() { readme } else { PathBuf::from("/work/shared/datasets/mnist/README.md") };
    let Ok(text) = std::fs::read_to_string(&readme) else {
        eprintln!("NOTE: shared MNIST README not found; skipping");
        return;
    };
    for (base, sha) in MNIST_SHA256 {
        let line = text.lines().find(|l| l.contains(&format!("{base}.gz"))).unwrap();
        assert!(line.contains(sha), "{base}: {sha} not in {line}");
    }
    assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

#[test]
fn fetch_offline_fails_quickly_and_explains() {
    let tmp = tempfile::tempdir().unwrap();
    // Port 1 on loopback refuses at once; `.invalid` never resolves (RFC 6761).
    let mirrors = ["http://127.0.0.1:1/mnist/", "http://mirror.invalid/mnist/"];
    let start = Instant::now();
    let e = err_text(fetch_mnist_from(tmp.path(), &mirrors));
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    let dir = tmp.path().join("mnist").display().to_string();
    assert_contains(
        &e,
        &[
            "http://127.0.0.1:1/mnist/train-images-idx3-ubyte.gz",
            "http://mirror.invalid/mnist/train-images-idx3-ubyte.gz",
            &dir,
            "t10k-labels-idx1-ubyte.gz",
            "mnist-sample",
            "--data-dir",
        ],
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("mnist")).unwrap().collect();
    assert!(left.is_empty(), "nothing may be written on failure: {left:?}");
}

/// A minimal HTTP/1.1 server on loopback answering GET `<path>` from `routes` (404 otherwise).
/// Returns its base URL and a counter of requests served.
fn serve(routes: Vec<(String, Vec<u8>)>) -> (String, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => request.extend_from_slice(&buf[..k]),
                }
            }
            let text = String::from_utf8_lossy(&request);
            let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, body) = match routes.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => ("200 OK", body.as_slice()),
                None => ("404 Not Found", &b"not here"[..]),
            };
            let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        }
    });
    (base, hits)
}

#[test]
fn fetch_rejects_content_with_wrong_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = gzip(&idx_labels(&[1, 2, 3]));
    let routes = MNIST_SHA256.iter().map(|(b, _)| (format!("/m/{b}.gz"), fake.clone())).collect();
    let (base, _) = serve(routes);
    let mirror = format!("{base}/m/");
    let e = err_text(fetch_mnist_from(tmp.path(), &[&mirror]));
    assert_contains(&e, &["train-images-idx3-ubyte.gz", "SHA-256", MNIST_SHA256[0].1]);
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("mnist")).unwrap().collect();
    assert!(left.is_empty(), "a file failing verification must not be kept: {left:?}");
}

#[test]
fn fetch_from_local_mirror_falls_back_verifies_and_skips_present_files() {
    let Some(real) = real_mnist_dir() else { return };
    let routes = MNIST_SHA256
        .iter()
        .map(|(b, _)| (format!("/good/{b}.gz"), std::fs::read(real.join(format!("{b}.gz"))).unwrap()))
        .collect();
    let (base, hits) = serve(routes);
    let bad_mirror = format!("{base}/missing/");
    let good_mirror = format!("{base}/good/");
    let tmp = tempfile::tempdir().unwrap();

    // One file already present and valid (raw), one present but corrupt.
    let dir = tmp.path().join("mnist");
    std::fs::create_dir_all(&dir).unwrap();
    let labels = gunzip(&std::fs::read(real.join("t10k-labels-idx1-ubyte.gz")).unwrap());
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), &labels).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte.gz"), b"junk").unwrap();

    fetch_mnist_from(tmp.path(), &[&bad_mirror, &good_mirror]).unwrap();
    // Three files fetched, each first trying the 404 mirror.
    assert_eq!(hits.load(Ordering::SeqCst), 6);
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte",
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz"
        ]
    );
    assert!(verify_mnist(tmp.path()).unwrap().iter().all(|(_, ok)| *ok));
    assert_eq!(load_mnist(tmp.path(), Split::Test).unwrap().n, 10_000);

    // Everything present and valid now: nothing is downloaded.
    fetch_mnist_from(tmp.path(), &[&bad_mirror, &good_mirror]).unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 6);
}

#[test]
fn a_constant_channel_is_centred_and_its_fill_stays_finite() {
    let norm = Normalization { mean: vec![0.5, 0.25], std: vec![0.0, 0.5] };
    assert_eq!(norm.black(), vec![-0.5, -0.5]);
    let ds = Dataset {
        name: "constant".into(),
        split: Split::Train,
        images: vec![255, 0, 255, 0],
        labels: vec![0],
        n: 1,
        channels: 2,
        height: 1,
        width: 2,
        class_names: vec!["a".into()],
    };
    assert_eq!(ds.to_f32_normalized(&norm), vec![0.5, -0.5, 1.5, -0.5]);
}
