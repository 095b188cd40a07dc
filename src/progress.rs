//! Progress bars for long work: drawn on a terminal, silent otherwise (logs, CI, pipes).

use indicatif::{ProgressBar, ProgressStyle};

pub fn bar(len: u64, prefix: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix.to_string());
    pb
}

/// Print a line above an active bar, or plainly when there is none.
pub fn note(pb: Option<&ProgressBar>, line: &str) {
    match pb {
        Some(pb) if !pb.is_hidden() => pb.println(line),
        _ => eprintln!("{line}"),
    }
}
