//! Where panscreen finds the files it ships beside its binary (the default model, ONNX
//! Runtime), wherever it was installed and wherever it is started.
//!
//! The same binary runs from the source tree (`target/release/panscreen`), after
//! `cargo install --path services/panscreen` (`~/.cargo/bin`), from an install prefix
//! (`<prefix>/bin` with `<prefix>/share/panscreen`), and in the container image; each
//! from any working directory. A file is looked for, in order:
//!
//! 1. under the working directory and each of its parents (`<dir>/<in_tree>`);
//! 2. under the executable's directory and each of its parents, then in
//!    `<prefix>/share/panscreen/<installed>` when the executable is in `<prefix>/bin`;
//! 3. in `$XDG_DATA_HOME/panscreen/<installed>` (by default `~/.local/share/panscreen`);
//! 4. in the source tree the binary was built from, if it is still there.

use std::path::{Path, PathBuf};

/// The source tree this crate was compiled from (the workspace root).
fn source_root() -> Option<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf)
}

fn data_home() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
}

/// Every place, in search order, where a file shipped as `in_tree` in the source tree
/// (e.g. `models/learned-cascade`) or as `installed` under a data directory (e.g.
/// `models/learned-cascade`) may be.
pub fn candidates(in_tree: &Path, installed: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    if let Ok(directory) = std::env::current_dir() {
        paths.extend(directory.ancestors().map(|root| root.join(in_tree)));
    }
    if let Some(directory) =
        std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        paths.extend(directory.ancestors().map(|root| root.join(in_tree)));
        if directory.file_name().is_some_and(|name| name == "bin") {
            if let Some(prefix) = directory.parent() {
                paths.push(prefix.join("share/panscreen").join(installed));
            }
        }
    }
    if let Some(data) = data_home() {
        paths.push(data.join("panscreen").join(installed));
    }
    if let Some(root) = source_root() {
        paths.push(root.join(in_tree));
    }
    let mut seen = std::collections::HashSet::new();
    paths.retain(|path| seen.insert(path.clone()));
    paths
}

/// The first of [`candidates`] that `exists`, or every place looked at.
pub fn find(
    in_tree: &Path,
    installed: &Path,
    exists: impl Fn(&Path) -> bool,
) -> Result<PathBuf, Vec<PathBuf>> {
    let candidates = candidates(in_tree, installed);
    candidates.iter().find(|path| exists(path)).cloned().ok_or(candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_directory_comes_first_and_the_source_tree_is_searched() {
        let places = candidates(Path::new("models/x"), Path::new("models/x"));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(places[0], cwd.join("models/x"));
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("models/x");
        assert!(places.contains(&source), "{places:?}");
        // No place twice (the test runs inside the source tree).
        let unique: std::collections::HashSet<_> = places.iter().collect();
        assert_eq!(unique.len(), places.len());
    }

    #[test]
    fn a_file_in_the_source_tree_is_found_from_anywhere() {
        let found = find(Path::new("Cargo.toml"), Path::new("none"), Path::is_file).unwrap();
        assert!(found.ends_with("Cargo.toml"));
        let missing = find(Path::new("no/such/file"), Path::new("no/such/file"), Path::is_file);
        assert!(missing.unwrap_err().len() >= 3);
    }
}
