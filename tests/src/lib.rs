//! Helpers for panscreen's end-to-end tests: where the binary and the Python are,
//! running the CLI, reading the Parquet tables back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use panscreen::evaluate::{parquet_files, read_batches};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// The `panscreen` binary: `PANSCREEN_BIN`, else target/release or target/debug.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PANSCREEN_BIN") {
        return PathBuf::from(path);
    }
    for profile in ["release", "debug"] {
        let path = workspace_root().join("target").join(profile).join("panscreen");
        if path.is_file() {
            return path;
        }
    }
    panic!("the panscreen binary is not built; run `cargo xtask test` (or `cargo build --release -p panscreen`)");
}

/// Python with the packages of tests/requirements.txt.
pub fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("PANSCREEN_PYTHON") {
        return PathBuf::from(path);
    }
    let path = workspace_root().join(".panscreen/venv/bin/python");
    assert!(path.is_file(), "{} is missing; run `cargo xtask setup-python` (or `cargo xtask test`)", path.display());
    path
}

/// Runs `panscreen ARGS` from the workspace root; returns the output.
pub fn panscreen(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(binary()).current_dir(workspace_root()).args(args).output().expect("panscreen starts")
}

/// Every file below `directory`.
pub fn files_below(directory: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

pub mod servers;
