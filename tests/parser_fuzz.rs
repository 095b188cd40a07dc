//! Generated-input tests for the file readers (issue 14, item 6): whatever bytes sit where rotvar
//! expects an IDX file, a CIFAR-10 batch or a checkpoint, reading them returns `Ok` with
//! self-consistent contents or an `Err` whose message names the file. Never a panic, never an
//! abort, never a hang.
//!
//! Inputs start from valid files and are mutated: truncated at header boundaries and random
//! points, bit-flipped, overwritten, header fields set to extremes (0, 1, 2^31-1, 2^32-1, values
//! whose product overflows), bytes appended or spliced in, replaced by random strings, gzip-wrapped
//! (and the gzip stream itself damaged), and, for checkpoints, the safetensors header and the
//! "rotvar" metadata JSON edited field by field. Randomness is `rotvar::rng::Rng` derived from a
//! fixed seed and the case number, so every case prints an id that reproduces it.
//!
//! The checkpoint cases run in a child process (this same test binary, re-executed with
//! `ROTVAR_PARSER_FUZZ_CHILD` set) under `ulimit -v`, so that an abort (a failed allocation) or a
//! runaway allocation is caught and reported with the case that caused it instead of killing the
//! whole test binary or the machine.
//!
//! `tests/corpus/` holds small bad files that every loader must reject with an error naming the
//! file; `corpus_files_are_rejected_with_errors_naming_the_file` runs them. They are written by
//! `write_corpus` below (`cargo test --test parser_fuzz -- --ignored write_corpus`).

mod formats;
use formats::{gzip, idx_images, idx_labels};
use rotvar::backend::cpu::CpuBackend;
use rotvar::checkpoint::{self, CheckpointMeta};
use rotvar::data::mnist::{decode_maybe_gzip, parse_idx_images, parse_idx_labels};
use rotvar::data::{load, Dataset, Split};
use rotvar::models::{InputSpec, Model};
use rotvar::rng::Rng;

use serde_json::{json, Value};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SEED: u64 = 0x0014_0006;

/// Generated cases per reader; sized so the whole binary runs in well under a minute on two cores.
const IDX_CASES: usize = 20_000;
const MNIST_FILE_CASES: usize = 4000;
const CIFAR_FILE_CASES: usize = 4000;
const CHECKPOINT_CASES: usize = 2500;

// ---------------------------------------------------------------- harness

/// Counts cases and collects oracle violations and panics for one reader.
struct Tally {
    reader: &'static str,
    cases: usize,
    accepted: usize,
    failures: Vec<String>,
}

/// What one case's oracle concluded, when it did not find a bug.
enum Verdict {
    Accepted,
    Rejected,
}

impl Tally {
    fn new(reader: &'static str) -> Tally {
        Tally { reader, cases: 0, accepted: 0, failures: Vec::new() }
    }

