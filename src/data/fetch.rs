//! `rotvar fetch mnist`: downloads the four MNIST files into `<data_dir>/mnist/` and verifies
//! them.
//!
//! Verification hashes the *decompressed* content, because mirrors (and the copy in
//! shared/datasets/mnist) recompress the files, so the `.gz` bytes differ from place to place
//! while the IDX content does not.

use super::mnist::{decode_maybe_gzip, locate, FILE_NAMES, MNIST_SUBDIR};
use super::DATA_DIR_HINT;
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Public mirrors of the original files, tried in order. Each serves `<base>.gz`.
pub const MIRRORS: &[&str] =
    &["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"];

/// SHA-256 of each *decompressed* file, copied from shared/datasets/mnist/README.md (they are
/// the hashes of the original LeCun IDX files, so every faithful mirror matches them).
pub const MNIST_SHA256: [(&str, &str); 4] = [
    (FILE_NAMES[0], "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    (FILE_NAMES[1], "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    (FILE_NAMES[2], "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    (FILE_NAMES[3], "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
];

/// The gzipped training images are ~10 MB; the cap only guards against a misbehaving server.
const MAX_DOWNLOAD: u64 = 64 << 20;

/// Downloads whichever MNIST files are missing or invalid from [`MIRRORS`].
pub fn fetch_mnist(data_dir: &Path) -> Result<()> {
    fetch_mnist_from(data_dir, MIRRORS)
}

/// [`fetch_mnist`] with an explicit mirror list (base URLs ending in `/`), so tests can point it
/// at unreachable or local servers.
///
/// Stops at the first file that no mirror could provide: on an offline machine every further
/// file would fail the same way, and the user should learn that within seconds, not minutes.
pub fn fetch_mnist_from(data_dir: &Path, mirrors: &[&str]) -> Result<()> {
    let dir = data_dir.join(MNIST_SUBDIR);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create {}; choose another --data-dir", dir.display()))?;
    let agent = make_agent();
    for (i, (base, sha)) in MNIST_SHA256.iter().enumerate() {
        if let Some(path) = locate(&dir, base) {
            match file_matches(&path, sha)? {
                true => {
                    eprintln!("{}: present and verified, skipping", path.display());
                    continue;
                }
                false => eprintln!(
                    "{}: present but its content does not match the official SHA-256; \
                     downloading a fresh copy",
                    path.display()
                ),
            }
        }
        let mut failures = Vec::new();
        let mut fetched = false;
        for mirror in mirrors {
            let url = format!("{mirror}{base}.gz");
            eprintln!("downloading {url}");
            match download_verified(&agent, &url, sha) {
                Ok(body) => {
                    // Keep the bytes exactly as verified; a mirror that serves raw IDX gets a
                    // raw file rather than a misnamed one.
                    let name = if body.starts_with(&[0x1f, 0x8b]) { format!("{base}.gz") } else { base.to_string() };
                    write_atomically(&dir.join(name), &body)?;
                    fetched = true;
                    break;
                }
                Err(e) => failures.push(format!("  {url}: {e}")),
            }
        }
        if !fetched {
            let not_tried = &MNIST_SHA256[i + 1..];
            let skipped = if not_tried.is_empty() {
                String::new()
            } else {
                let names: Vec<String> = not_tried.iter().map(|(b, _)| format!("{b}.gz")).collect();
                format!("Not attempted after this failure: {}.\n", names.join(", "))
            };
            let all: Vec<String> = FILE_NAMES.iter().map(|b| format!("{b}.gz")).collect();
            bail!(
                "could not download MNIST file {base}.gz; every mirror failed:\n{}\n{skipped}\
                 If this machine is offline, fetch the files elsewhere ({}) from any MNIST \
                 mirror, e.g. the URLs above, and put them, gzipped or not, into {}. Then \
                 `rotvar fetch mnist` only verifies them. Without any download, \
                 `--dataset mnist-sample` uses the bundled real MNIST subset.\n{DATA_DIR_HINT}",
                failures.join("\n"),
                all.join(", "),
                dir.display()
            );
        }
    }
    Ok(())
}

/// For each MNIST file present in `<data_dir>/mnist/` (the `.gz` form preferred), its file name
/// and whether its decompressed content has the official SHA-256. Absent files are not listed.
pub fn verify_mnist(data_dir: &Path) -> Result<Vec<(String, bool)>> {
    let dir = data_dir.join(MNIST_SUBDIR);
    let mut out = Vec::new();
    for (base, sha) in MNIST_SHA256 {
        if let Some(path) = locate(&dir, base) {
            let name = path.file_name().map_or_else(|| base.to_string(), |n| n.to_string_lossy().into_owned());
            out.push((name, file_matches(&path, sha)?));
        }
    }
    Ok(out)
}

/// Whether a (gzipped or raw) file's decompressed content hashes to `sha`. Corrupt gzip counts
/// as a mismatch; only failing to read the file at all is an error.
fn file_matches(path: &Path, sha: &str) -> Result<bool> {
    let bytes = super::read_file(path)?;
    Ok(match decode_maybe_gzip(bytes, &path.display().to_string()) {
        Ok(content) => sha256_hex(&content) == sha,
        Err(_) => false,
    })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Timeouts bound every phase, so an unreachable or stalled mirror costs at most ~30 s:
/// resolving and connecting 10 s each, the first response byte 15 s, and any silent gap while
/// the body streams 20 s. The whole transfer is capped at 10 minutes for very slow links.
fn make_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_resolve(Some(Duration::from_secs(10)))
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(15)))
        .timeout_per_read(Some(Duration::from_secs(20)))
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// Downloads `url` and returns its body if the decompressed content hashes to `sha`.
fn download_verified(agent: &ureq::Agent, url: &str, sha: &str) -> Result<Vec<u8>> {
    let mut response = agent.get(url).call().map_err(|e| anyhow!("{e}"))?;
    let mut body = Vec::new();
    response
        .body_mut()
        .with_config()
        .limit(MAX_DOWNLOAD)
        .reader()
        .read_to_end(&mut body)
        .map_err(|e| anyhow!("download interrupted: {e}"))?;
    let content = decode_maybe_gzip(body.clone(), url)?;
    let got = sha256_hex(&content);
    if got != sha {
        bail!(
            "SHA-256 of the decompressed content is {got}, expected {sha}; the mirror serves a \
             different or damaged file"
        );
    }
    Ok(body)
}

/// Writes via a temporary file in the same directory and a rename, so an interrupted fetch
/// never leaves a half-written file under the final name.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{file_name}.part-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    eprintln!("{}: written and verified", path.display());
    Ok(())
}
