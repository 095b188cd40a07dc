//! `ROTVAR_LAUNCH_LOG=FILE`: each distinct (kernel, block dims, dynamic shared bytes) that the
//! backend launches is appended to FILE when first seen, one line `name bx by bz shared`.
//! benches/kernel_report.py computes occupancy under exactly these configurations, so the
//! report follows the launch code instead of a hand-kept list. Appending line by line lets
//! several runs (selftest, train, bench) share one file and keeps what a crashed run launched.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

pub const ENV: &str = "ROTVAR_LAUNCH_LOG";

type Config = (String, (u32, u32, u32), u32);

pub struct LaunchLog {
    path: PathBuf,
    seen: Mutex<HashSet<Config>>,
}

impl LaunchLog {
    pub fn new(path: impl Into<PathBuf>) -> LaunchLog {
        LaunchLog { path: path.into(), seen: Mutex::default() }
    }

    /// Append the configuration unless this log has recorded it already.
    pub fn record(&self, name: &str, block: (u32, u32, u32), shared: u32) -> std::io::Result<()> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&(name.to_string(), block, shared)) {
            return Ok(());
        }
        let line = format!("{name} {} {} {} {shared}\n", block.0, block.1, block.2);
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        // One write per line: concurrent appenders (several processes) do not interleave.
        f.write_all(line.as_bytes())?;
        seen.insert((name.to_string(), block, shared));
        Ok(())
    }
}

/// Record a launch in the log named by $ROTVAR_LAUNCH_LOG, if set. A log that cannot be
/// written is reported once and never fails the launch.
pub fn record(name: &str, block: (u32, u32, u32), shared: u32) {
    static LOG: OnceLock<Option<LaunchLog>> = OnceLock::new();
    static WARNED: AtomicBool = AtomicBool::new(false);
    let log = LOG.get_or_init(|| std::env::var_os(ENV).filter(|p| !p.is_empty()).map(LaunchLog::new));
    if let Some(log) = log {
        if let Err(e) = log.record(name, block, shared) {
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!("warning: cannot append to {ENV}={}: {e}", log.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_each_distinct_configuration_once_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("launches.txt");
        std::fs::write(&path, "earlier_run 32 1 1 0\n").unwrap();
        let log = LaunchLog::new(&path);
        log.record("k", (256, 1, 1), 0).unwrap();
        log.record("k", (256, 1, 1), 0).unwrap();
        log.record("k", (128, 2, 1), 0).unwrap();
        log.record("k", (256, 1, 1), 4096).unwrap();
        log.record("other", (256, 1, 1), 0).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "earlier_run 32 1 1 0\nk 256 1 1 0\nk 128 2 1 0\nk 256 1 1 4096\nother 256 1 1 0\n");
    }

    #[test]
    fn unwritable_log_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let log = LaunchLog::new(dir.path().join("no_such_dir").join("x.txt"));
        assert!(log.record("k", (1, 1, 1), 0).is_err());
        // Not marked seen: a later record retries.
        assert!(log.record("k", (1, 1, 1), 0).is_err());
    }
}
