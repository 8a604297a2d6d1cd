//! `panscreen model import-nnunet`: a manifest for a model trained with nnU-Net v2.
//!
//! nnU-Net (the field's standard for pancreas segmentation) describes a trained model in
//! two files: `plans.json` (per configuration: patch size, voxel spacing, normalisation)
//! and `dataset.json` (labels, channels). An ONNX export of its network takes one patch
//! `[batch, 1, z, y, x]` and returns per-class logits `[batch, classes, z, y, x]`. The
//! manifest written here says the same in panscreen's terms: the patch as the input
//! shape, the spacing, nnU-Net's CT normalisation (clip to the foreground's 0.5 and
//! 99.5 percentiles, then subtract its mean and divide by its standard deviation), and
//! the logits as a segmentation output with the dataset's labels. The names and dims of
//! the ONNX file are read from the file itself and checked as every load checks them.
//!
//! With `--locate DIR` (a cascade's model directory), the imported network becomes
//! stage 2 behind that cascade's stage 1: it sees the box around the pancreas, covered
//! by patches as nnU-Net's own sliding-window inference covers an image. Without it the
//! network is given the centre of the scan (`crop = "center"`), and a patch smaller
//! than the abdomen then sees only part of it; the manifest says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use panscreen_shared::manifest::{
    CropPolicy, InputSpec, IntensitySpec, ModelManifest, Normalization, OutputSpec,
    SegmentationKind, SegmentationSpec, SlidingWindow,
};
use serde_json::Value;

use crate::config::Placement;
use crate::runtime::file_sha256;

