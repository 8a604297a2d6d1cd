//! Logging set-up. Logs carry pseudonyms only, never patient data.

use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::EnvFilter;

/// Environment variable with a `tracing` filter (e.g. `info,panscreen_infer=debug`).
pub const LOG_ENV: &str = "PANSCREEN_LOG";

/// Logs to stderr at `default_level` (or `PANSCREEN_LOG`).
pub fn init_stderr(default_level: &str, json: bool) {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Logs everything at `file_level` as JSON lines to `file`, and warnings and errors to
/// stderr (where progress bars would otherwise be torn by info lines).
pub fn init_file_and_stderr(file: &Path, file_level: &str) -> std::io::Result<()> {
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(file)?;
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new(file_level));
    let writer = Mutex::new(log_file).and(std::io::stderr.with_max_level(tracing::Level::WARN));
    let _ = tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(writer).try_init();
    Ok(())
}
