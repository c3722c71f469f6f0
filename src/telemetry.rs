//! Logging: `tracing` to stderr, as text or JSON. The filter comes from `RUNONCE_LOG`, else `RUST_LOG`, else
//! `info`. Standard output is left for the one machine-readable `listening …` line the commands print.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber with `default` as the filter unless the environment sets one; a second
/// call (tests) is a no-op.
pub fn init(format: LogFormat, default: &str) {
    let filter = std::env::var("RUNONCE_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    // Colours only on a terminal: escape codes are noise in a log file or a collector, and rendering them was
    // a third of the cost of the one line per guarded call (callgrind).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
