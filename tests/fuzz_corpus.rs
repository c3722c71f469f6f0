//! Every seed in `fuzz/corpus/` through the fuzz targets' own checks (`fuzz/checks.rs`), so a plain
//! `cargo test` exercises them without cargo-fuzz. A crash input found by fuzzing goes into the corpus once fixed.

#[path = "../fuzz/checks.rs"]
mod checks;
#[path = "../fuzz/http1_checks.rs"]
mod http1_checks;

use std::path::Path;

/// Runs `check` on every file of `fuzz/corpus/<target>`; returns how many there were.
fn run_corpus(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} failed its check", path.display());
        count += 1;
    }
    count
}

#[test]
fn the_canonicalizer_seed_corpus_passes_its_checks() {
    let seeds = run_corpus("canonicalize", checks::canonicalize);
    assert!(seeds >= 10, "only {seeds} seeds");
}

#[test]
fn the_config_seed_corpus_passes_its_checks() {
    let seeds = run_corpus("config", checks::config);
    assert!(seeds >= 5, "only {seeds} seeds");
}

#[test]
fn the_http1_seed_corpus_reads_the_same_as_hyper() {
    let seeds = run_corpus("http1_response", http1_checks::http1_response);
    assert!(seeds >= 7, "only {seeds} seeds");
}