    /// Runs one case. `f` returns the verdict, or `Err(why)` when an oracle is violated; a panic
    /// inside `f` is caught and recorded with the case id.
    fn run(&mut self, id: &str, f: impl FnOnce() -> Result<Verdict, String>) {
        self.cases += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(Verdict::Accepted)) => self.accepted += 1,
            Ok(Ok(Verdict::Rejected)) => {}
            Ok(Err(why)) => self.failures.push(format!("{id}: {why}")),
            Err(payload) => self.failures.push(format!("{id}: PANIC: {}", panic_text(&*payload))),
        }
    }

    fn finish(self) {
        eprintln!(
            "parser_fuzz: {}: {} generated cases ({} accepted, {} rejected), {} failure(s)",
            self.reader,
            self.cases,
            self.accepted,
            self.cases - self.accepted - self.failures.len(),
            self.failures.len()
        );
        if !self.failures.is_empty() {
            let shown: Vec<&str> = self.failures.iter().take(25).map(String::as_str).collect();
            panic!(
                "{}: {} of {} generated cases failed (first {}):\n{}",
                self.reader,
                self.failures.len(),
                self.cases,
                shown.len(),
                shown.join("\n")
            );
        }
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// The oracle for an error: a non-empty message that contains one of `names`.
fn rejected(e: &anyhow::Error, names: &[&str]) -> Result<Verdict, String> {
    let text = format!("{e:#}");
    if text.trim().is_empty() {
        return Err("error with an empty message".into());
    }
    if !names.iter().any(|n| text.contains(n)) {
        return Err(format!("error does not name the file ({names:?}): {text}"));
    }
    Ok(Verdict::Rejected)
}

fn short(bytes: &[u8]) -> String {
    let head: Vec<String> = bytes.iter().take(24).map(|b| format!("{b:02x}")).collect();
    format!("{} bytes [{}{}]", bytes.len(), head.join(" "), if bytes.len() > 24 { " ..." } else { "" })
}

// ---------------------------------------------------------------- valid inputs

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// Valid MNIST files for one split: (images file, labels file), `n` images of 28x28.
fn mnist_split(n: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng::new(seed);
    let pixels = random_bytes(&mut rng, n * 28 * 28);
    let labels: Vec<u8> = (0..n).map(|i| ((i * 7 + seed as usize) % 10) as u8).collect();
    (idx_images(n as u32, 28, 28, &pixels), idx_labels(&labels))
}

/// A valid CIFAR-10 batch of `records` records.
fn cifar_batch(records: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for r in 0..records {
        out.push(((r as u64 + seed) % 10) as u8);
        out.extend(random_bytes(&mut rng, 3072));
    }
    out
}

const CIFAR_META: &str = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";

/// The train split of the MNIST fixture has this many images, the test split `MNIST_TEST_N`.
const MNIST_TRAIN_N: usize = 3;
const MNIST_TEST_N: usize = 2;

/// MNIST file base names and their valid contents, train then test.
fn mnist_fixture() -> Vec<(&'static str, Split, Vec<u8>)> {
    let (ti, tl) = mnist_split(MNIST_TRAIN_N, 1);
    let (ei, el) = mnist_split(MNIST_TEST_N, 2);
    vec![
        ("train-images-idx3-ubyte", Split::Train, ti),
        ("train-labels-idx1-ubyte", Split::Train, tl),
        ("t10k-images-idx3-ubyte", Split::Test, ei),
        ("t10k-labels-idx1-ubyte", Split::Test, el),
    ]
}

/// CIFAR file names and their valid contents (`None` split: used by both).
fn cifar_fixture() -> Vec<(&'static str, Option<Split>, Vec<u8>)> {
    let mut files: Vec<(&'static str, Option<Split>, Vec<u8>)> =
        ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"]
            .into_iter()
            .enumerate()
            .map(|(i, name)| (name, Some(Split::Train), cifar_batch(1 + i % 2, 10 + i as u64)))
            .collect();
    files.push(("test_batch.bin", Some(Split::Test), cifar_batch(3, 20)));
    files.push(("batches.meta.txt", None, CIFAR_META.as_bytes().to_vec()));
    files
}

/// Removes whatever is at `path` (file, link or directory).
fn clear(path: &Path) {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
    }
}

fn put(path: &Path, bytes: &[u8]) {
    clear(path);
    std::fs::write(path, bytes).unwrap();
}

/// The oracle for a loaded dataset: sizes agree and every label indexes a class name.
fn consistent(ds: &Dataset, channels: usize) -> Result<Verdict, String> {
    let image_len = ds.channels * ds.height * ds.width;
    let ok = ds.n > 0
        && ds.channels == channels
        && ds.labels.len() == ds.n
        && ds.images.len() == ds.n * image_len
        && ds.labels.iter().all(|&l| (l as usize) < ds.class_names.len());
    if ok {
        Ok(Verdict::Accepted)
    } else {
        Err(format!(
            "accepted an inconsistent dataset: n={} c={} h={} w={} images={} labels={} classes={}",
            ds.n,
            ds.channels,
            ds.height,
            ds.width,
            ds.images.len(),
            ds.labels.len(),
            ds.class_names.len()
        ))
    }
}

// ---------------------------------------------------------------- mutations

/// u32 header values that stress size arithmetic.
const EXTREME_U32: [u32; 22] = [
    0,
    1,
    2,
    3,
    4,
    9,
    10,
    28,
    255,
    256,
    3072,
    0x7fff,
    0xffff,
    0x1_0000,
    47_040_000,
    0x0100_0000,
    0x7fff_fffe,
    0x7fff_ffff,
    0x8000_0000,
    0x8000_0001,
    0xffff_fffe,
    0xffff_ffff,
];

/// Bytes worth writing over others.
const EXTREME_U8: [u8; 10] = [0x00, 0x01, 0x02, 0x03, 0x08, 0x09, 0x0a, 0x7f, 0x80, 0xff];

struct Mutator {
    rng: Rng,
}

impl Mutator {
    fn new(stream: &str, case: usize) -> Mutator {
        Mutator { rng: Rng::derive(SEED, &format!("{stream}/{case}")) }
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.rng.below(n as u64) as usize
        }
    }

    fn chance(&mut self, p: f32) -> bool {
        self.rng.next_f32() < p
    }

    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }

    /// A length to cut `len` bytes at: near a boundary (header fields, record ends) or anywhere.
    fn cut_point(&mut self, len: usize, boundaries: &[usize]) -> usize {
        let at = if !boundaries.is_empty() && self.chance(0.6) {
            let b = self.pick(boundaries) as isize + self.below(5) as isize - 2;
            b.max(0) as usize
        } else {
            self.below(len + 1)
        };
        at.min(len.saturating_sub(1))
    }

    /// A position, biased towards the first `hot` bytes (the header).
    fn position(&mut self, len: usize, hot: usize) -> usize {
        if hot > 0 && self.chance(0.6) {
            self.below(hot.min(len))
        } else {
            self.below(len)
        }
    }

    /// One mutation of `base`. `fields` are offsets of big-endian u32 header fields, `boundaries`
    /// interesting truncation lengths, `hot` the header length. Returns (description, bytes).
    fn mutate(&mut self, base: &[u8], fields: &[usize], boundaries: &[usize], hot: usize) -> (String, Vec<u8>) {
        let mut b = base.to_vec();
        // Without header fields to set, the header-field family would leave the input valid.
        let family = loop {
            let f = self.below(11);
            if !(fields.is_empty() && (f == 3 || f == 4)) {
                break f;
            }
        };
        let desc = match family {
            0 => {
                let at = self.cut_point(b.len(), boundaries);
                b.truncate(at);
                format!("truncated to {at}")
            }
            1 => {
                let flips = 1 + self.below(8);
                for _ in 0..flips {
                    if b.is_empty() {
                        break;
                    }
                    let p = self.position(b.len(), hot);
                    b[p] ^= 1 << self.below(8);
                }
                format!("{flips} bit flip(s)")
            }
            2 => {
                let n = 1 + self.below(6);
                for _ in 0..n {
                    if b.is_empty() {
                        break;
                    }
                    let p = self.position(b.len(), hot);
                    b[p] = if self.chance(0.5) { self.pick(&EXTREME_U8) } else { self.rng.next_u64() as u8 };
                }
                format!("{n} byte overwrite(s)")
            }
            3 | 4 => {
                // One or several header fields set to extremes.
                let mut parts = Vec::new();
                let count = if self.chance(0.5) { 1 } else { 1 + self.below(fields.len().max(1)) };
                for _ in 0..count {
                    let Some(&off) = fields.get(self.below(fields.len())) else { break };
                    if off + 4 > b.len() {
                        continue;
                    }
                    let v = if self.chance(0.85) { self.pick(&EXTREME_U32) } else { self.rng.next_u64() as u32 };
                    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
                    parts.push(format!("u32@{off}={v:#x}"));
                }
                format!("header fields {}", parts.join(","))
            }
            5 => {
                let n = if self.chance(0.2) { b.len() } else { 1 + self.below(64) };
                let extra =
                    if self.chance(0.5) { random_bytes(&mut self.rng, n) } else { base[..n.min(base.len())].to_vec() };
                b.extend_from_slice(&extra);
                format!("{} byte(s) appended", extra.len())
            }
            6 => {
                let at = self.below(b.len() + 1);
                let n = 1 + self.below(32);
                let extra = random_bytes(&mut self.rng, n);
                b.splice(at..at, extra);
                format!("{n} byte(s) inserted at {at}")
            }
            7 => {
                let at = self.below(b.len());
                let end = (at + 1 + self.below(64)).min(b.len());
                b.drain(at..end);
                format!("bytes {at}..{end} deleted")
            }
            8 => {
                let max = if self.chance(0.5) { 32 } else { 4096 };
                let n = self.below(max);
                let mut r = random_bytes(&mut self.rng, n);
                // Sometimes keep the real magic so the parser gets past the first check.
                if self.chance(0.4) {
                    let keep = hot.min(4).min(r.len()).min(base.len());
                    r[..keep].copy_from_slice(&base[..keep]);
                }
                b = r;
                format!("random string of {n} bytes")
            }
            9 => {
                // Two or three stacked mutations.
                let k = 2 + self.below(2);
                let mut descs = Vec::new();
                let mut cur = b;
                for _ in 0..k {
                    let (d, next) = self.mutate_simple(&cur, fields, boundaries, hot);
                    descs.push(d);
                    cur = next;
                }
                return (descs.join(" + "), cur);
            }
            _ => return self.gzip_variant(base, fields, boundaries, hot),
        };
        (desc, b)
    }

    /// `mutate` without the stacking and gzip families (used to stack).
    fn mutate_simple(&mut self, base: &[u8], fields: &[usize], boundaries: &[usize], hot: usize) -> (String, Vec<u8>) {
        loop {
            let (d, b) = self.mutate(base, fields, boundaries, hot);
            if !d.contains('+') && !d.starts_with("gzip") {
                return (d, b);
            }
        }
    }

    /// Gzip-wrapped variants: a mutated file gzipped, or a gzipped file damaged.
    fn gzip_variant(&mut self, base: &[u8], fields: &[usize], boundaries: &[usize], hot: usize) -> (String, Vec<u8>) {
        match self.below(7) {
            0 | 1 => {
                let (d, b) = self.mutate_simple(base, fields, boundaries, hot);
                (format!("gzip({d})"), gzip(&b))
            }
            2 => {
                let g = gzip(base);
                let at = self.below(g.len());
                (format!("gzip truncated to {at}"), g[..at].to_vec())
            }
            3 => {
                let mut g = gzip(base);
                let flips = 1 + self.below(4);
                for _ in 0..flips {
                    let p = self.below(g.len());
                    g[p] ^= 1 << self.below(8);
                }
                (format!("gzip with {flips} bit flip(s)"), g)
            }
            4 => {
                let mut g = gzip(base);
                let n = 1 + self.below(32);
                g.extend(random_bytes(&mut self.rng, n));
                (format!("gzip + {n} trailing byte(s)"), g)
            }
            5 => {
                // Two members: the decoder concatenates them.
                let cut = self.below(base.len() + 1);
                let mut g = gzip(&base[..cut]);
                g.extend(gzip(&base[cut..]));
                (format!("gzip in two members split at {cut}"), g)
            }
            _ => ("gzip(gzip(file))".to_string(), gzip(&gzip(base))),
        }
    }
}

