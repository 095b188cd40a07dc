fn main() {
    if let Err(e) = rotvar::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
