//! infer: runs the ONNX screening model on stored tensors, in batches.
//!
//! - [`runtime`]: finding, verifying and loading the pinned ONNX Runtime library.
//! - [`model`]: one model, checked against its manifest (checksum, input and output
//!   names) and loaded once per worker; CPU, CUDA or TensorRT.
//! - [`lesion_metrics`]: lesion volume and centroid from the mask.
//! - [`error`]: why a study cannot be scored, one variant per quarantine reason.
//! - [`import`]: a manifest for a model trained with nnU-Net v2 (`panscreen model import-nnunet`).
//! - [`config`]: the stage's settings; [`service`]: the stage as it runs.
//!
//! [`InferHandler`] is the stage: a batch of `StudyPreprocessed` in, one `StudyScored`
//! per study out.

pub mod config;
pub mod error;
pub mod import;
pub mod model;
pub mod runtime;
pub mod service;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use panscreen_shared::contracts::{
    subjects, ModelIdentity, Prediction, Stage, StudyPreprocessed, StudyScored, TensorGeometry,
};
use panscreen_shared::error::StageError;
use panscreen_shared::npy;
use panscreen_shared::store::Store;
use panscreen_shared::worker::{Handler, Outcome};
use time::OffsetDateTime;
use tracing::info;

pub use error::InferError;
pub use model::{Device, Model, ModelError};

/// Lesion volume (mm³) and centroid (patient mm) of the voxels at or above
/// `threshold`; `None` when no voxel is.
pub fn lesion_metrics(
    mask: &[f32],
    geometry: &TensorGeometry,
    threshold: f32,
) -> Option<(f64, [f64; 3])> {
    let (depth, height, width) = (geometry.shape[2], geometry.shape[3], geometry.shape[4]);
    debug_assert_eq!(mask.len(), depth * height * width);
    let mut count = 0usize;
    let mut sum = [0.0f64; 3];
    for (index, value) in mask.iter().enumerate() {
        if *value >= threshold {
            count += 1;
            sum[0] += (index / (height * width)) as f64;
            sum[1] += (index / width % height) as f64;
            sum[2] += (index % width) as f64;
        }
    }
    if count == 0 {
        return None;
    }
    let centre_index = sum.map(|s| s / count as f64);
    Some((count as f64 * geometry.voxel_volume_mm3(), geometry.to_patient(centre_index)))
}

pub struct InferHandler {
    pub campaign: String,
    pub work: Store,
    pub model: Arc<Mutex<Model>>,
    pub batch_size: usize,
    /// Keep each study's tensor in the work store after it is scored (for debugging);
    /// by default it is deleted once its message is settled for good.
    pub keep_tensors: bool,
}

impl InferHandler {
    fn identity(model: &Model) -> ModelIdentity {
        ModelIdentity {
            name: model.manifest.name.clone(),
            version: model.manifest.version.clone(),
            sha256: model.manifest.sha256.clone(),
        }
    }

    async fn load_tensor(&self, message: &StudyPreprocessed) -> Result<Vec<f32>, InferError> {
        let bytes = self.work.get(&message.tensor_key).await?;
        let (shape, data) = npy::decode_f32(&bytes)
            .map_err(|error| InferError::TensorUnreadable(error.to_string()))?;
        if shape != message.geometry.shape {
            return Err(InferError::TensorShape {
                stored: shape,
                expected: message.geometry.shape.clone(),
            });
        }
        Ok(data)
    }