// ---------------------------------------------------------------- IDX parsers on bytes

fn check_images(bytes: &[u8], what: &str) -> Result<Verdict, String> {
    match parse_idx_images(bytes, what) {
        Err(e) => rejected(&e, &[what]),
        Ok((n, rows, cols, px)) => {
            let want = n.checked_mul(rows).and_then(|x| x.checked_mul(cols));
            if want != Some(px.len()) || bytes.len() != 16 + px.len() || px != bytes[16..] {
                return Err(format!("accepted {n}x{rows}x{cols} with {} pixels from {}", px.len(), short(bytes)));
            }
            if n > 0 && (rows == 0 || cols == 0) {
                return Err(format!("accepted {n} empty images"));
            }
            Ok(Verdict::Accepted)
        }
    }
}

fn check_labels(bytes: &[u8], what: &str) -> Result<Verdict, String> {
    match parse_idx_labels(bytes, what) {
        Err(e) => rejected(&e, &[what]),
        Ok(v) => {
            if v.len() + 8 != bytes.len() || v.iter().any(|&l| l > 9) {
                return Err(format!("accepted {} labels from {}", v.len(), short(bytes)));
            }
            Ok(Verdict::Accepted)
        }
    }
}

/// `decode_maybe_gzip`, then both parsers on whatever came out (a swapped file is a case too).
fn check_decoded(bytes: Vec<u8>, what: &str) -> Result<Verdict, String> {
    let is_gz = bytes.starts_with(&[0x1f, 0x8b]);
    let copy = if is_gz { Vec::new() } else { bytes.clone() };
    match decode_maybe_gzip(bytes, what) {
        Err(e) => rejected(&e, &[what]),
        Ok(out) => {
            if !is_gz && out != copy {
                return Err("non-gzip input was changed by decode_maybe_gzip".into());
            }
            let a = check_images(&out, what)?;
            let b = check_labels(&out, what)?;
            Ok(if matches!(a, Verdict::Accepted) || matches!(b, Verdict::Accepted) {
                Verdict::Accepted
            } else {
                Verdict::Rejected
            })
        }
    }
}

#[test]
fn idx_parsers_never_panic_on_generated_inputs() {
    let mut rng = Rng::new(SEED);
    let bases: Vec<(&str, Vec<u8>)> = vec![
        ("images 3x4x4", idx_images(3, 4, 4, &random_bytes(&mut rng, 48))),
        ("images 2x28x28", mnist_split(2, 5).0),
        ("labels 10", idx_labels(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])),
        ("labels 1", idx_labels(&[7])),
    ];
    let mut t = Tally::new("IDX parse_idx_images/parse_idx_labels/decode_maybe_gzip");
    // Every prefix of every base, exhaustively (all header boundaries included).
    for (name, base) in &bases {
        for len in 0..base.len().min(64) {
            let what = format!("idx/{name}/prefix{len}");
            t.run(&what, || check_decoded(base[..len].to_vec(), &what));
        }
    }
    for case in 0..IDX_CASES {
        let mut m = Mutator::new("idx", case);
        let (name, base) = &bases[m.below(bases.len())];
        let rank = if name.starts_with("images") { 3 } else { 1 };
        let fields: Vec<usize> = (0..=rank).map(|i| 4 * i).collect();
        let header = 4 + 4 * rank;
        let boundaries = vec![0, 1, 2, 3, 4, 8, header, header + 1, base.len() - 1, base.len()];
        let (desc, bytes) = m.mutate(base, &fields, &boundaries, header);
        let what = format!("idx-case-{case}.bin");
        t.run(&format!("{what} ({name}: {desc}; {})", short(&bytes)), || check_decoded(bytes, &what));
    }
    t.finish();
}

// ---------------------------------------------------------------- MNIST files

#[test]
fn mnist_loader_never_panics_on_generated_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnist");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = mnist_fixture();
    let mut t = Tally::new("MNIST files via data::load(\"mnist\")");
    for case in 0..MNIST_FILE_CASES {
        let mut m = Mutator::new("mnist-file", case);
        let gz = m.chance(0.5);
        // Write the valid four files, raw or gzipped.
        for (base, _, bytes) in &fixture {
            clear(&dir.join(base));
            clear(&dir.join(format!("{base}.gz")));
            if gz {
                put(&dir.join(format!("{base}.gz")), &gzip(bytes));
            } else {
                put(&dir.join(base), bytes);
            }
        }
        let (base, split, valid) = &fixture[m.below(fixture.len())];
        let path = if gz { dir.join(format!("{base}.gz")) } else { dir.join(base) };
        let desc = match m.below(20) {
            0 => {
                clear(&path);
                std::fs::create_dir(&path).unwrap();
                if m.chance(0.5) {
                    std::fs::write(path.join("inner"), valid).unwrap();
                }
                "a directory in the file's place".to_string()
            }
            1 => {
                clear(&path);
                std::os::unix::fs::symlink(dir.join("nowhere"), &path).unwrap();
                "a dangling symbolic link".to_string()
            }
            2 => {
                clear(&path);
                "file removed".to_string()
            }
            _ => {
                let rank = if base.contains("images") { 3 } else { 1 };
                let fields: Vec<usize> = (0..=rank).map(|i| 4 * i).collect();
                let header = 4 + 4 * rank;
                let boundaries = vec![0, 2, 4, 8, header, valid.len() - 1];
                let (d, bytes) = m.mutate(valid, &fields, &boundaries, header);
                put(&path, &if gz && m.chance(0.7) { gzip(&bytes) } else { bytes });
                d
            }
        };
        let id = format!("mnist-file case {case}: {} {desc}", path.file_name().unwrap().to_string_lossy());
        let data_dir = tmp.path().to_path_buf();
        let split = *split;
        t.run(&id, || match load("mnist", split, &data_dir) {
            Err(e) => rejected(&e, &[*base]),
            Ok(ds) => consistent(&ds, 1),
        });
    }
    t.finish();
}

// ---------------------------------------------------------------- CIFAR-10 files

