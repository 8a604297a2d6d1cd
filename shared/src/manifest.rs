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
    /// Probability at or above which a study is flagged for recall: a manifest with one
    /// operating point. One with several names them in `operating_points` instead.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Maps the model's raw score to a calibrated probability; absent: the raw score is
    /// the probability.
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// Named decision thresholds on the calibrated probability, each with how it was
    /// chosen and what it achieved on validation data.
    #[serde(default)]
    pub operating_points: Vec<OperatingPoint>,
    /// The operating point that sets `flagged` (required with `operating_points`).
    #[serde(default)]
    pub default_operating_point: Option<String>,
    /// Stage 1 of a cascade: finds the pancreas on a coarse grid of the whole scan, so
    /// that this (stage 2) model sees a box around it (`input.crop = "box"`). Absent:
    /// a one-stage model on a fixed field of view.
    #[serde(default)]
    pub locate: Option<LocateSpec>,
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
    /// Where the field of view is placed: "center" (centre of the scanned volume) or
    /// "box" (around the pancreas stage 1 found; stage 2 of a cascade only).
    pub crop: CropPolicy,
    pub intensity: IntensitySpec,
    /// Stage 2 only: the box is covered by patches of `shape` (nnU-Net's sliding-window
    /// inference). Absent: one patch centred on the pancreas.
    #[serde(default)]
    pub sliding_window: Option<SlidingWindow>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CropPolicy {
    Center,
    Box,
}

/// How a box larger than one patch is covered, as nnU-Net predicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlidingWindow {
    /// Fraction of a patch that neighbouring patches share (nnU-Net: 0.5).
    #[serde(default = "default_overlap")]
    pub overlap: f64,
    /// σ of the Gaussian that weights each patch's voxels when patches are blended, as
    /// a fraction of the patch's size along each axis (nnU-Net: 1/8).
    #[serde(default = "default_sigma_scale")]
    pub sigma_scale: f64,
    /// Tensor axes (0 depth, 1 height, 2 width) mirrored for test-time augmentation:
    /// every combination of flips runs and the outputs are averaged. Empty: none.
    #[serde(default)]
    pub mirror_axes: Vec<usize>,
}

fn default_overlap() -> f64 {
    0.5
}

fn default_sigma_scale() -> f64 {
    0.125
}

/// Stage 1 of a cascade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocateSpec {
    /// File name of the stage-1 ONNX model, relative to the manifest.
    pub onnx: String,
    /// Lowercase hex sha256 of that file.
    pub sha256: String,
    /// A coarse grid of the whole scan (`crop = "center"`; its extent should cover the
    /// longest scan screened).
    pub input: InputSpec,
    /// Its segmentation output: `labels` must name `pancreas`.
    pub segmentation: SegmentationSpec,
    /// How the box stage 2 sees is derived from the pancreas map.
    #[serde(rename = "box")]
    pub box_rule: BoxRule,
}

/// The pancreas map → the box cut from the fine grid for stage 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoxRule {
    /// Pancreas probability at or above which a stage-1 voxel is pancreas. The largest
    /// connected (6-neighbour) region of such voxels is the pancreas.
    #[serde(default = "default_mask_threshold")]
    pub threshold: f64,
    /// Added to every side of the pancreas's bounding box, mm (depth, height, width).
    pub margin_mm: [f64; 3],
    /// The crop is at least this large, mm (it is never smaller than one patch).
    #[serde(default)]
    pub min_size_mm: Option<[f64; 3]>,
    /// The crop is exactly this large, centred on the pancreas (instead of its box).
    #[serde(default)]
    pub fixed_size_mm: Option<[f64; 3]>,
    /// A largest region smaller than this is not a pancreas: the study is not
    /// assessable ("no pancreas found").
    #[serde(default)]
    pub min_volume_mm3: f64,
    /// A region that comes within this distance (mm) of the scan's first or last slice
    /// or the image's side, is taken to run off the scan: the study is not assessable.
    /// 0: only a region that reaches the edge (a stage 1 that is unsure near the edge
    /// of the scan needs more).
    #[serde(default)]
    pub edge_mm: f64,
    /// Lesions are looked for only within this distance (mm) of the pancreas stage 1
    /// found: stage 2's lesion map is cleared beyond, and the study's score is the
    /// highest lesion voxel left (stage 2 needs a mask or segmentation output). Absent:
    /// anywhere in the crop, scored by stage 2's probability output.
    #[serde(default)]
    pub lesion_within_mm: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntensitySpec {
    /// HU outside this window are clipped to it.
    pub window_hu: [f64; 2],
    pub normalize: Normalization,
    /// Value for voxels outside the scanned volume, in HU.
    pub fill_hu: f64,
    /// Stage 2 of a cascade only: each crop's HU are first shifted so that the pancreas
    /// stage 1 found has this median. Glands differ by tens of HU between patients and
    /// scanners; a lesion is a few HU below its own gland.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceSpec>,
}

