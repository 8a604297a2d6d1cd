//! The model manifest: `models/<name>/manifest.toml`.
//!
//! The manifest is the contract between preprocess and infer and the model file: what
//! tensor the model takes (name, shape, spacing, intensity handling), what it returns,
//! the decision threshold, and the sha256 of the `.onnx` (checked before loading). A
//! real model drops in by shipping its `.onnx` and a manifest; no code changes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// `searched`: where else a relative path was looked for ("; looked in: …"), or "".
    #[error("model manifest {path} does not exist{searched}")]
    Missing { path: PathBuf, searched: String },
    #[error("cannot read model manifest {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("model manifest {path} is not valid: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub name: String,
    pub version: String,
    /// File name of the ONNX model, relative to the manifest.
    pub onnx: String,
    /// Lowercase hex sha256 of the ONNX file.
    pub sha256: String,
    pub intended_use: String,
    /// False for anything that was not validated clinically.
    pub clinical_use: bool,
    pub input: InputSpec,
    pub outputs: OutputSpec,
    /// Probability at or above which a study is flagged for recall.
    pub threshold: f64,
    /// Directory of the manifest (filled in by [`ModelManifest::load`]).
    #[serde(skip)]
    pub directory: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    /// `[batch, 1, depth, height, width]`; batch is -1 when dynamic.
    pub shape: [i64; 5],
    /// Voxel spacing (depth, height, width) in mm.
    pub spacing_mm: [f64; 3],
    /// Where the fixed field of view is placed: "center" (centre of the scanned volume).
    pub crop: CropPolicy,
    pub intensity: IntensitySpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CropPolicy {
    Center,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntensitySpec {
    /// HU outside this window are clipped to it.
    pub window_hu: [f64; 2],
    pub normalize: Normalization,
    /// Value for voxels outside the scanned volume, in HU.
    pub fill_hu: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Normalization {
    /// Clipped HU, as is.
    None,
    /// Clipped HU scaled to [0, 1] over the window.
    Window,
    /// (HU - mean) / std after clipping.
    Zscore { mean: f64, std: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Output of shape `[batch, 1]`: lesion probability in [0, 1].
    pub probability: String,
    /// Optional output of the input's shape: per-voxel lesion probability.
    pub mask: Option<String>,
    /// Voxels at or above this mask value belong to the lesion.
    #[serde(default = "default_mask_threshold")]
    pub mask_threshold: f64,
}

fn default_mask_threshold() -> f64 {
    0.5
}

impl ModelManifest {
    /// Reads and checks the manifest at `path` (the file, or the model directory holding
    /// `manifest.toml`). A
    /// relative path that is not under the working directory is looked for where the
    /// binary's own files are ([`crate::install`]), so the default `models/tiny-panda`
    /// is found from any directory.
    pub fn load(path: &Path) -> Result<ModelManifest, ManifestError> {
        let names_a_file = path.extension().is_some_and(|extension| extension == "toml");
        let file = if names_a_file { path.to_path_buf() } else { path.join("manifest.toml") };
        let file = if file.exists() || file.is_absolute() {
            file
        } else {
            let installed = Path::new("models").join(file.strip_prefix("models").unwrap_or(&file));
            crate::install::find(&file, &installed, Path::is_file).map_err(|searched| {
                let places: Vec<String> =
                    searched.iter().map(|p| p.display().to_string()).collect();
                ManifestError::Missing {
                    path: file.clone(),
                    searched: format!("; looked in: {}", places.join(", ")),
                }
            })?
        };
        if !file.exists() {
            return Err(ManifestError::Missing { path: file, searched: String::new() });
        }
        let text = std::fs::read_to_string(&file)
            .map_err(|source| ManifestError::Unreadable { path: file.clone(), source })?;
        let mut manifest: ModelManifest = toml::from_str(&text).map_err(|error| {
            ManifestError::Invalid { path: file.clone(), detail: error.message().to_string() }
        })?;
        manifest.directory = file.parent().map(Path::to_path_buf).unwrap_or_default();
        manifest.validate().map_err(|detail| ManifestError::Invalid { path: file, detail })?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        let [batch, channels, depth, height, width] = self.input.shape;
        if batch != -1 && batch < 1 {
            return Err(format!("input batch dimension must be -1 or positive, not {batch}"));
        }
        if channels != 1 || depth < 1 || height < 1 || width < 1 {
            return Err(format!(
                "input shape must be [batch, 1, depth, height, width], not {:?}",
                self.input.shape
            ));
        }
        if self.input.spacing_mm.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(format!("input spacing must be positive, not {:?}", self.input.spacing_mm));
        }
        let [low, high] = self.input.intensity.window_hu;
        if low.partial_cmp(&high) != Some(std::cmp::Ordering::Less) {
            return Err(format!("intensity window must be increasing, not [{low}, {high}]"));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(format!("threshold must be within [0, 1], not {}", self.threshold));
        }
        if self.sha256.len() != 64 || !self.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("sha256 must be 64 hex characters".to_string());
        }
        Ok(())
    }

    /// Path of the ONNX file.
    pub fn onnx_path(&self) -> PathBuf {
        self.directory.join(&self.onnx)
    }

    /// Spatial shape (depth, height, width) of one input.
    pub fn volume_shape(&self) -> [usize; 3] {
        let [_, _, depth, height, width] = self.input.shape;
        [depth as usize, height as usize, width as usize]
    }

    /// Maps clipped HU to the model's input scale.
    pub fn normalize(&self, hu: f32) -> f32 {
        let [low, high] = self.input.intensity.window_hu;
        let clipped = (hu as f64).clamp(low, high);
        let value = match self.input.intensity.normalize {
            Normalization::None => clipped,
            Normalization::Window => (clipped - low) / (high - low),
            Normalization::Zscore { mean, std } => (clipped - mean) / std,
        };
        value as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name = "m"
version = "1"
onnx = "m.onnx"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
intended_use = "test"
clinical_use = false
threshold = 0.5
[input]
name = "ct"
shape = [-1, 1, 8, 16, 16]
spacing_mm = [3.0, 2.0, 2.0]
crop = "center"
[input.intensity]
window_hu = [-100.0, 300.0]
normalize = { kind = "window" }
fill_hu = -1000.0
[outputs]
probability = "p"
mask = "m"
"#;

    fn write(text: &str) -> (tempfile::TempDir, ModelManifest) {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("manifest.toml"), text).unwrap();
        let manifest = ModelManifest::load(directory.path()).unwrap();
        (directory, manifest)
    }

    #[test]
    fn loads_and_normalizes() {
        let (directory, manifest) = write(EXAMPLE);
        assert_eq!(manifest.onnx_path(), directory.path().join("m.onnx"));
        assert_eq!(manifest.volume_shape(), [8, 16, 16]);
        assert_eq!(manifest.normalize(-500.0), 0.0);
        assert_eq!(manifest.normalize(100.0), 0.5);
        assert_eq!(manifest.normalize(900.0), 1.0);
        assert_eq!(manifest.outputs.mask_threshold, 0.5);
    }

    #[test]
    fn rejects_bad_values_with_the_reason() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(
            directory.path().join("manifest.toml"),
            EXAMPLE.replace("threshold = 0.5", "threshold = 5.0"),
        )
        .unwrap();
        let error = ModelManifest::load(directory.path()).unwrap_err().to_string();
        assert!(error.contains("threshold must be within [0, 1], not 5"), "{error}");
    }

    #[test]
    fn missing_manifest_names_the_path() {
        let error =
            ModelManifest::load(Path::new("/nowhere/manifest.toml")).unwrap_err().to_string();
        assert_eq!(error, "model manifest /nowhere/manifest.toml does not exist");
    }
}
