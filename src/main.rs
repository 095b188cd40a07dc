fn main() {
    // `rotvar models | head` closes the pipe early: end quietly, as Unix tools do, instead of
    // panicking in println!.
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(e) = rotvar::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
