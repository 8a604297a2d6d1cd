//! Finding, checking and loading ONNX Runtime.
//!
//! `ort` is built with `load-dynamic`: nothing is downloaded at build time (hospital
//! networks and CI have no open internet). The library is PyPI's `onnxruntime` wheel's
//! `libonnxruntime.so`, pinned by version and sha256, put in place by
//! `cargo xtask fetch-ort`. Search order:
//!
//! 1. `PANSCREEN_ORT_DYLIB`, then `ORT_DYLIB_PATH` (any path);
//! 2. `.panscreen/onnxruntime/<file>` in the working directory or any parent of it,
//!    then beside the executable or any parent of it;
//! 3. `<prefix>/share/panscreen/onnxruntime/<file>` for an executable in `<prefix>/bin`,
//!    then `~/.local/share/panscreen/onnxruntime/<file>`;
//! 4. `.panscreen/onnxruntime/<file>` in the source tree the binary was built from
//!    (so `cargo install --path services/panscreen` works from any directory).
//!
//! ([`panscreen_shared::install`] is that order, shared with the default model.)
//!
//! The file's sha256 must equal the pinned one. Another build (the CUDA one, say) is
//! accepted when `PANSCREEN_ORT_SHA256` names its checksum.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::logging::LogLevel;
use sha2::{Digest, Sha256};

/// The ONNX Runtime version `ort` 2.0.0-rc.15 targets.
pub const ORT_VERSION: &str = "1.31.1";
/// File name inside the wheel (`onnxruntime/capi/`).
pub const ORT_LIBRARY_FILE: &str = "libonnxruntime.so.1.31.1";
/// sha256 of `libonnxruntime.so.1.31.1` from `onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl`.
pub const ORT_LIBRARY_SHA256: &str =
    "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3";

pub const DYLIB_ENV: &str = "PANSCREEN_ORT_DYLIB";
pub const SHA256_ENV: &str = "PANSCREEN_ORT_SHA256";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime {ORT_VERSION} ({ORT_LIBRARY_FILE}) was not found; looked in: {searched}. \
         Run `cargo xtask fetch-ort`, or set {DYLIB_ENV} to the library's path"
    )]
    NotFound { searched: String },
    #[error("{DYLIB_ENV} points at {0}, which does not exist")]
    Missing(PathBuf),
    #[error(
        "ONNX Runtime at {path} has sha256 {actual}, expected {expected}; \
         run `cargo xtask fetch-ort` again, or set {SHA256_ENV}={actual} to accept this build"
    )]
    Checksum { path: PathBuf, actual: String, expected: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot load ONNX Runtime from {path}: {detail}")]
    Load { path: PathBuf, detail: String },
    /// The first attempt in this process failed; the same reason, again.
    #[error("{0}")]
    Unavailable(String),
}

/// sha256 of a file, as lowercase hex.
pub fn file_sha256(path: &Path) -> Result<String, RuntimeError> {
    let mut file = std::fs::File::open(path)
        .map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn candidates() -> Vec<PathBuf> {
    panscreen_shared::install::candidates(
        &Path::new(".panscreen").join("onnxruntime").join(ORT_LIBRARY_FILE),
        &Path::new("onnxruntime").join(ORT_LIBRARY_FILE),
    )
}

/// Where the library is, by the search order above.
pub fn locate() -> Result<PathBuf, RuntimeError> {
    for variable in [DYLIB_ENV, "ORT_DYLIB_PATH"] {
        if let Some(value) = std::env::var_os(variable).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(value);
            return if path.is_file() { Ok(path) } else { Err(RuntimeError::Missing(path)) };
        }
    }
    let candidates = candidates();
    candidates.iter().find(|path| path.is_file()).cloned().ok_or_else(|| RuntimeError::NotFound {
        searched: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// Checks the library against the pinned checksum (or `PANSCREEN_ORT_SHA256`).
pub fn verify(path: &Path) -> Result<(), RuntimeError> {
    let actual = file_sha256(path)?;
    let expected = std::env::var(SHA256_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| ORT_LIBRARY_SHA256.to_string());
    if actual.eq_ignore_ascii_case(&expected) {
        return Ok(());
    }
    Err(RuntimeError::Checksum { path: path.to_path_buf(), actual, expected })
}

/// ONNX Runtime's own log lines, one level down: its INFO lines (graph transformers,
/// "modified: 0", one per optimiser pass at every load) are debugging detail, not news
/// for an operator. Target `onnxruntime`, so `PANSCREEN_LOG=onnxruntime=debug` shows them.
fn onnxruntime_log(level: LogLevel, category: &str, _id: &str, location: &str, message: &str) {
    match level {
        LogLevel::Verbose => {
            tracing::trace!(target: "onnxruntime", category, location, "{message}")
        }
        LogLevel::Info => tracing::debug!(target: "onnxruntime", category, location, "{message}"),
        LogLevel::Warning => tracing::warn!(target: "onnxruntime", category, location, "{message}"),
        LogLevel::Error | LogLevel::Fatal => {
            tracing::error!(target: "onnxruntime", category, location, "{message}")
        }
    }
}

static ENVIRONMENT: OnceLock<Result<(PathBuf, ort::environment::Environment), String>> =
    OnceLock::new();

/// The process-wide ONNX Runtime environment, loaded once from the verified library.
pub fn environment() -> Result<(&'static Path, &'static ort::environment::Environment), RuntimeError>
{
    let loaded = ENVIRONMENT.get_or_init(|| {
        let path = locate().map_err(|e| e.to_string())?;
        verify(&path).map_err(|e| e.to_string())?;
        let builder = ort::init_from(&path).map_err(|e| {
            RuntimeError::Load { path: path.clone(), detail: e.to_string() }.to_string()
        })?;
        let environment = builder
            .with_name("panscreen")
            .with_logger(std::sync::Arc::new(onnxruntime_log))
            .build()
            .map_err(|e| {
                RuntimeError::Load { path: path.clone(), detail: e.to_string() }.to_string()
            })?;
        Ok((path, environment))
    });
    match loaded {
        Ok((path, environment)) => Ok((path.as_path(), environment)),
        Err(message) => Err(RuntimeError::Unavailable(message.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_mismatch_names_both_sums_and_the_fix() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("libfake.so");
        std::fs::write(&path, b"not a library").unwrap();
        let error = verify(&path).unwrap_err().to_string();
        assert!(error.contains("expected"), "{error}");
        assert!(error.contains("cargo xtask fetch-ort"), "{error}");
        assert!(error.contains(&file_sha256(&path).unwrap()), "{error}");
    }
}