#[test]
fn cifar_loader_never_panics_on_generated_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = cifar_fixture();
    for (name, _, bytes) in &fixture {
        put(&dir.join(name), bytes);
    }
    let mut t = Tally::new("CIFAR-10 files via data::load(\"cifar10\")");
    for case in 0..CIFAR_FILE_CASES {
        let mut m = Mutator::new("cifar-file", case);
        let (name, split, valid) = &fixture[m.below(fixture.len())];
        let split = split.unwrap_or(if m.chance(0.5) { Split::Train } else { Split::Test });
        let path = dir.join(name);
        let is_meta = name.ends_with(".txt");
        let desc = match m.below(20) {
            0 => {
                clear(&path);
                std::fs::create_dir(&path).unwrap();
                "a directory in the file's place".to_string()
            }
            1 => {
                clear(&path);
                std::os::unix::fs::symlink(dir.join("nowhere"), &path).unwrap();
                "a dangling symbolic link".to_string()
            }
            2 if !is_meta => {
                clear(&path);
                "file removed".to_string()
            }
            3 if !is_meta => {
                // A label byte set to an extreme value.
                let mut b = valid.clone();
                let r = m.below(b.len() / 3073);
                b[r * 3073] = m.pick(&EXTREME_U8);
                let d = format!("label of record {r} set to {}", b[r * 3073]);
                put(&path, &b);
                d
            }
            4 if is_meta => {
                let lines = [0usize, 1, 9, 11, 10_000][m.below(5)];
                let text: String = (0..lines).map(|i| format!("class{i}\n")).collect();
                put(&path, text.as_bytes());
                format!("{lines} class names")
            }
            _ => {
                let boundaries: Vec<usize> = if is_meta {
                    valid.iter().enumerate().filter(|(_, &c)| c == b'\n').map(|(i, _)| i + 1).collect()
                } else {
                    (0..=valid.len() / 3073).flat_map(|r| [r * 3073, r * 3073 + 1]).collect()
                };
                let (d, bytes) = m.mutate(valid, &[], &boundaries, if is_meta { 0 } else { 1 });
                put(&path, &bytes);
                d
            }
        };
        let id = format!("cifar-file case {case}: {name} {desc} ({split})");
        let data_dir = tmp.path().to_path_buf();
        t.run(&id, || match load("cifar10", split, &data_dir) {
            Err(e) => rejected(&e, &[*name]),
            Ok(ds) => consistent(&ds, 3),
        });
        put(&path, valid);
    }
    t.finish();
}

// ---------------------------------------------------------------- special files in a file's place

/// A directory, a dangling link or a FIFO where a data file belongs is named as such, not
/// reported as missing, and never blocks.
#[test]
fn non_regular_files_in_a_data_files_place_are_named() {
    let mkfifo_works = Command::new("mkfifo").arg("--version").stdout(Stdio::null()).status().is_ok();
    for (kind, expect) in [
        ("dir", "is a directory, not a file"),
        ("link", "symbolic link to a path that does not exist"),
        ("fifo", "not a regular file"),
    ] {
        if kind == "fifo" && !mkfifo_works {
            eprintln!("NOTE: mkfifo not available; skipping the FIFO case");
            continue;
        }
        let make = |path: &Path| match kind {
            "dir" => std::fs::create_dir(path).unwrap(),
            "link" => std::os::unix::fs::symlink(path.with_extension("absent"), path).unwrap(),
            _ => assert!(Command::new("mkfifo").arg(path).status().unwrap().success()),
        };
        for (base, split, _) in mnist_fixture() {
            for gz in [true, false] {
                let tmp = tempfile::tempdir().unwrap();
                let dir = tmp.path().join("mnist");
                std::fs::create_dir_all(&dir).unwrap();
                for (b, _, bytes) in mnist_fixture() {
                    if b != base {
                        std::fs::write(dir.join(b), bytes).unwrap();
                    }
                }
                let path = if gz { dir.join(format!("{base}.gz")) } else { dir.join(base) };
                make(&path);
                let e = format!("{:#}", load("mnist", split, tmp.path()).unwrap_err());
                assert!(e.contains(&path.display().to_string()) && e.contains(expect), "{kind} {gz}: {e}");
                assert!(!e.contains("not found"), "{kind}: reported as missing: {e}");
            }
        }
        for (name, split, _) in cifar_fixture() {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("cifar-10-batches-bin");
            std::fs::create_dir_all(&dir).unwrap();
            for (n, _, bytes) in cifar_fixture() {
                if n != name {
                    std::fs::write(dir.join(n), bytes).unwrap();
                }
            }
            let path = dir.join(name);
            make(&path);
            let e = format!("{:#}", load("cifar10", split.unwrap_or(Split::Test), tmp.path()).unwrap_err());
            assert!(e.contains(&path.display().to_string()) && e.contains(expect), "{kind}: {e}");
            assert!(!e.contains("not found"), "{kind}: reported as missing: {e}");
        }
    }
    // The data directory itself being a file.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("mnist"), b"oops").unwrap();
    let e = format!("{:#}", load("mnist", Split::Train, tmp.path()).unwrap_err());
    assert!(e.contains("is a file, not a directory"), "{e}");
    std::fs::write(tmp.path().join("cifar-10-batches-bin"), b"oops").unwrap();
    let e = format!("{:#}", load("cifar10", Split::Train, tmp.path()).unwrap_err());
    assert!(e.contains("is a file, not a directory"), "{e}");
}

// ---------------------------------------------------------------- corpus

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// Where a corpus file of `kind` goes in a data directory, the split to load, and the file name
/// the error must contain. Names ending in `.gz` take the `.gz` name.
fn corpus_target(kind: &str, name: &str) -> (String, &'static str, Split, String) {
    let gz = if name.ends_with(".gz") { ".gz" } else { "" };
    match kind {
        "idx/images" => (format!("mnist/train-images-idx3-ubyte{gz}"), "mnist", Split::Train, "train-images".into()),
        "idx/labels" => (format!("mnist/train-labels-idx1-ubyte{gz}"), "mnist", Split::Train, "train-labels".into()),
        "cifar/batch" => {
            ("cifar-10-batches-bin/test_batch.bin".into(), "cifar10", Split::Test, "test_batch.bin".into())
        }
        "cifar/meta" => {
            ("cifar-10-batches-bin/batches.meta.txt".into(), "cifar10", Split::Test, "batches.meta.txt".into())
        }
        _ => unreachable!("{kind}"),
    }
}

const CORPUS_KINDS: [&str; 4] = ["idx/images", "idx/labels", "cifar/batch", "cifar/meta"];

/// Valid files for everything except the corpus file under test.
fn write_valid_data(data_dir: &Path) {
    std::fs::create_dir_all(data_dir.join("mnist")).unwrap();
    for (base, _, bytes) in mnist_fixture() {
        std::fs::write(data_dir.join("mnist").join(base), bytes).unwrap();
    }
    std::fs::create_dir_all(data_dir.join("cifar-10-batches-bin")).unwrap();
    for (name, _, bytes) in cifar_fixture() {
        std::fs::write(data_dir.join("cifar-10-batches-bin").join(name), bytes).unwrap();
    }
}