/// The gland's own intensity as the model's reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceSpec {
    /// The median is taken over stage 1's pancreas voxels within this range (the fat and
    /// air its coarse voxels take in at the gland's rim are left out) ...
    pub range_hu: [f64; 2],
    /// ... and the crop shifted by `median_hu - median`.
    pub median_hu: f64,
}

impl ReferenceSpec {
    /// The shifts a median within `range_hu` can make, lowest first.
    pub fn shifts(&self) -> [f64; 2] {
        [self.median_hu - self.range_hu[1], self.median_hu - self.range_hu[0]]
    }
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
    /// Output of shape `[batch, 1]`: lesion probability in [0, 1]. Without it, the
    /// study's score is the highest lesion probability of the `segmentation`'s voxels.
    #[serde(default)]
    pub probability: Option<String>,
    /// Optional output of the input's shape: per-voxel lesion probability.
    pub mask: Option<String>,
    /// Optional per-class output `[batch, classes, depth, height, width]`, as nnU-Net
    /// exports it; its lesion channel is then the mask.
    #[serde(default)]
    pub segmentation: Option<SegmentationSpec>,
    /// Voxels at or above this mask value belong to the lesion.
    #[serde(default = "default_mask_threshold")]
    pub mask_threshold: f64,
}

fn default_mask_threshold() -> f64 {
    0.5
}

/// A segmentation output: which channel holds which label, and whether the values are
/// logits (softmax over the classes is taken) or probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentationSpec {
    pub name: String,
    pub kind: SegmentationKind,
    /// Label → channel, e.g. `{ background = 0, pancreas = 1, lesion = 2 }`; `lesion`
    /// is required.
    pub labels: std::collections::BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegmentationKind {
    Logits,
    Probabilities,
}

impl SegmentationSpec {
    /// The channel of `label`, when the output has one.
    pub fn channel(&self, label: &str) -> Option<usize> {
        self.labels.get(label).copied()
    }

    pub fn lesion_channel(&self) -> usize {
        self.labels.get("lesion").copied().unwrap_or(0)
    }

    /// Classes the output must have at least (the highest channel named, plus one).
    pub fn classes(&self) -> usize {
        self.labels.values().max().map_or(0, |c| c + 1)
    }
}

/// Raw score → calibrated probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", deny_unknown_fields)]
pub enum Calibration {
    /// Platt scaling: `1 / (1 + exp(-(a · logit(score) + b)))`.
    Platt {
        a: f64,
        b: f64,
        #[serde(default)]
        prevalence: Option<f64>,
    },
    /// Isotonic regression as a non-decreasing step-free curve: `probabilities[i]` at
    /// `scores[i]`, linear between, flat beyond the ends.
    Isotonic {
        scores: Vec<f64>,
        probabilities: Vec<f64>,
        #[serde(default)]
        prevalence: Option<f64>,
    },
}

impl Calibration {
    /// The share of studies with a lesion in the cohort the map was fitted on, when the
    /// manifest states it. A calibrated probability holds at that prevalence; at a
    /// prevalence π′ the same study's is `1 / (1 + exp(-(logit p + logit π′ − logit π)))`.
    pub fn prevalence(&self) -> Option<f64> {
        match self {
            Calibration::Platt { prevalence, .. } | Calibration::Isotonic { prevalence, .. } => {
                *prevalence
            }
        }
    }