/// What `import-nnunet` is given.
#[derive(Debug, Clone)]
pub struct NnUnetExport {
    pub plans: PathBuf,
    pub dataset_json: PathBuf,
    pub onnx: PathBuf,
    /// The plans' configuration the network was trained in (`3d_fullres`, …).
    pub configuration: String,
    /// The dataset's label that is the lesion (nnU-Net datasets name it as they like).
    pub lesion_label: String,
    pub out: PathBuf,
    /// A cascade's model directory whose stage 1 finds the pancreas for this model: the
    /// manifest written is then a cascade (the box around the pancreas, covered by
    /// patches as nnU-Net predicts: overlap 0.5, Gaussian σ 1/8, mirrored on all axes).
    /// Without it the model is given the centre of the scan.
    pub locate: Option<PathBuf>,
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// `plans["configurations"][name]`, with what it inherits from its parent filled in.
fn configuration(plans: &Value, name: &str, path: &Path) -> anyhow::Result<Value> {
    let configurations = &plans["configurations"];
    let Some(own) = configurations.get(name) else {
        let known: Vec<&String> =
            configurations.as_object().map(|c| c.keys().collect()).unwrap_or_default();
        bail!("{} has no configuration {name:?} (it has: {known:?})", path.display());
    };
    let mut merged = match own.get("inherits_from").and_then(Value::as_str) {
        Some(parent) => configuration(plans, parent, path)?,
        None => Value::Object(Default::default()),
    };
    if let (Some(target), Some(fields)) = (merged.as_object_mut(), own.as_object()) {
        for (key, value) in fields {
            target.insert(key.clone(), value.clone());
        }
    }
    Ok(merged)
}

fn triple(value: &Value, what: &str, path: &Path) -> anyhow::Result<[f64; 3]> {
    let numbers: Vec<f64> =
        value.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
    match numbers.as_slice() {
        [z, y, x] => Ok([*z, *y, *x]),
        _ => bail!("{}: {what} is not three numbers (a 3D configuration): {value}", path.display()),
    }
}

/// Writes `out/manifest.toml` and a copy of the ONNX file; returns the manifest's path.
pub fn import_nnunet(export: &NnUnetExport) -> anyhow::Result<PathBuf> {
    let plans = read_json(&export.plans)?;
    let dataset = read_json(&export.dataset_json)?;
    let plans_path = export.plans.as_path();
    let config = configuration(&plans, &export.configuration, plans_path)?;
    let patch = triple(&config["patch_size"], "patch_size", plans_path)?;
    let spacing = triple(&config["spacing"], "spacing", plans_path)?;
    let schemes = config["normalization_schemes"].as_array().cloned().unwrap_or_default();
    if schemes.len() != 1 || schemes[0] != "CTNormalization" {
        bail!(
            "{}: one CT channel with CTNormalization is what panscreen screens; this configuration normalises {schemes:?}",
            plans_path.display()
        );
    }
    let intensity = &plans["foreground_intensity_properties_per_channel"]["0"];
    let number = |key: &str| {
        intensity[key].as_f64().with_context(|| {
            format!(
                "{}: foreground_intensity_properties_per_channel.0.{key} is missing",
                plans_path.display()
            )
        })
    };
    let (mean, std) = (number("mean")?, number("std")?);
    let window = [number("percentile_00_5")?, number("percentile_99_5")?];
    if std.is_nan() || std <= 0.0 || window[0] >= window[1] {
        bail!(
            "{}: the foreground intensities (std {std}, window {window:?}) cannot normalise",
            plans_path.display()
        );
    }

    let dataset_path = export.dataset_json.as_path();
    let channels = dataset["channel_names"].as_object().cloned().unwrap_or_default();
    if channels.len() != 1
        || !channels.values().all(|c| c.as_str().is_some_and(|c| c.eq_ignore_ascii_case("CT")))
    {
        bail!(
            "{}: one CT channel expected, channel_names are {channels:?}",
            dataset_path.display()
        );
    }
    let mut labels = BTreeMap::new();
    for (name, value) in dataset["labels"].as_object().cloned().unwrap_or_default() {
        let Some(channel) = value.as_u64() else {
            bail!(
                "{}: label {name:?} is {value}, a region of several labels; only plain labels map to channels",
                dataset_path.display()
            );
        };
        let name = if name == export.lesion_label { "lesion".to_string() } else { name };
        labels.insert(name, channel as usize);
    }
    if !labels.contains_key("lesion") {
        bail!(
            "{}: no label {:?} (pass --lesion-label with one of: {})",
            dataset_path.display(),
            export.lesion_label,
            labels.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }

    std::fs::create_dir_all(&export.out)
        .with_context(|| format!("cannot create {}", export.out.display()))?;
    let file_name = export
        .onnx
        .file_name()
        .with_context(|| format!("{} names no file", export.onnx.display()))?;
    let copied = export.out.join(file_name);
    if copied != export.onnx {
        std::fs::copy(&export.onnx, &copied).with_context(|| {
            format!("cannot copy {} to {}", export.onnx.display(), copied.display())
        })?;
    }
    let (input_name, output_name) =
        onnx_names(&copied, labels.values().max().map_or(0, |c| c + 1))?;
    let name = dataset["name"].as_str().map(str::to_string).unwrap_or_else(|| "nnunet".into());
    let locate = match &export.locate {
        Some(directory) => {
            let cascade = ModelManifest::load(directory)?;
            let Some(mut locate) = cascade.locate else {
                bail!("{} has no [locate] stage to take", directory.display());
            };
            let from = cascade.directory.join(&locate.onnx);
            let to = export.out.join(format!("locate-{}", locate.onnx));
            std::fs::copy(&from, &to)
                .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
            locate.onnx = to.file_name().expect("a file name").to_string_lossy().into_owned();
            Some(locate)
        }
        None => None,
    };
    let cascade = locate.is_some();
    let mut manifest = ModelManifest {
        name: name.clone(),
        version: format!("nnunet-{}", export.configuration),
        onnx: file_name.to_string_lossy().into_owned(),
        sha256: file_sha256(&copied)?,
        intended_use: if cascade {
            format!(
                "Imported from nnU-Net v2 ({}, configuration {}) as stage 2 of a cascade. \
                 Validate before use.",
                name, export.configuration
            )
        } else {
            format!(
                "Imported from nnU-Net v2 ({}, configuration {}) without a locate stage: it \
                 is given the centre of the scan. Validate before use.",
                name, export.configuration
            )
        },
        clinical_use: false,
        threshold: Some(0.5),
        calibration: None,
        operating_points: Vec::new(),
        default_operating_point: None,
        input: InputSpec {
            name: input_name,
            shape: [-1, 1, patch[0] as i64, patch[1] as i64, patch[2] as i64],
            spacing_mm: spacing,
            crop: if cascade { CropPolicy::Box } else { CropPolicy::Center },
            sliding_window: cascade.then(|| SlidingWindow {
                overlap: 0.5,
                sigma_scale: 0.125,
                mirror_axes: vec![0, 1, 2],
            }),
            intensity: IntensitySpec {
                window_hu: window,
                normalize: Normalization::Zscore { mean, std },
                fill_hu: -1000.0,
                reference: None,
            },
        },
        outputs: OutputSpec {
            probability: None,
            mask: None,
            segmentation: Some(SegmentationSpec {
                name: output_name,
                kind: SegmentationKind::Logits,
                labels,
            }),
            mask_threshold: 0.5,
        },
        locate,
        directory: export.out.clone(),
    };
    let text = manifest.to_toml();
    let path = export.out.join("manifest.toml");
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    // Read back and loaded as a run would: the manifest's checks, then the model's.
    manifest = ModelManifest::load(&path)?;
    crate::Model::load(&manifest, &Placement::cpu(1))?;
    Ok(path)
}

/// The ONNX file's one input, and its output with one channel per class.
fn onnx_names(onnx: &Path, classes: usize) -> anyhow::Result<(String, String)> {
    let (_, environment) = crate::runtime::environment()?;
    let session = ort::session::Session::builder(environment)
        .and_then(|mut builder| builder.commit_from_file(onnx))
        .with_context(|| format!("ONNX Runtime cannot load {}", onnx.display()))?;
    let inputs: Vec<String> = session.inputs().iter().map(|i| i.name().to_string()).collect();
    let [input] = inputs.as_slice() else {
        bail!(
            "{} takes {} inputs ({inputs:?}); an nnU-Net export takes one",
            onnx.display(),
            inputs.len()
        );
    };
    let outputs: Vec<(String, Vec<i64>)> = session
        .outputs()
        .iter()
        .filter_map(|o| Some((o.name().to_string(), o.dtype().tensor_shape()?.to_vec())))
        .collect();
    let segmentation = outputs
        .iter()
        .find(|(_, dims)| dims.len() == 5 && (dims[1] < 0 || dims[1] as usize >= classes));
    let Some((output, _)) = segmentation else {
        bail!(
            "{} has no output [batch, {classes} classes, z, y, x] (it has: {outputs:?})",
            onnx.display()
        );
    };
    Ok((input.clone(), output.clone()))
}