#[test]
fn corpus_files_are_rejected_with_errors_naming_the_file() {
    let mut total_bytes = 0u64;
    let mut failures = Vec::new();
    for kind in CORPUS_KINDS {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(corpus_dir().join(kind))
            .unwrap_or_else(|e| panic!("tests/corpus/{kind}: {e}"))
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().is_some_and(|n| n != "README.md"))
            .collect();
        entries.sort();
        assert!(!entries.is_empty(), "tests/corpus/{kind} is empty");
        let mut count = 0;
        for entry in entries {
            let name = entry.file_name().unwrap().to_string_lossy().into_owned();
            let tmp = tempfile::tempdir().unwrap();
            write_valid_data(tmp.path());
            let (target, dataset, split, must_name) = corpus_target(kind, &name);
            let target = tmp.path().join(target);
            clear(&target);
            clear(&PathBuf::from(target.to_string_lossy().trim_end_matches(".gz")));
            let is_dir = entry.is_dir();
            if is_dir {
                std::fs::create_dir(&target).unwrap();
            } else {
                let bytes = std::fs::read(&entry).unwrap();
                total_bytes += bytes.len() as u64;
                // The byte-level parsers must not panic on it either (their verdict may differ:
                // e.g. a count mismatch is only visible across two files).
                if kind.starts_with("idx") {
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| check_decoded(bytes.clone(), &name))) {
                        failures.push(format!("{kind}/{name}: parser PANIC: {}", panic_text(&*p)));
                    }
                }
                std::fs::write(&target, bytes).unwrap();
            }
            count += 1;
            let result = catch_unwind(AssertUnwindSafe(|| load(dataset, split, tmp.path())));
            match result {
                Err(p) => failures.push(format!("{kind}/{name}: PANIC: {}", panic_text(&*p))),
                Ok(Ok(ds)) => failures.push(format!("{kind}/{name}: accepted ({} records)", ds.n)),
                Ok(Err(e)) => {
                    let text = format!("{e:#}");
                    if !text.contains(&must_name) {
                        failures.push(format!("{kind}/{name}: error does not name {must_name}: {text}"));
                    } else if is_dir && !text.contains("is a directory, not a file") {
                        failures.push(format!("{kind}/{name}: directory not reported as one: {text}"));
                    }
                }
            }
        }
        eprintln!("parser_fuzz: corpus tests/corpus/{kind}: {count} bad file(s), all must be rejected");
    }
    assert!(total_bytes < 200_000, "the corpus should stay small; it holds {total_bytes} bytes");
    assert!(failures.is_empty(), "corpus failures:\n{}", failures.join("\n"));
}

/// Regenerates `tests/corpus/` (run with `--ignored write_corpus`). Deterministic.
#[test]
#[ignore = "writes tests/corpus; run by hand after changing the generator"]
fn write_corpus() {
    let root = corpus_dir();
    let mut rng = Rng::new(SEED ^ 0xC0);
    let (valid_images, valid_labels) = mnist_split(MNIST_TRAIN_N, 1);
    let html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n";
    let bomb = |size: usize, cut: usize| {
        let g = gzip(&vec![0u8; size]);
        g[..cut.min(g.len())].to_vec()
    };
    let mut gz_bad_crc = gzip(&valid_images);
    let n = gz_bad_crc.len();
    gz_bad_crc[n - 8] ^= 0xff;
    let mut with_garbage = gzip(&valid_images);
    with_garbage.extend_from_slice(b"garbage after the gzip member");
    let mut images_label_range = valid_images.clone();
    images_label_range.truncate(16 + 2 * 784);
    let files: Vec<(&str, &str, Vec<u8>)> = vec![
        ("idx/images", "empty.bin", vec![]),
        ("idx/images", "truncated_magic.bin", vec![0, 0]),
        ("idx/images", "truncated_header.bin", valid_images[..10].to_vec()),
        ("idx/images", "header_only.bin", valid_images[..16].to_vec()),
        ("idx/images", "bad_magic_zip.bin", b"PK\x03\x04\x14\x00\x00\x00\x08\x00rest of a zip".to_vec()),
        ("idx/images", "bad_type_float.bin", idx_images_with_magic(0x0d03, &valid_images)),
        ("idx/images", "rank_255.bin", idx_images_with_magic(0x08ff, &valid_images)),
        ("idx/images", "labels_in_images_place.bin", valid_labels.clone()),
        ("idx/images", "overflowing_dims.bin", idx_images(u32::MAX, u32::MAX, u32::MAX, &[1, 2, 3])),
        ("idx/images", "huge_count.bin", idx_images(0x7fff_ffff, 28, 28, &valid_images[16..])),
        ("idx/images", "count_2pow32_minus_1.bin", idx_images(u32::MAX, 28, 28, &valid_images[16..])),
        ("idx/images", "zero_rows.bin", idx_images(3, 0, 28, &[])),
        ("idx/images", "zero_count.bin", idx_images(0, 28, 28, &[])),
        ("idx/images", "truncated_pixels.bin", valid_images[..valid_images.len() - 100].to_vec()),
        ("idx/images", "trailing_bytes.bin", [valid_images.as_slice(), &[0u8; 7]].concat()),
        ("idx/images", "count_mismatch.bin", images_label_range),
        ("idx/images", "html_error_page.bin", html.to_vec()),
        ("idx/images", "truncated.gz", {
            let g = gzip(&valid_images);
            g[..g.len() / 2].to_vec()
        }),
        ("idx/images", "gzip_bomb_cut.gz", bomb(64 << 20, 16 << 10)),
        ("idx/images", "gzip_of_zeros.gz", bomb(8 << 20, usize::MAX)),
        ("idx/images", "gzip_bad_crc.gz", gz_bad_crc),
        ("idx/images", "gzip_magic_only.gz", vec![0x1f, 0x8b]),
        ("idx/images", "gzip_of_gzip.gz", gzip(&gzip(&valid_images))),
        ("idx/images", "gzip_trailing_garbage.gz", with_garbage),
        ("idx/labels", "empty.bin", vec![]),
        ("idx/labels", "truncated_header.bin", valid_labels[..6].to_vec()),
        ("idx/labels", "bad_magic.bin", random_bytes(&mut rng, 64)),
        ("idx/labels", "images_in_labels_place.bin", valid_images.clone()),
        ("idx/labels", "label_10.bin", idx_labels(&[1, 10, 2])),
        ("idx/labels", "label_255.bin", idx_labels(&[255, 0, 0])),
        ("idx/labels", "count_2pow32_minus_1.bin", idx_labels_with_count(u32::MAX, &[1, 2, 3])),
        ("idx/labels", "count_2pow31.bin", idx_labels_with_count(0x8000_0000, &[1, 2, 3])),
        ("idx/labels", "truncated.bin", idx_labels_with_count(3, &[1, 2])),
        ("idx/labels", "trailing_bytes.bin", idx_labels_with_count(3, &[1, 2, 3, 4])),
        ("idx/labels", "count_mismatch.bin", idx_labels(&[1, 2])),
        ("idx/labels", "truncated.gz", gzip(&valid_labels)[..12].to_vec()),
        ("cifar/batch", "empty.bin", vec![]),
        ("cifar/batch", "one_byte.bin", vec![3]),
        ("cifar/batch", "short_record.bin", cifar_batch(1, 7)[..3072].to_vec()),
        ("cifar/batch", "long_record.bin", [cifar_batch(1, 7).as_slice(), &[0]].concat()),
        ("cifar/batch", "label_10.bin", with_label(cifar_batch(2, 7), 1, 10)),
        ("cifar/batch", "label_255.bin", with_label(cifar_batch(2, 7), 0, 255)),
        ("cifar/batch", "python_pickle.bin", [b"\x80\x02}q\x00(U\x05batch_label".as_slice(), &[0; 100]].concat()),
        ("cifar/batch", "gzip_of_batch.bin", gzip(&cifar_batch(1, 7))),
        ("cifar/batch", "tar_header.bin", [vec![0u8; 512], cifar_batch(1, 7)].concat()),
        ("cifar/batch", "html_error_page.bin", html.to_vec()),
        ("cifar/meta", "empty.txt", vec![]),
        ("cifar/meta", "nine_names.txt", CIFAR_META.lines().take(9).collect::<Vec<_>>().join("\n").into_bytes()),
        ("cifar/meta", "eleven_names.txt", format!("{CIFAR_META}extra\n").into_bytes()),
        ("cifar/meta", "not_utf8.txt", b"airplane\n\xff\xfe\xfd\n".to_vec()),
        ("cifar/meta", "binary_garbage.txt", random_bytes(&mut rng, 300)),
    ];
    for (kind, name, bytes) in files {
        let dir = root.join(kind);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    // Directories in a file's place: git keeps a directory only with a file inside it.
    for (kind, name) in [
        ("idx/images", "directory.bin"),
        ("idx/labels", "directory.gz"),
        ("cifar/batch", "directory.bin"),
        ("cifar/meta", "directory.txt"),
    ] {
        let dir = root.join(kind).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("KEEP"), "A directory where the loader expects a file.\n").unwrap();
    }
}