    async fn score(
        &self,
        messages: Vec<StudyPreprocessed>,
        volumes: Vec<Vec<f32>>,
    ) -> Result<Vec<Outcome>, InferError> {
        let started = Instant::now();
        let model = self.model.clone();
        let (output, identity, manifest) = tokio::task::spawn_blocking(move || {
            // A panic in an earlier study left the lock poisoned; the session itself is intact.
            let mut model = model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let output = model.run(&volumes);
            (output, Self::identity(&model), model.manifest.clone())
        })
        .await
        .map_err(|error| InferError::TaskFailed(error.to_string()))?;
        let output = output.map_err(|error| InferError::InferenceFailed(error.to_string()))?;
        let per_study_ms = started.elapsed().as_secs_f64() * 1000.0 / messages.len() as f64;
        let mut outcomes = Vec::with_capacity(messages.len());
        // The operating point is the manifest's, the same for every study of the batch.
        let point = manifest.default_point();
        for (index, message) in messages.into_iter().enumerate() {
            let raw_score = output.probabilities[index] as f64;
            let probability = manifest.calibrate(raw_score);
            let lesion = output.mask.as_ref().and_then(|mask| {
                let per_study = mask.len() / output.probabilities.len();
                let slice =
                    mask.as_slice().map(|all| &all[index * per_study..(index + 1) * per_study])?;
                lesion_metrics(slice, &message.geometry, manifest.outputs.mask_threshold as f32)
            });
            let mut context = message.context;
            context.timings.scored_at = Some(OffsetDateTime::now_utc());
            context.timings.infer_ms = Some(per_study_ms);
            let flagged = probability >= point.threshold;
            info!(study = %context.study_key, probability, flagged, "study scored");
            let scored = StudyScored {
                prediction: Prediction {
                    raw_score,
                    lesion_probability: probability,
                    flagged,
                    threshold: point.threshold,
                    operating_point: point.name.clone(),
                    lesion_volume_mm3: lesion.map(|(volume, _)| volume),
                    lesion_centroid_mm: lesion.map(|(_, centroid)| centroid),
                    model: identity.clone(),
                },
                context,
                series: message.series,
            };
            outcomes.push(Outcome::Publish {
                subject: subjects::scored(&self.campaign),
                message_id: scored.context.message_id(Stage::Infer),
                payload: Bytes::from(serde_json::to_vec(&scored).expect("contracts serialize")),
            });
        }
        Ok(outcomes)
    }
}

#[async_trait]
impl Handler for InferHandler {
    fn stage(&self) -> Stage {
        Stage::Infer
    }

    fn batch_size(&self) -> usize {
        self.batch_size.max(1)
    }

    /// The study is scored (or quarantined) for good: its tensor is not needed again.
    async fn finished(&self, payload: &Bytes) {
        if self.keep_tensors {
            return;
        }
        let Ok(message) = serde_json::from_slice::<StudyPreprocessed>(payload) else { return };
        if let Err(error) = self.work.delete_if_present(&message.tensor_key).await {
            tracing::warn!(kind = ?error.kind(), "deleting a scored study's tensor failed; it stays in the work store");
        }
    }

    async fn handle_batch(&self, payloads: Vec<Bytes>) -> Vec<Result<Outcome, StageError>> {
        // Read every message and tensor; only the good ones go through the model together.
        let mut results: Vec<Option<Result<Outcome, StageError>>> =
            Vec::with_capacity(payloads.len());
        let mut ready: Vec<(usize, StudyPreprocessed, Vec<f32>)> = Vec::new();
        for (index, payload) in payloads.iter().enumerate() {
            let parsed = serde_json::from_slice::<StudyPreprocessed>(payload)
                .map_err(|error| InferError::BadMessage(error.to_string()));
            let loaded = match parsed {
                Ok(message) => self.load_tensor(&message).await.map(|tensor| (message, tensor)),
                Err(error) => Err(error),
            };
            match loaded {
                Ok((message, tensor)) => {
                    results.push(None);
                    ready.push((index, message, tensor));
                }
                Err(error) => results.push(Some(Err(error.into()))),
            }
        }
        if !ready.is_empty() {
            let indices: Vec<usize> = ready.iter().map(|(index, _, _)| *index).collect();
            let (messages, volumes): (Vec<_>, Vec<_>) =
                ready.into_iter().map(|(_, m, v)| (m, v)).unzip();
            match self.score(messages, volumes).await {
                Ok(outcomes) => {
                    for (index, outcome) in indices.into_iter().zip(outcomes) {
                        results[index] = Some(Ok(outcome));
                    }
                }
                Err(error) => {
                    let error = StageError::from(error);
                    for index in indices {
                        results[index] = Some(Err(error.clone()));
                    }
                }
            }
        }
        results.into_iter().map(|result| result.expect("every payload has a result")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lesion_volume_and_centroid() {
        let geometry = TensorGeometry {
            shape: vec![1, 1, 2, 3, 4],
            spacing_mm: [2.0, 1.0, 1.0],
            origin_mm: [0.0, 0.0, 100.0],
            row_direction: [1.0, 0.0, 0.0],
            column_direction: [0.0, 1.0, 0.0],
            slice_direction: [0.0, 0.0, 1.0],
        };
        let mut mask = vec![0.0f32; 24];
        mask[12 + 4 + 1] = 0.9; // slice 1, row 1, column 1
        mask[12 + 4 + 3] = 0.6; // slice 1, row 1, column 3
        let (volume, centroid) = lesion_metrics(&mask, &geometry, 0.5).unwrap();
        assert_eq!(volume, 4.0);
        assert_eq!(centroid, [2.0, 1.0, 102.0]);
        assert!(lesion_metrics(&[0.1; 24], &geometry, 0.5).is_none());
    }
}