    pub fn apply(&self, score: f64) -> f64 {
        match self {
            Calibration::Platt { a, b, .. } => {
                let s = score.clamp(1e-7, 1.0 - 1e-7);
                let logit = (s / (1.0 - s)).ln();
                1.0 / (1.0 + (-(a * logit + b)).exp())
            }
            Calibration::Isotonic { scores, probabilities, .. } => {
                let at = scores.partition_point(|x| *x <= score);
                if at == 0 {
                    return probabilities[0];
                }
                if at == scores.len() {
                    return probabilities[scores.len() - 1];
                }
                let (x0, x1, y0, y1) =
                    (scores[at - 1], scores[at], probabilities[at - 1], probabilities[at]);
                y0 + (y1 - y0) * (score - x0) / (x1 - x0)
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(prevalence) = self.prevalence() {
            if !(prevalence > 0.0 && prevalence < 1.0) {
                return Err(format!(
                    "calibration prevalence is the share of studies with a lesion, between 0 \
                     and 1, not {prevalence}"
                ));
            }
        }
        match self {
            Calibration::Platt { a, b, .. } if a.is_finite() && b.is_finite() && *a > 0.0 => Ok(()),
            Calibration::Platt { a, b, .. } => {
                Err(format!("calibration a must be positive and b finite, not a = {a}, b = {b}"))
            }
            Calibration::Isotonic { scores, probabilities, .. } => {
                if scores.is_empty() || scores.len() != probabilities.len() {
                    return Err(
                        "isotonic calibration needs as many probabilities as scores, at least one"
                            .into(),
                    );
                }
                if scores
                    .windows(2)
                    .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
                {
                    return Err("isotonic calibration scores must increase".into());
                }
                if probabilities.windows(2).any(|w| w[1] < w[0])
                    || probabilities.iter().any(|p| !(0.0..=1.0).contains(p))
                {
                    return Err(
                        "isotonic calibration probabilities must be in [0, 1] and never decrease"
                            .into(),
                    );
                }
                Ok(())
            }
        }
    }
}

/// A named decision threshold and the evidence behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatingPoint {
    pub name: String,
    /// Calibrated probability at or above which a study is flagged.
    pub threshold: f64,
    /// How the point was chosen, for the model card and the results' provenance.
    #[serde(default)]
    pub validation: Option<Validation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    /// Seed of the validation cohort it was chosen on (`seed = 202`)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// ...or the seeds of several, pooled (`seeds = [202, 203]`): one of the two.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
    /// Studies in the validation data, all cohorts together.
    pub studies: u64,
    #[serde(default)]
    pub target_sensitivity: Option<f64>,
    #[serde(default)]
    pub target_specificity: Option<f64>,
    pub sensitivity: f64,
    pub specificity: f64,
}

impl Validation {
    /// The seeds of the validation cohorts, one or several.
    pub fn seeds(&self) -> Vec<u64> {
        self.seed.into_iter().chain(self.seeds.iter().copied()).collect()
    }
}

impl ModelManifest {
    /// Reads and checks the manifest at `path` (the file, or the model directory holding
    /// `manifest.toml`). A
    /// relative path that is not under the working directory is looked for where the
    /// binary's own files are ([`crate::install`]), so the default `models/learned-cascade`
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
        self.input.validate("input")?;
        match (&self.locate, self.input.crop) {
            (None, CropPolicy::Box) => {
                return Err("input.crop = \"box\" needs a [locate] stage to find the box".into())
            }
            (Some(_), CropPolicy::Center) => {
                return Err("with a [locate] stage, input.crop must be \"box\"".into())
            }
            (None, CropPolicy::Center) if self.input.sliding_window.is_some() => {
                return Err("input.sliding_window needs input.crop = \"box\"".into())
            }
            _ => {}
        }
        if self.locate.is_none() && self.input.intensity.reference.is_some() {
            return Err(
                "input.intensity.reference needs a [locate] stage to find the pancreas".into()
            );
        }
        if let Some(locate) = &self.locate {
            locate.input.validate("locate.input")?;
            if locate.input.intensity.reference.is_some() {
                return Err("locate.input.intensity.reference: only stage 2 has a reference".into());
            }
            check_sha256("locate.sha256", &locate.sha256)?;
            if locate.input.crop != CropPolicy::Center || locate.input.sliding_window.is_some() {
                return Err("locate.input.crop must be \"center\", without a sliding window".into());
            }
            if !locate.segmentation.labels.contains_key("pancreas") {
                return Err("locate.segmentation.labels must name the pancreas channel".into());
            }
            let rule = &locate.box_rule;
            if !(0.0..=1.0).contains(&rule.threshold) {
                return Err(format!(
                    "locate.box.threshold must be within [0, 1], not {}",
                    rule.threshold
                ));
            }
            let sizes = [
                Some(rule.margin_mm),
                rule.min_size_mm,
                rule.fixed_size_mm,
                Some([rule.edge_mm; 3]),
                rule.lesion_within_mm.map(|mm| [mm; 3]),
            ];
            if sizes.iter().flatten().flatten().any(|mm| !(mm.is_finite() && *mm >= 0.0)) {
                return Err("locate.box sizes (margin_mm, min_size_mm, fixed_size_mm, edge_mm, \
                            lesion_within_mm) must be finite and not negative"
                    .into());
            }
            let has_map = self.outputs.mask.is_some() || self.outputs.segmentation.is_some();
            if rule.lesion_within_mm.is_some() && !has_map {
                return Err("locate.box.lesion_within_mm needs a lesion map from stage 2 \
                            (outputs.mask or outputs.segmentation)"
                    .into());
            }
        }
        match (self.threshold, self.operating_points.is_empty()) {
            (Some(_), false) => {
                return Err(
                    "give either threshold (one operating point) or operating_points, not both"
                        .into(),
                )
            }
            (None, true) => {
                return Err(
                    "threshold (or operating_points with default_operating_point) is missing"
                        .into(),
                )
            }
            _ => {}
        }
        if let Some(threshold) = self.threshold {
            if !(0.0..=1.0).contains(&threshold) {
                return Err(format!("threshold must be within [0, 1], not {threshold}"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for point in &self.operating_points {
            if !names.insert(point.name.as_str()) {
                return Err(format!("operating point {:?} is named twice", point.name));
            }
            if !(0.0..=1.0).contains(&point.threshold) {
                return Err(format!(
                    "operating point {:?}: threshold must be within [0, 1], not {}",
                    point.name, point.threshold
                ));
            }
            if let Some(validation) = &point.validation {
                if !matches!(
                    (validation.seed, validation.seeds.is_empty()),
                    (Some(_), true) | (None, false)
                ) {
                    return Err(format!(
                        "operating point {:?}: validation needs seed (one cohort) or seeds \
                         (several, pooled), one of the two",
                        point.name
                    ));
                }
            }
        }
        if !self.operating_points.is_empty() {
            match &self.default_operating_point {
                Some(name) if names.contains(name.as_str()) => {}
                Some(name) => {
                    return Err(format!(
                        "default_operating_point {name:?} is not among the operating points ({})",
                        self.operating_points
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
                None => return Err("default_operating_point is missing".into()),
            }
        }
        if let Some(calibration) = &self.calibration {
            calibration.validate()?;
        }
        match (&self.outputs.probability, &self.outputs.segmentation) {
            (None, None) => {
                return Err("outputs need a probability or a segmentation (or both)".into())
            }
            (_, Some(segmentation)) => {
                if !segmentation.labels.contains_key("lesion") {
                    return Err("outputs.segmentation.labels must name the lesion channel".into());
                }
                if self.outputs.mask.is_some() {
                    return Err("give outputs.mask or outputs.segmentation, not both: the \
                                segmentation's lesion channel is the mask"
                        .into());
                }
            }
            _ => {}
        }
        check_sha256("sha256", &self.sha256)
    }

    /// The manifest as TOML, as `load` reads it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a manifest serializes")
    }

    /// The operating point that sets `flagged`: the named default, or the one
    /// `threshold` of a single-point manifest (named "default").
    pub fn default_point(&self) -> OperatingPoint {
        let named = self.default_operating_point.as_ref().and_then(|name| {
            self.operating_points.iter().find(|point| &point.name == name).cloned()
        });
        named.unwrap_or_else(|| OperatingPoint {
            name: "default".into(),
            threshold: self.threshold.unwrap_or(0.5),
            validation: None,
        })
    }

    /// The calibrated probability of a raw score.
    pub fn calibrate(&self, score: f64) -> f64 {
        self.calibration.as_ref().map_or(score, |calibration| calibration.apply(score))
    }

    /// Path of the ONNX file.
    pub fn onnx_path(&self) -> PathBuf {
        self.directory.join(&self.onnx)
    }

    /// Spatial shape (depth, height, width) of one (stage-2) input.
    pub fn volume_shape(&self) -> [usize; 3] {
        self.input.volume_shape()
    }

    /// The grid preprocess stores for the first model to run: stage 1's for a cascade.
    pub fn first_input(&self) -> &InputSpec {
        self.locate.as_ref().map_or(&self.input, |locate| &locate.input)
    }

    /// Maps HU to the first model's input scale.
    pub fn normalize(&self, hu: f32) -> f32 {
        self.first_input().intensity.normalize(hu)
    }
}

impl IntensitySpec {
    /// Maps clipped HU to the model's input scale.
    pub fn normalize(&self, hu: f32) -> f32 {
        let [low, high] = self.window_hu;
        let clipped = (hu as f64).clamp(low, high);
        let value = match self.normalize {
            Normalization::None => clipped,
            Normalization::Window => (clipped - low) / (high - low),
            Normalization::Zscore { mean, std } => (clipped - mean) / std,
        };
        value as f32
    }
}

impl InputSpec {
    /// Spatial shape (depth, height, width) of one input.
    pub fn volume_shape(&self) -> [usize; 3] {
        let [_, _, depth, height, width] = self.shape;
        [depth as usize, height as usize, width as usize]
    }

    fn validate(&self, field: &str) -> Result<(), String> {
        let [batch, channels, depth, height, width] = self.shape;
        if batch != -1 && batch < 1 {
            return Err(format!("{field}.shape: batch must be -1 or positive, not {batch}"));
        }
        if channels != 1 || depth < 1 || height < 1 || width < 1 {
            return Err(format!(
                "{field}.shape must be [batch, 1, depth, height, width], not {:?}",
                self.shape
            ));
        }
        if self.spacing_mm.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(format!("{field}.spacing_mm must be positive, not {:?}", self.spacing_mm));
        }
        let [low, high] = self.intensity.window_hu;
        if low.partial_cmp(&high) != Some(std::cmp::Ordering::Less) {
            return Err(format!(
                "{field}.intensity.window_hu must be increasing, not [{low}, {high}]"
            ));
        }
        if let Some(reference) = &self.intensity.reference {
            let [low, high] = reference.range_hu;
            if low.partial_cmp(&high) != Some(std::cmp::Ordering::Less)
                || low < -32768.0
                || high > 32767.0
            {
                return Err(format!(
                    "{field}.intensity.reference.range_hu must be increasing HU, not [{low}, {high}]"
                ));
            }
            if !reference.median_hu.is_finite() {
                return Err(format!("{field}.intensity.reference.median_hu must be a number"));
            }
        }
        if let Some(window) = &self.sliding_window {
            if !(0.0..1.0).contains(&window.overlap) {
                return Err(format!(
                    "{field}.sliding_window.overlap must be in [0, 1), not {}",
                    window.overlap
                ));
            }
            if !(window.sigma_scale > 0.0 && window.sigma_scale.is_finite()) {
                return Err(format!("{field}.sliding_window.sigma_scale must be positive"));
            }
            let mut axes = window.mirror_axes.clone();
            axes.sort_unstable();
            axes.dedup();
            if axes.len() != window.mirror_axes.len() || axes.iter().any(|axis| *axis > 2) {
                return Err(format!(
                    "{field}.sliding_window.mirror_axes must be distinct axes among 0, 1, 2, not {:?}",
                    window.mirror_axes
                ));
            }
        }
        Ok(())
    }
}

fn check_sha256(field: &str, sha256: &str) -> Result<(), String> {
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{field} must be 64 hex characters"));
    }
    Ok(())
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
    fn a_reference_needs_a_cascade_and_an_increasing_range() {
        let directory = tempfile::tempdir().unwrap();
        let load = |reference: &str| {
            let text =
                EXAMPLE.replace("fill_hu = -1000.0", &format!("fill_hu = -1000.0\n{reference}"));
            std::fs::write(directory.path().join("manifest.toml"), text).unwrap();
            ModelManifest::load(directory.path()).unwrap_err().to_string()
        };
        let error = load("reference = { range_hu = [-30.0, 120.0], median_hu = 40.0 }");
        assert!(error.contains("needs a [locate] stage to find the pancreas"), "{error}");
        let error = load("reference = { range_hu = [120.0, -30.0], median_hu = 40.0 }");
        assert!(error.contains("input.intensity.reference.range_hu must be increasing"), "{error}");
        let reference = ReferenceSpec { range_hu: [-30.0, 120.0], median_hu: 40.0 };
        assert_eq!(reference.shifts(), [-80.0, 70.0]);
    }

    /// A manifest with calibration and named operating points instead of one threshold.
    fn with_points(default: &str, calibration: &str) -> String {
        EXAMPLE.replace("threshold = 0.5", &format!("default_operating_point = \"{default}\""))
            + calibration
            + r#"
[[operating_points]]
name = "balanced"
threshold = 0.5
[[operating_points]]
name = "high-sensitivity"
threshold = 0.1
validation = { seed = 7, studies = 1000, target_sensitivity = 0.95, sensitivity = 0.951, specificity = 0.962 }
"#
    }

    #[test]
    fn operating_points_and_calibration_load_and_apply() {
        let (_directory, manifest) = write(&with_points(
            "high-sensitivity",
            "[calibration]\nkind = \"isotonic\"\nscores = [0.0, 0.5, 1.0]\nprobabilities = [0.0, 0.1, 0.9]\n",
        ));
        let point = manifest.default_point();
        assert_eq!((point.name.as_str(), point.threshold), ("high-sensitivity", 0.1));
        assert_eq!(point.validation.unwrap().seeds(), [7]);
        assert_eq!(manifest.calibrate(0.25), 0.05);
        assert!((manifest.calibrate(0.75) - 0.5).abs() < 1e-12);
        assert_eq!((manifest.calibrate(-1.0), manifest.calibrate(2.0)), (0.0, 0.9));
        assert_eq!(manifest.calibration.unwrap().prevalence(), None);
        // Platt with a = 1, b = 0 is the identity; the prevalence it was fitted at is kept.
        let (_directory, manifest) = write(&with_points(
            "balanced",
            "[calibration]\nkind = \"platt\"\na = 1.0\nb = 0.0\nprevalence = 0.2\n",
        ));
        assert!((manifest.calibrate(0.3) - 0.3).abs() < 1e-9);
        assert_eq!(manifest.calibration.unwrap().prevalence(), Some(0.2));
        // A one-threshold manifest is one point named "default", uncalibrated.
        let (_directory, manifest) = write(EXAMPLE);
        let point = manifest.default_point();
        assert_eq!(
            (point.name.as_str(), point.threshold, manifest.calibrate(0.3)),
            ("default", 0.5, 0.3)
        );
    }

    #[test]
    fn operating_points_that_contradict_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        let load = |text: String| {
            std::fs::write(directory.path().join("manifest.toml"), text).unwrap();
            ModelManifest::load(directory.path()).unwrap_err().to_string()
        };
        let error = load(with_points("nowhere", ""));
        assert!(error.contains("default_operating_point \"nowhere\" is not among"), "{error}");
        let both = with_points("balanced", "").replace(
            "default_operating_point = \"balanced\"",
            "default_operating_point = \"balanced\"\nthreshold = 0.5",
        );
        assert!(load(both).contains("not both"));
        // Validation on several cohorts pooled names their seeds; never seed and seeds.
        let pooled = with_points("balanced", "").replace("seed = 7,", "seeds = [7, 8],");
        std::fs::write(directory.path().join("manifest.toml"), pooled).unwrap();
        let manifest = ModelManifest::load(directory.path()).unwrap();
        let point = manifest.operating_points.iter().find(|p| p.name == "high-sensitivity");
        assert_eq!(point.unwrap().validation.as_ref().unwrap().seeds(), [7, 8]);
        for seeds in ["seed = 7, seeds = [8],", "seeds = [],", ""] {
            let error = load(with_points("balanced", "").replace("seed = 7,", seeds));
            assert!(
                error.contains("validation needs seed (one cohort) or seeds"),
                "{seeds}: {error}"
            );
        }
        let unsorted = with_points(
            "balanced",
            "[calibration]\nkind = \"isotonic\"\nscores = [0.5, 0.1]\nprobabilities = [0.1, 0.2]\n",
        );
        assert!(load(unsorted).contains("scores must increase"));
        for prevalence in ["0.0", "1.0", "20.0", "nan"] {
            let error = load(with_points(
                "balanced",
                &format!("[calibration]\nkind = \"platt\"\na = 1.0\nb = 0.0\nprevalence = {prevalence}\n"),
            ));
            assert!(error.contains("calibration prevalence is the share"), "{error}");
        }
    }

    #[test]
    fn a_segmentation_output_must_name_its_lesion_channel_and_replaces_the_mask() {
        let directory = tempfile::tempdir().unwrap();
        let load = |outputs: &str| {
            let text = EXAMPLE.replace("probability = \"p\"\nmask = \"m\"\n", outputs);
            std::fs::write(directory.path().join("manifest.toml"), text).unwrap();
            ModelManifest::load(directory.path())
        };
        let segmentation = "segmentation = { name = \"s\", kind = \"logits\", labels = { background = 0, lesion = 2 } }\n";
        let manifest = load(segmentation).unwrap();
        let spec = manifest.outputs.segmentation.unwrap();
        assert_eq!((spec.lesion_channel(), spec.classes()), (2, 3));
        let error =
            load(&segmentation.replace("lesion = 2", "tumour = 2")).unwrap_err().to_string();
        assert!(error.contains("must name the lesion channel"), "{error}");
        let error = load(&format!("mask = \"m\"\n{segmentation}")).unwrap_err().to_string();
        assert!(error.contains("not both"), "{error}");
        let error = load("").unwrap_err().to_string();
        assert!(error.contains("need a probability or a segmentation"), "{error}");
    }

    /// `EXAMPLE` as stage 2 of a cascade.
    fn cascade(extra_box: &str) -> String {
        EXAMPLE.replace(
            "crop = \"center\"",
            "crop = \"box\"\nsliding_window = { mirror_axes = [0, 2] }",
        ) + &format!(
            r#"
[locate]
onnx = "locate.onnx"
sha256 = "1111111111111111111111111111111111111111111111111111111111111111"
segmentation = {{ name = "seg", kind = "logits", labels = {{ background = 0, pancreas = 1 }} }}
[locate.input]
name = "ct"
shape = [-1, 1, 32, 24, 24]
spacing_mm = [6.0, 6.0, 6.0]
crop = "center"
intensity = {{ window_hu = [-200.0, 300.0], normalize = {{ kind = "none" }}, fill_hu = -1000.0 }}
[locate.box]
margin_mm = [10.0, 10.0, 10.0]
{extra_box}
"#
        )
    }

    #[test]
    fn a_cascade_loads_with_its_defaults() {
        let (_directory, manifest) = write(&cascade("lesion_within_mm = 8.0"));
        let locate = manifest.locate.as_ref().unwrap();
        assert_eq!(manifest.first_input().volume_shape(), [32, 24, 24]);
        assert_eq!(manifest.volume_shape(), [8, 16, 16], "stage 2's patch");
        assert_eq!((locate.box_rule.threshold, locate.box_rule.edge_mm), (0.5, 0.0));
        assert_eq!(locate.segmentation.channel("pancreas"), Some(1));
        let window = manifest.input.sliding_window.as_ref().unwrap();
        assert_eq!(
            (window.overlap, window.sigma_scale, &window.mirror_axes[..]),
            (0.5, 0.125, &[0, 2][..])
        );
        // The stored tensor is stage 1's, normalized as stage 1 asks (HU as is).
        assert_eq!(manifest.normalize(100.0), 100.0);
        // Written and read back, it is the same manifest.
        let (_again, reread) = write(&manifest.to_toml());
        assert_eq!(reread.locate, manifest.locate);
    }

    #[test]
    fn a_cascade_that_cannot_work_is_refused_with_the_field() {
        let directory = tempfile::tempdir().unwrap();
        let load = |text: String| {
            std::fs::write(directory.path().join("manifest.toml"), text).unwrap();
            ModelManifest::load(directory.path()).unwrap_err().to_string()
        };
        let cases = [
            (EXAMPLE.replace("crop = \"center\"", "crop = \"box\""), "needs a [locate] stage"),
            (
                cascade("").replace("crop = \"box\"", "crop = \"center\""),
                "input.crop must be \"box\"",
            ),
            (cascade("").replace("pancreas = 1", "gland = 1"), "must name the pancreas channel"),
            (cascade("edge_mm = -1.0"), "must be finite and not negative"),
            (
                cascade("").replace("mirror_axes = [0, 2]", "mirror_axes = [0, 3]"),
                "distinct axes among 0, 1, 2",
            ),
            (
                cascade("").replace("mirror_axes = [0, 2]", "overlap = 1.0"),
                "overlap must be in [0, 1)",
            ),
            (
                cascade("lesion_within_mm = 8.0").replace("mask = \"m\"\n", ""),
                "lesion_within_mm needs a lesion map",
            ),
        ];
        for (text, expected) in cases {
            let error = load(text);
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }

    #[test]
    fn missing_manifest_names_the_path() {
        let error =
            ModelManifest::load(Path::new("/nowhere/manifest.toml")).unwrap_err().to_string();
        assert_eq!(error, "model manifest /nowhere/manifest.toml does not exist");
    }
}