fn idx_images_with_magic(magic: u32, valid: &[u8]) -> Vec<u8> {
    let mut b = valid.to_vec();
    b[..4].copy_from_slice(&magic.to_be_bytes());
    b
}

fn idx_labels_with_count(count: u32, labels: &[u8]) -> Vec<u8> {
    let mut b = idx_labels(labels);
    b[4..8].copy_from_slice(&count.to_be_bytes());
    b
}

fn with_label(mut batch: Vec<u8>, record: usize, label: u8) -> Vec<u8> {
    batch[record * 3073] = label;
    batch
}

// ---------------------------------------------------------------- checkpoints

const CHILD_ENV: &str = "ROTVAR_PARSER_FUZZ_CHILD";
/// Address-space limit of the child that loads checkpoints: a header that asks for terabytes
/// must fail to allocate there rather than push this machine into swap or the OOM killer.
const CHILD_VMEM_KIB: u64 = 6 << 20;
const CHILD_TIMEOUT: Duration = Duration::from_secs(150);
/// A child is restarted after the case that killed it; this bounds the restarts.
const MAX_CHILD_RUNS: usize = 250;

/// The input every checkpoint case starts from: a small LeNet (1x8x8 inputs) so a case is cheap.
fn base_input() -> InputSpec {
    InputSpec { channels: 1, height: 8, width: 8, classes: 10 }
}

fn base_meta() -> Value {
    json!({
        "arch": "lenet",
        "input": {"channels": 1, "height": 8, "width": 8, "classes": 10},
        "dataset": "synthetic",
        "class_names": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
        "normalization": {"mean": [0.1307], "std": [0.3081]},
        "augment": "none",
        "rotvar_version": "0.1.0",
        "epochs_trained": 1
    })
}

/// A safetensors file split into its header JSON and data bytes.
struct Safetensors {
    header: Value,
    data: Vec<u8>,
}

impl Safetensors {
    fn parse(bytes: &[u8]) -> Safetensors {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        Safetensors { header: serde_json::from_slice(&bytes[8..8 + n]).unwrap(), data: bytes[8 + n..].to_vec() }
    }

    fn to_bytes(&self) -> Vec<u8> {
        assemble(&serde_json::to_vec(&self.header).unwrap(), &self.data)
    }

    fn meta(&self) -> Value {
        serde_json::from_str(self.header["__metadata__"]["rotvar"].as_str().unwrap()).unwrap()
    }

    fn set_meta_text(&mut self, text: String) {
        self.header["__metadata__"]["rotvar"] = Value::String(text);
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
        v.sort();
        v
    }
}

