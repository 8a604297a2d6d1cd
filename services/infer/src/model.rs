//! One ONNX model, loaded once per worker after checking it against its manifest.

use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use ort::session::Session;
use ort::value::TensorRef;
use panscreen_shared::manifest::{ModelManifest, SegmentationKind};

use crate::config::{Placement, TensorRtOptions};
use crate::runtime::{self, file_sha256, RuntimeError};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda { device_id: i32 },
    TensorRt { device_id: i32 },
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda`, `cuda:1`, `tensorrt`, `tensorrt:0`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, id) = match text.split_once(':') {
            Some((kind, id)) => (
                kind,
                id.parse::<i32>().map_err(|_| format!("device id in {text:?} is not a number"))?,
            ),
            None => (text, 0),
        };
        match kind.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda { device_id: id }),
            "tensorrt" | "trt" => Ok(Device::TensorRt { device_id: id }),
            _ => Err(format!("unknown device {text:?}: use cpu, cuda[:N] or tensorrt[:N]")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda { device_id } => write!(f, "cuda:{device_id}"),
            Device::TensorRt { device_id } => write!(f, "tensorrt:{device_id}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {0} does not exist")]
    Missing(PathBuf),
    #[error("model file {path} has sha256 {actual}, but its manifest says {expected}")]
    Checksum { path: PathBuf, actual: String, expected: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("device {device} is not available: {detail}")]
    Device { device: Device, detail: String },
    #[error("ONNX Runtime cannot load {path}: {detail}")]
    Session { path: PathBuf, detail: String },
    #[error("model {path} has no {kind} named {name:?} (it has: {available}); fix the manifest or the model")]
    Name { path: PathBuf, kind: &'static str, name: String, available: String },
    /// The dims the model declares for an input or output against the manifest's.
    #[error("model {path}: {detail}; fix the manifest or the model")]
    Dims { path: PathBuf, detail: String },
    #[error("inference failed: {0}")]
    Run(String),
}

/// Whether a model's declared dims fit what the manifest expects: the same rank, and
/// each dimension equal or dynamic (-1) on either side.
fn dims_fit(declared: &[i64], expected: &[i64]) -> bool {
    declared.len() == expected.len()
        && declared.iter().zip(expected).all(|(d, e)| *d < 0 || *e < 0 || d == e)
}

/// Model outputs for a batch.
#[derive(Debug)]
pub struct BatchOutput {
    /// One probability per study.
    pub probabilities: Vec<f32>,
    /// `[batch, 1, depth, height, width]` when the model returns a mask.
    pub mask: Option<ArrayD<f32>>,
}

pub struct Model {
    pub manifest: ModelManifest,
    pub device: Device,
    session: Session,
    /// Stage 1 of a cascade.
    locate: Option<Session>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.manifest.name)
            .field("device", &self.device)
            .finish()
    }
}

fn execution_provider(
    device: Device,
    #[allow(unused_variables)] tensorrt: &TensorRtOptions,
) -> Result<Option<ort::ep::ExecutionProviderDispatch>, ModelError> {
    match device {
        Device::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        Device::Cuda { device_id } => {
            use ort::ep::ExecutionProvider;
            let available =
                ort::ep::CUDA::is_available().map_err(|e| ModelError::Device { device, detail: e.to_string() })?;
            if !available {
                return Err(ModelError::Device {
                    device,
                    detail: "this ONNX Runtime library was built without the CUDA execution provider; \
                             install the CUDA build (PyPI onnxruntime-gpu), point PANSCREEN_ORT_DYLIB at its \
                             libonnxruntime.so and PANSCREEN_ORT_SHA256 at its checksum (docs/operations.md)"
                        .to_string(),
                });
            }
            Ok(Some(ort::ep::CUDA::default().with_device_id(device_id).build().error_on_failure()))
        }
        #[cfg(feature = "tensorrt")]
        Device::TensorRt { device_id } => {
            use ort::ep::ExecutionProvider;
            let available =
                ort::ep::TensorRT::is_available().map_err(|e| ModelError::Device { device, detail: e.to_string() })?;
            if !available {
                return Err(ModelError::Device {
                    device,
                    detail: "this ONNX Runtime library was built without the TensorRT execution provider".to_string(),
                });
            }
            let mut provider =
                ort::ep::TensorRT::default().with_device_id(device_id).with_fp16(tensorrt.fp16);
            if let Some(cache) = &tensorrt.engine_cache {
                provider = provider
                    .with_engine_cache(true)
                    .with_engine_cache_path(cache.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(cache.display());
            }
            Ok(Some(provider.build().error_on_failure()))
        }
        #[allow(unreachable_patterns)]
        other => Err(ModelError::Device {
            device: other,
            detail: "this panscreen was built without that execution provider (cargo features `cuda`, `tensorrt`)"
                .to_string(),
        }),
    }
}

/// The checksum, then the session.
fn open_session(
    path: PathBuf,
    sha256: &str,
    placement: &Placement,
) -> Result<(Session, PathBuf), ModelError> {
    let (device, threads) = (placement.device, placement.threads);
    if !path.is_file() {
        return Err(ModelError::Missing(path));
    }
    let actual = file_sha256(&path)?;
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(ModelError::Checksum { path, actual, expected: sha256.to_string() });
    }
    // The library must be loaded before anything asks it about providers.
    let (_, environment) = runtime::environment()?;
    let provider = execution_provider(device, &placement.tensorrt)?;
    let session_error =
        |e: ort::Error| ModelError::Session { path: path.clone(), detail: e.to_string() };
    let mut builder = Session::builder(environment).map_err(session_error)?;
    builder = builder.with_intra_threads(threads.max(1)).map_err(|e| session_error(e.into()))?;
    if let Some(provider) = provider {
        builder = builder
            .with_execution_providers([provider])
            .map_err(|e| ModelError::Device { device, detail: e.to_string() })?;
    }
    let session = builder.commit_from_file(&path).map_err(session_error)?;
    Ok((session, path))
}

/// An input or output the manifest promises: its kind, name, the manifest field that
/// promises it, and the shapes it may have.
type Outlet<'a> = (&'static str, &'a str, &'static str, Vec<Vec<i64>>);

/// The names and dims the model declares against those the manifest promises
/// preprocess will make (and infer will read back): a mismatch is found here, not on
/// the first study.
fn check_outlets(
    session: &Session,
    path: &std::path::Path,
    wanted: &[Outlet],
) -> Result<(), ModelError> {
    let inputs: Vec<String> = session.inputs().iter().map(|o| o.name().to_string()).collect();
    let outputs: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();
    for (kind, name, _, _) in wanted {
        let names = if *kind == "input" { &inputs } else { &outputs };
        if !names.iter().any(|n| n == name) {
            return Err(ModelError::Name {
                path: path.to_path_buf(),
                kind,
                name: name.to_string(),
                available: names.join(", "),
            });
        }
    }
    let outlets = session.inputs().iter().chain(session.outputs());
    let declared: Vec<(String, Vec<i64>)> = outlets
        .filter_map(|o| Some((o.name().to_string(), o.dtype().tensor_shape()?.to_vec())))
        .collect();
    for (kind, name, field, shapes) in wanted {
        let Some((_, dims)) = declared.iter().find(|(n, _)| n == name) else { continue };
        if !shapes.iter().any(|shape| dims_fit(dims, shape)) {
            let detail = format!(
                "{kind} {name:?} has dims {dims:?}, but the manifest's {field} says {:?} \
                 (-1: any)",
                shapes[0]
            );
            return Err(ModelError::Dims { path: path.to_path_buf(), detail });
        }
    }
    Ok(())
}

/// Stacks `[depth, height, width]` volumes into one `[N, 1, …]` input.
fn stack(volumes: &[Vec<f32>], shape: [usize; 3]) -> Result<ArrayD<f32>, ModelError> {
    let per_volume: usize = shape.iter().product();
    let mut stacked = Vec::with_capacity(per_volume * volumes.len());
    for volume in volumes {
        if volume.len() != per_volume {
            return Err(ModelError::Run(format!(
                "a tensor has {} values, the model takes {per_volume}",
                volume.len()
            )));
        }
        stacked.extend_from_slice(volume);
    }
    ArrayD::from_shape_vec(IxDyn(&[volumes.len(), 1, shape[0], shape[1], shape[2]]), stacked)
        .map_err(|e| ModelError::Run(e.to_string()))
}

impl Model {
    /// Checks the model file(s) against the manifest, then builds the session(s): stage
    /// 1's too, for a cascade.
    pub fn load(manifest: &ModelManifest, placement: &Placement) -> Result<Model, ModelError> {
        let device = placement.device;
        placement.check().map_err(|detail| ModelError::Device { device, detail })?;
        let (session, path) = open_session(manifest.onnx_path(), &manifest.sha256, placement)?;
        let [depth, height, width] = manifest.volume_shape().map(|n| n as i64);
        let volume = vec![-1, 1, depth, height, width];
        let mut wanted: Vec<Outlet> =
            vec![("input", &manifest.input.name, "input.shape", vec![volume.clone()])];
        if let Some(probability) = &manifest.outputs.probability {
            wanted.push((
                "output",
                probability,
                "outputs.probability ([batch, 1] or [batch])",
                vec![vec![-1, 1], vec![-1]],
            ));
        }
        if let Some(mask) = &manifest.outputs.mask {
            wanted.push(("output", mask, "input.shape (the mask has the input's)", vec![volume]));
        }
        if let Some(segmentation) = &manifest.outputs.segmentation {
            wanted.push((
                "output",
                &segmentation.name,
                "input.shape with one channel per class",
                vec![vec![-1, -1, depth, height, width]],
            ));
        }
        check_outlets(&session, &path, &wanted)?;
        let locate = match &manifest.locate {
            Some(locate) => {
                let (session, path) =
                    open_session(manifest.directory.join(&locate.onnx), &locate.sha256, placement)?;
                let [depth, height, width] = locate.input.volume_shape().map(|n| n as i64);
                let wanted: Vec<Outlet> = vec![
                    (
                        "input",
                        &locate.input.name,
                        "locate.input.shape",
                        vec![vec![-1, 1, depth, height, width]],
                    ),
                    (
                        "output",
                        &locate.segmentation.name,
                        "locate.input.shape with one channel per class",
                        vec![vec![-1, -1, depth, height, width]],
                    ),
                ];
                check_outlets(&session, &path, &wanted)?;
                Some(session)
            }
            None => None,
        };
        Ok(Model { manifest: manifest.clone(), device, session, locate })
    }

    /// Runs stage 1 of a cascade on `[depth, height, width]` tensors of its grid;
    /// returns each study's pancreas probability map.
    pub fn locate(&mut self, volumes: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let (Some(session), Some(spec)) = (self.locate.as_mut(), self.manifest.locate.as_ref())
        else {
            return Err(ModelError::Run("this model has no locate stage".into()));
        };
        let input = stack(volumes, spec.input.volume_shape())?;
        let tensor =
            TensorRef::from_array_view(&input).map_err(|e| ModelError::Run(e.to_string()))?;
        let outputs = session
            .run(ort::inputs![spec.input.name.as_str() => tensor])
            .map_err(|e| ModelError::Run(e.to_string()))?;
        let segmentation = outputs
            .get(spec.segmentation.name.as_str())
            .ok_or_else(|| ModelError::Run(format!("output {} missing", spec.segmentation.name)))?
            .try_extract_array::<f32>()
            .map_err(|e| ModelError::Run(e.to_string()))?
            .to_owned();
        let channel = spec.segmentation.channel("pancreas").unwrap_or(0);
        let map = class_map(&segmentation, &spec.segmentation, channel)?;
        Ok(map.outer_iter().map(|study| study.iter().copied().collect()).collect())
    }

    /// Runs a batch: `volumes` are `depth × height × width` tensors, already normalized.
    pub fn run(&mut self, volumes: &[Vec<f32>]) -> Result<BatchOutput, ModelError> {
        let input = stack(volumes, self.manifest.volume_shape())?;
        let tensor =
            TensorRef::from_array_view(&input).map_err(|e| ModelError::Run(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.manifest.input.name.as_str() => tensor])
            .map_err(|e| ModelError::Run(e.to_string()))?;
        let array = |name: &str| -> Result<ArrayD<f32>, ModelError> {
            Ok(outputs
                .get(name)
                .ok_or_else(|| ModelError::Run(format!("output {name} missing")))?
                .try_extract_array::<f32>()
                .map_err(|e| ModelError::Run(e.to_string()))?
                .to_owned())
        };
        // The lesion channel of a segmentation is the mask (softmax over the classes
        // first, for logits).
        let segmented = match &self.manifest.outputs.segmentation {
            Some(spec) => Some(class_map(&array(&spec.name)?, spec, spec.lesion_channel())?),
            None => None,
        };
        let probabilities: Vec<f32> = match (&self.manifest.outputs.probability, &segmented) {
            (Some(name), _) => array(name)?.iter().copied().collect(),
            // The study's score: its most lesion-like voxel.
            (None, Some(map)) => {
                map.outer_iter().map(|study| study.iter().copied().fold(0.0f32, f32::max)).collect()
            }
            (None, None) => {
                return Err(ModelError::Run("the manifest names no probability output".into()))
            }
        };
        if probabilities.len() != volumes.len() {
            return Err(ModelError::Run(format!(
                "{} probabilities for {} studies",
                probabilities.len(),
                volumes.len()
            )));
        }
        let mask = match (&self.manifest.outputs.mask, segmented) {
            (Some(name), _) => Some(array(name)?),
            (None, map) => map,
        };
        Ok(BatchOutput { probabilities, mask })
    }
}

/// The probability of one class (`channel`) at every voxel, `[batch, 1, depth, height,
/// width]`, from a segmentation output `[batch, classes, depth, height, width]`.
fn class_map(
    segmentation: &ArrayD<f32>,
    spec: &panscreen_shared::manifest::SegmentationSpec,
    channel: usize,
) -> Result<ArrayD<f32>, ModelError> {
    let shape = segmentation.shape();
    if shape.len() != 5 || shape[1] < spec.classes() {
        return Err(ModelError::Run(format!(
            "segmentation {} has shape {shape:?}, not [batch, {} or more classes, depth, height, width]",
            spec.name,
            spec.classes()
        )));
    }
    let lesion = channel;
    let (batch, classes) = (shape[0], shape[1]);
    let voxels: usize = shape[2..].iter().product();
    let standard = segmentation.as_standard_layout();
    let data = standard.as_slice().unwrap_or_default();
    let mut map = vec![0.0f32; batch * voxels];
    for study in 0..batch {
        for voxel in 0..voxels {
            let at = |class: usize| data[(study * classes + class) * voxels + voxel];
            map[study * voxels + voxel] = match spec.kind {
                SegmentationKind::Probabilities => at(lesion),
                // Softmax at the lesion channel, stable: exp(l - max) / Σ exp(c - max).
                SegmentationKind::Logits => {
                    let top = (0..classes).map(at).fold(f32::NEG_INFINITY, f32::max);
                    let total: f32 = (0..classes).map(|class| (at(class) - top).exp()).sum();
                    (at(lesion) - top).exp() / total
                }
            };
        }
    }
    let map = ArrayD::from_shape_vec(IxDyn(&[batch, 1, shape[2], shape[3], shape[4]]), map)
        .map_err(|e| ModelError::Run(e.to_string()))?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lesion_channel_of_logits_goes_through_softmax() {
        use panscreen_shared::manifest::SegmentationSpec;
        let labels = [("background", 0), ("pancreas", 1), ("lesion", 2)];
        let mut spec = SegmentationSpec {
            name: "seg".into(),
            kind: SegmentationKind::Logits,
            labels: labels.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        // One study, 3 classes, 1×1×2 voxels: logits (0, 0, ln 2) and (5, 0, 0).
        let logits = [0.0, 5.0, 0.0, 0.0, 2f32.ln(), 0.0];
        let segmentation =
            ArrayD::from_shape_vec(IxDyn(&[1, 3, 1, 1, 2]), logits.to_vec()).unwrap();
        let map = class_map(&segmentation, &spec, 2).unwrap();
        assert_eq!(map.shape(), &[1, 1, 1, 1, 2]);
        let expected = [0.5, 1.0 / (5f32.exp() + 2.0)];
        for (found, wanted) in map.iter().zip(expected) {
            assert!((found - wanted).abs() < 1e-6, "{found} vs {wanted}");
        }
        spec.kind = SegmentationKind::Probabilities;
        assert_eq!(
            class_map(&segmentation, &spec, 2).unwrap().iter().copied().collect::<Vec<_>>(),
            [2f32.ln(), 0.0]
        );
        let two_classes = ArrayD::from_shape_vec(IxDyn(&[1, 2, 1, 1, 1]), vec![0.0, 1.0]).unwrap();
        assert!(class_map(&two_classes, &spec, 2)
            .unwrap_err()
            .to_string()
            .contains("3 or more classes"));
    }

    #[test]
    fn dims_fit_when_equal_or_dynamic() {
        assert!(dims_fit(&[-1, 1, 48, 128, 128], &[-1, 1, 48, 128, 128]));
        assert!(dims_fit(&[4, 1, 48, 128, 128], &[-1, 1, 48, 128, 128]));
        assert!(dims_fit(&[-1, 1, -1, -1, -1], &[-1, 1, 48, 128, 128]));
        assert!(!dims_fit(&[-1, 1, 64, 128, 128], &[-1, 1, 48, 128, 128]));
        assert!(!dims_fit(&[-1, 48, 128, 128], &[-1, 1, 48, 128, 128]));
    }

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda { device_id: 1 });
        assert_eq!("tensorrt".parse::<Device>().unwrap(), Device::TensorRt { device_id: 0 });
        assert!("tpu".parse::<Device>().unwrap_err().contains("unknown device"));
        assert!("cuda:x".parse::<Device>().is_err());
    }
}