/// Header length (u64 LE), header, data; the header padded with spaces to 8 bytes like
/// safetensors writes it.
fn assemble(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = header.to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// JSON values that stress a numeric field.
fn extreme_numbers() -> Vec<Value> {
    vec![
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(4),
        json!(5),
        json!(7),
        json!(9),
        json!(11),
        json!(27),
        json!(29),
        json!(32),
        json!(1000),
        json!(65_536),
        json!(1_000_000),
        json!(0x7fff_ffffu64),
        json!(0x8000_0000u64),
        json!(0xffff_ffffu64),
        json!(0x1_0000_0000u64),
        json!(25_200_000_000_000u64),
        json!(1u64 << 53),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(-1),
        json!(1.5),
        json!(1e300),
        json!("28"),
        Value::Null,
        json!(true),
        json!([]),
        json!({}),
    ]
}

fn extreme_floats() -> Vec<Value> {
    vec![
        json!(0.0),
        json!(-0.0),
        json!(-1.0),
        json!(1e-45),
        json!(3.4e38),
        json!(1e39),
        json!(-1e39),
        json!(1e308),
        Value::Null,
        json!("NaN"),
        json!("inf"),
    ]
}

fn extreme_strings(m: &mut Mutator) -> Vec<Value> {
    let garbage: String = (0..m.below(40)).map(|_| (32 + m.below(95)) as u8 as char).collect();
    vec![
        json!(""),
        json!("lenet"),
        json!("LeNet"),
        json!("resnet18"),
        json!("resnet20"),
        json!("simpleconv"),
        json!("allconv"),
        json!("vgg"),
        json!("vgg16"),
        json!("lenet\u{0}"),
        json!("\u{202e}tenel"),
        json!("x".repeat(10_000)),
        json!(garbage),
        json!(42),
        Value::Null,
        json!(["lenet"]),
    ]
}

fn augment_strings(m: &mut Mutator) -> Vec<Value> {
    let garbage: String = (0..m.below(30)).map(|_| b"rotatezoomhflip=:,.-0123456789e"[m.below(31)] as char).collect();
    [
        "none",
        "rotate",
        "rotate=1e308:-1e308",
        "rotate=NaN:NaN",
        "rotate=inf:-inf",
        "rotate=-1e38:1e38",
        "rotate=5:5",
        "rotate=",
        "rotate=:",
        "rotate=1:2:3",
        "zoom=0:0",
        "zoom=-1:1",
        "zoom=1e-45:1e45",
        "zoom=NaN:1",
        "zoom=2:1",
        "zoom=inf:inf",
        ",,,",
        "=",
        "hflip,hflip,vflip,rotate,rotate",
        "hflip=1",
        "\u{0}",
    ]
    .iter()
    .map(|s| json!(s))
    .chain([json!(garbage), json!(1), Value::Null])
    .collect()
}

/// Mutated rotvar metadata: fields set to extremes, removed, or the whole text damaged.
fn mutate_meta(m: &mut Mutator, meta: &Value) -> (String, String) {
    let mut v = meta.clone();
    let edits = if m.chance(0.7) { 1 } else { 2 + m.below(3) };
    let mut descs = Vec::new();
    for _ in 0..edits {
        let d = match m.below(12) {
            0..=3 => {
                let field = m.pick(&["channels", "height", "width", "classes"]);
                let x = m.pick(&extreme_numbers());
                let d = format!("input.{field}={x}");
                set_nested(&mut v, "input", field, x);
                d
            }
            4 => {
                let options = extreme_strings(m);
                let x = m.pick(&options);
                let d = format!("arch={}", truncate_text(&x.to_string()));
                v["arch"] = x;
                d
            }
            5 => {
                let which = m.pick(&["mean", "std"]);
                let len = m.pick(&[0usize, 1, 2, 3, 1000]);
                let fill = m.pick(&extreme_floats());
                let x = Value::Array(vec![fill.clone(); len]);
                set_nested(&mut v, "normalization", which, x);
                format!("normalization.{which}=[{fill}; {len}]")
            }
            6 => {
                let len = m.pick(&[0usize, 1, 9, 11, 100_000]);
                v["class_names"] = Value::Array((0..len).map(|i| json!(format!("c{i}"))).collect());
                format!("{len} class names")
            }
            7 => {
                let options = augment_strings(m);
                let x = m.pick(&options);
                let d = format!("augment={x}");
                v["augment"] = x;
                d
            }
            8 => {
                let field = m.pick(&["epochs_trained", "dataset", "rotvar_version", "class_names", "normalization"]);
                let options = if m.chance(0.5) { extreme_numbers() } else { extreme_strings(m) };
                let x = m.pick(&options);
                let d = format!("{field}={}", truncate_text(&x.to_string()));
                v[field] = x;
                d
            }
            9 => {
                let field = m.pick(&[
                    "arch",
                    "input",
                    "dataset",
                    "class_names",
                    "normalization",
                    "augment",
                    "rotvar_version",
                    "epochs_trained",
                ]);
                v.as_object_mut().unwrap().remove(field);
                format!("{field} removed")
            }
            10 => {
                let (field, sub) = m.pick(&[
                    ("input", "channels"),
                    ("input", "height"),
                    ("input", "width"),
                    ("input", "classes"),
                    ("normalization", "mean"),
                    ("normalization", "std"),
                ]);
                if let Some(o) = v[field].as_object_mut() {
                    o.remove(sub);
                }
                format!("{field}.{sub} removed")
            }
            _ => {
                v["unknown_field"] = json!({"nested": [1, 2, 3]});
                "unknown field added".to_string()
            }
        };
        descs.push(d);
    }
    let mut text = serde_json::to_string(&v).unwrap();
    // Sometimes damage the JSON text itself.
    if m.chance(0.1) {
        let mut b = text.into_bytes();
        let (d, nb) = m.mutate_simple(&b, &[], &[], 0);
        b = nb;
        text = String::from_utf8_lossy(&b).into_owned();
        descs.push(format!("text {d}"));
    }
    (descs.join(", "), text)
}

/// `v[outer][inner] = x`, replacing `v[outer]` by an object first if an earlier edit made it
/// something else (serde_json's `IndexMut` panics on a string).
fn set_nested(v: &mut Value, outer: &str, inner: &str, x: Value) {
    if !v[outer].is_object() {
        v[outer] = json!({});
    }
    v[outer][inner] = x;
}

fn truncate_text(s: &str) -> String {
    if s.len() > 40 {
        format!("{}...({} chars)", &s[..s.char_indices().nth(40).map_or(s.len(), |(i, _)| i)], s.len())
    } else {
        s.to_string()
    }
}

/// One generated checkpoint: (description, file bytes).
fn checkpoint_case(case: usize, valid: &[u8]) -> (String, Vec<u8>) {
    let mut m = Mutator::new("checkpoint", case);
    let mut st = Safetensors::parse(valid);
    let names = st.tensor_names();
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    match m.below(20) {
        // Byte-level damage: truncation, flips, overwrites, appends, random strings, gzip.
        0..=3 => {
            let boundaries = [0, 1, 7, 8, 9, 8 + header_len / 2, 8 + header_len, 8 + header_len + 1, valid.len() - 1];
            // Weight the header: bit flips there hit JSON syntax, offsets and shapes.
            let (d, b) = m.mutate(valid, &[], &boundaries, 8 + header_len);
            (format!("bytes: {d}"), b)
        }
        4 => {
            let v: u64 = m.pick(&[
                0,
                1,
                2,
                7,
                header_len as u64 - 1,
                header_len as u64 + 1,
                valid.len() as u64 - 8,
                valid.len() as u64 - 7,
                100_000_001,
                u32::MAX as u64,
                1 << 63,
                u64::MAX,
            ]);
            let mut b = valid.to_vec();
            b[..8].copy_from_slice(&v.to_le_bytes());
            (format!("header length field = {v}"), b)
        }
        // The rotvar metadata.
        5..=11 => {
            let (d, text) = mutate_meta(&mut m, &st.meta());
            st.set_meta_text(text);
            (format!("metadata: {d}"), st.to_bytes())
        }
        12 => {
            let replacement = m.pick(&[
                json!(null),
                json!([]),
                json!({}),
                json!({"rotvar": 1}),
                json!({"rotvar": ""}),
                json!({"rotvar": "not json"}),
                json!({"rotvar": "[]"}),
                json!({"rotvar": "null"}),
                json!({"rotvar": format!("{}{}", "[".repeat(100_000), "]".repeat(100_000))}),
                json!({"other": "x"}),
            ]);
            let d = format!("__metadata__ = {}", truncate_text(&replacement.to_string()));
            st.header["__metadata__"] = replacement;
            (d, st.to_bytes())
        }
        // A tensor's entry in the header.
        13..=16 => {
            let name = names[m.below(names.len())].clone();
            let entry = st.header[&name].clone();
            let (begin, end) = (entry["data_offsets"][0].as_u64().unwrap(), entry["data_offsets"][1].as_u64().unwrap());
            let data_len = st.data.len() as u64;
            let d = match m.below(6) {
                0 => {
                    let x = m.pick(&[
                        json!([0, 0]),
                        json!([end, begin]),
                        json!([begin, begin + 1]),
                        json!([begin, end + 4]),
                        json!([begin, data_len + 4]),
                        json!([begin, u64::MAX]),
                        json!([u64::MAX - 3, u64::MAX]),
                        json!([data_len, data_len]),
                        json!([-1, 3]),
                        json!([begin]),
                        json!([]),
                        json!("0,4"),
                    ]);
                    let d = format!("{name}.data_offsets={x}");
                    st.header[&name]["data_offsets"] = x;
                    d
                }
                1 => {
                    let mut shape: Vec<Value> = entry["shape"].as_array().unwrap().clone();
                    let x = match m.below(8) {
                        0 => json!([]),
                        1 => json!([0]),
                        2 => {
                            shape.push(json!(1));
                            Value::Array(shape)
                        }
                        3 => {
                            shape.reverse();
                            Value::Array(shape)
                        }
                        4 => json!([1u64 << 32, 1u64 << 32]),
                        5 => json!([u64::MAX, 2]),
                        6 => json!([1u64 << 31, 1u64 << 31, 1u64 << 31]),
                        _ => json!([-1]),
                    };
                    let d = format!("{name}.shape={x}");
                    st.header[&name]["shape"] = x;
                    d
                }
                2 => {
                    let x = m.pick(&["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "XYZ", ""]);
                    st.header[&name]["dtype"] = json!(x);
                    format!("{name}.dtype={x}")
                }
                3 => {
                    st.header.as_object_mut().unwrap().remove(&name);
                    format!("{name} removed")
                }
                4 => {
                    st.header.as_object_mut().unwrap().remove(&name);
                    st.header[format!("{name}_renamed")] = entry;
                    format!("{name} renamed")
                }
                _ => {
                    st.header["extra.weight"] = entry;
                    format!("extra tensor aliasing {name}")
                }
            };
            (d, st.to_bytes())
        }
        // Weights that are not finite numbers.
        17 => {
            let name = names[m.below(names.len())].clone();
            let begin = st.header[&name]["data_offsets"][0].as_u64().unwrap() as usize;
            let x = m.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE / 2.0]);
            st.data[begin..begin + 4].copy_from_slice(&x.to_le_bytes());
            (format!("{name}[0] = {x}"), st.to_bytes())
        }
        18 => {
            let n = m.below(512);
            let mut b = random_bytes(&mut m.rng, n);
            if m.chance(0.5) && b.len() >= 8 {
                b[..8].copy_from_slice(&((n as u64).saturating_sub(8)).to_le_bytes());
            }
            (format!("random string of {n} bytes"), b)
        }
        _ => {
            let d = if m.chance(0.5) { "gzip(checkpoint)" } else { "header JSON replaced by an array" };
            let b = if d.starts_with("gzip") { gzip(valid) } else { assemble(b"[1,2,3]", &st.data) };
            (d.to_string(), b)
        }
    }
}

fn write_base_checkpoint(path: &Path) {
    let b = CpuBackend::shared();
    let model = Model::build("lenet", base_input(), &b, 0).unwrap();
    let meta: CheckpointMeta = serde_json::from_value(base_meta()).expect("CheckpointMeta from base_meta() JSON");
    checkpoint::save(path, &model, &meta, None).unwrap();
}

/// Runs checkpoint cases `start..` and appends one line per event to `progress`: `CASE k desc`
/// before each case, `ACCEPTED k` when it loads, `FAIL ...` for a panic or oracle violation,
/// `DONE` at the end. A case that aborts the
/// process leaves its `CASE` line last.
fn checkpoint_child(start: usize, progress: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.safetensors");
    write_base_checkpoint(&base);
    let valid = std::fs::read(&base).unwrap();
    let backend = CpuBackend::shared();
    let mut log = std::fs::OpenOptions::new().append(true).create(true).open(progress).unwrap();
    let mut line = |s: String| {
        log.write_all(s.as_bytes()).unwrap();
        log.write_all(b"\n").unwrap();
        log.flush().unwrap();
    };
    let mut tally = Tally::new("checkpoint");
    for case in start..CHECKPOINT_CASES {
        let (desc, bytes) = checkpoint_case(case, &valid);
        let path = tmp.path().join(format!("case-{case}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        line(format!("CASE {case} {}", desc.replace('\n', " ")));
        let path_text = path.display().to_string();
        tally.run(&format!("checkpoint case {case} ({desc})"), || match checkpoint::load(&path, &backend) {
            Err(e) => rejected(&e, &[&path_text]),
            Ok((model, _meta)) => {
                let nonfinite = model
                    .state()
                    .iter()
                    .filter_map(|(n, t)| {
                        t.to_vec().ok().filter(|v| v.iter().any(|x| !x.is_finite())).map(|_| n.clone())
                    })
                    .next();
                // The loader refuses non-finite weights by name: accepting one is a failure.
                assert!(nonfinite.is_none(), "loaded with a non-finite value in {nonfinite:?}");
                Ok(Verdict::Accepted)
            }
        });
        if tally.accepted > 0 {
            tally.accepted = 0;
            line(format!("ACCEPTED {case} {desc}"));
        }
        if let Some(f) = tally.failures.pop() {
            line(format!("FAIL {}", f.replace('\n', " ")));
        }
        std::fs::remove_file(&path).unwrap();
    }
    line("DONE".to_string());
}

/// The child half of `checkpoint_loader_never_panics_or_aborts`; does nothing unless that test
/// started this process.
#[test]
fn checkpoint_fuzz_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (start, progress) = spec.split_once(':').unwrap();
    checkpoint_child(start.parse().unwrap(), Path::new(progress));
}

#[test]
fn checkpoint_loader_never_panics_or_aborts() {
    // Sanity: the base checkpoint and its re-assembled header load, so mutations start from a
    // valid file.
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.safetensors");
    write_base_checkpoint(&base);
    let valid = std::fs::read(&base).unwrap();
    let again = tmp.path().join("reassembled.safetensors");
    std::fs::write(&again, Safetensors::parse(&valid).to_bytes()).unwrap();
    for p in [&base, &again] {
        let (model, meta) = checkpoint::load(p, &CpuBackend::shared()).unwrap();
        assert_eq!(model.input, base_input());
        assert_eq!(meta.arch, "lenet");
    }

    if std::env::var_os("ROTVAR_PARSER_FUZZ_KEEP").is_some() {
        // The children's progress logs (every case, what was accepted) stay for inspection.
        let logs = std::env::temp_dir().join("rotvar-parser-fuzz-logs");
        eprintln!("parser_fuzz: keeping the checkpoint logs in {}", logs.display());
        run_checkpoint_children(&logs);
    } else {
        run_checkpoint_children(tmp.path());
    }
}

/// Runs the checkpoint cases in child processes, restarting after each case that kills one, and
/// fails if any case panicked, aborted or hung. Logs go to `logs`.
fn run_checkpoint_children(logs: &Path) {
    std::fs::create_dir_all(logs).unwrap();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let (mut start, mut runs, mut cases, mut accepted) = (0usize, 0, 0, 0);
    let mut failures: Vec<String> = Vec::new();
    loop {
        runs += 1;
        let progress = logs.join(format!("progress-{runs}.txt"));
        let stderr_path = logs.join(format!("stderr-{runs}.txt"));
        let _ = std::fs::remove_file(&progress);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v {CHILD_VMEM_KIB} && exec \"$0\" \"$@\""))
            .arg(&exe)
            .args(["checkpoint_fuzz_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{start}:{}", progress.display()))
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("re-executing the test binary");
        let deadline = Instant::now() + CHILD_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&progress).unwrap_or_default();
        let mut last_case: Option<(usize, String)> = None;
        let mut done = false;
        for l in log.lines() {
            if let Some(rest) = l.strip_prefix("CASE ") {
                let (k, d) = rest.split_once(' ').unwrap_or((rest, ""));
                last_case = Some((k.parse().unwrap(), d.to_string()));
                cases += 1;
            } else if l.starts_with("ACCEPTED ") {
                accepted += 1;
            } else if let Some(rest) = l.strip_prefix("FAIL ") {
                failures.push(rest.to_string());
            } else if l == "DONE" {
                done = true;
            }
        }
        if done {
            break;
        }
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("note:")).collect();
        let tail = tail.last().copied().unwrap_or("(nothing)");
        let how = match status {
            Some(s) => format!("killed the process ({s})"),
            None => format!("did not finish within {CHILD_TIMEOUT:?}"),
        };
        let Some((k, desc)) = last_case else {
            panic!("the checkpoint child process failed before its first case ({how}); stderr: {stderr}");
        };
        failures.push(format!("checkpoint case {k} ({desc}): {how}; stderr: {tail}"));
        start = k + 1;
        if start >= CHECKPOINT_CASES {
            break;
        }
        if runs >= MAX_CHILD_RUNS {
            failures.push(format!("stopped after {runs} child processes, before case {start}"));
            break;
        }
    }
    eprintln!(
        "parser_fuzz: checkpoint::load: {cases} generated cases ({accepted} accepted) in {runs} child process(es), \
         {:.1} s, {} failure(s)",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "checkpoint::load panicked, aborted or hung on {} generated input(s):\n{}",
        failures.len(),
        failures.iter().take(200).cloned().collect::<Vec<_>>().join("\n")
    );
}
