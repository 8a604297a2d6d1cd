//! infer: runs the ONNX screening model on stored tensors, in batches.
//!
//! - [`runtime`]: finding, verifying and loading the pinned ONNX Runtime library.
//! - [`model`]: one model, checked against its manifest (checksum, input and output
//!   names) and loaded once per worker; CPU, CUDA or TensorRT.
//! - [`cascade`]: a two-stage model as infer runs it: the pancreas's box (or why the
//!   study is not assessable), the patches that cover it, batched across studies, their
//!   outputs blended (Gaussian weights, mirrored copies).
//! - [`lesion_metrics`]: lesion volume, centroid and diameter from the mask.
//! - [`error`]: why a study cannot be scored, one variant per quarantine reason.
//! - [`import`]: a manifest for a model trained with nnU-Net v2 (`panscreen model import-nnunet`).
//! - [`config`]: the stage's settings; [`service`]: the stage as it runs.
//!
//! [`InferHandler`] is the stage: a batch of `StudyPreprocessed` in, one `StudyScored`
//! per study out.

pub mod cascade;
pub mod config;
pub mod error;
pub mod import;
pub mod model;
pub mod runtime;
pub mod service;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use panscreen_shared::contracts::{
    subjects, ModelIdentity, Prediction, QuarantineRecord, Stage, StoredGrid, StudyPreprocessed,
    StudyScored, TensorGeometry,
};
use panscreen_shared::counters::StageCounters;
use panscreen_shared::error::StageError;
use panscreen_shared::manifest::ModelManifest;
use panscreen_shared::npy;
use panscreen_shared::store::{Store, StoreErrorKind};
use panscreen_shared::worker::{Handler, Outcome};
use time::OffsetDateTime;
use tracing::info;

pub use error::InferError;
pub use model::{Device, Model, ModelError};

/// What the lesion map says: the voxels at or above the mask threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LesionFound {
    pub volume_mm3: f64,
    /// Patient coordinates (mm) of the voxels' centroid.
    pub centroid_mm: [f64; 3],
    /// The longest extent of the voxels along the tensor's axes, mm.
    pub diameter_mm: f64,
}

/// The lesion in `mask` (voxels at or above `threshold`); `None` when no voxel is.
pub fn lesion_metrics(
    mask: &[f32],
    geometry: &TensorGeometry,
    threshold: f32,
) -> Option<LesionFound> {
    let (depth, height, width) = (geometry.shape[2], geometry.shape[3], geometry.shape[4]);
    debug_assert_eq!(mask.len(), depth * height * width);
    let mut count = 0usize;
    let mut sum = [0.0f64; 3];
    let (mut low, mut high) = ([usize::MAX; 3], [0usize; 3]);
    for (index, value) in mask.iter().enumerate() {
        if *value >= threshold {
            count += 1;
            let at = [index / (height * width), index / width % height, index % width];
            for axis in 0..3 {
                sum[axis] += at[axis] as f64;
                low[axis] = low[axis].min(at[axis]);
                high[axis] = high[axis].max(at[axis]);
            }
        }
    }
    if count == 0 {
        return None;
    }
    let centre_index = sum.map(|s| s / count as f64);
    let diameter_mm = (0..3)
        .map(|axis| (high[axis] - low[axis] + 1) as f64 * geometry.spacing_mm[axis])
        .fold(0.0, f64::max);
    Some(LesionFound {
        volume_mm3: count as f64 * geometry.voxel_volume_mm3(),
        centroid_mm: geometry.to_patient(centre_index),
        diameter_mm,
    })
}

pub struct InferHandler {
    pub campaign: String,
    pub work: Store,
    pub model: Arc<Mutex<Model>>,
    /// The loaded model's manifest, read without taking the model's lock (which a
    /// running batch holds for as long as inference takes).
    pub manifest: Arc<ModelManifest>,
    /// Studies per inference batch (studies from different messages run together); for
    /// a cascade, also the most stage-2 patches in one run of the model, from any study.
    pub batch_size: usize,
    /// Keep each study's tensor in the work store after it is scored (for debugging);
    /// by default it is deleted once its message is settled for good.
    pub keep_tensors: bool,
    /// The stage's counters (the worker's): infer adds the studies not assessable.
    pub counters: Arc<StageCounters>,
}

/// What the model(s) said of one study, before calibration and the operating point.
#[derive(Debug, Clone, Default, PartialEq)]
struct Judgement {
    raw_score: Option<f64>,
    lesion: Option<LesionFound>,
    lesion_location: Option<String>,
    pancreas_volume_mm3: Option<f64>,
    not_assessable: Option<String>,
}

impl Judgement {
    fn not_assessable(reason: String) -> Judgement {
        Judgement { not_assessable: Some(reason), ..Judgement::default() }
    }
}

/// The shift stage 2's intensity reference asks of one study's crop (none without a
/// reference), or why the study cannot be judged.
fn reference_shift(
    manifest: &ModelManifest,
    found: &cascade::Located,
    hu: &[i16],
    message: &StudyPreprocessed,
    fine: &StoredGrid,
) -> Result<f32, String> {
    let Some(reference) = manifest.input.intensity.reference else { return Ok(0.0) };
    let coarse = &message.geometry;
    let shape = [coarse.shape[2], coarse.shape[3], coarse.shape[4]];
    let crop = (found.crop_start, found.crop_size);
    let [low, high] = reference.range_hu;
    let median = cascade::pancreas_median(
        hu,
        &fine.geometry,
        crop,
        &found.pancreas,
        coarse,
        shape,
        reference.range_hu,
    )
    .ok_or_else(|| {
        format!(
            "no voxel of the pancreas stage 1 found lies within {low}…{high} HU, the range \
             its reference intensity is taken from"
        )
    })?;
    Ok((reference.median_hu - median) as f32)
}

fn run_blocking<T: Send + 'static>(
    model: &Arc<Mutex<Model>>,
    work: impl FnOnce(&mut Model) -> T + Send + 'static,
) -> impl std::future::Future<Output = Result<T, InferError>> {
    let model = model.clone();
    async move {
        tokio::task::spawn_blocking(move || {
            // A panic in an earlier study left the lock poisoned; the session is intact.
            let mut model = model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            work(&mut model)
        })
        .await
        .map_err(|error| InferError::TaskFailed(error.to_string()))
    }
}

impl InferHandler {
    fn identity(manifest: &ModelManifest) -> ModelIdentity {
        ModelIdentity {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            sha256: manifest.sha256.clone(),
        }
    }

    /// The message's tensor (a cascade's stage-1 grid). A cascade's fine grid is read
    /// only once stage 1 has found the study assessable ([`Self::load_fine`]).
    async fn load_tensor(
        &self,
        message: &StudyPreprocessed,
        cascade: bool,
    ) -> Result<Vec<f32>, InferError> {
        if cascade && message.fine_grid.is_none() {
            return Err(InferError::NoFineGrid(message.model_name.clone()));
        }
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

    /// What `error` makes of the study. A grid missing from the work store is most often
    /// one an earlier attempt deleted after publishing this study's score, before it
    /// could ack: [`Outcome::InputGone`] settles that under the score's message id, and
    /// quarantines the study only if no score was published.
    fn failed(
        &self,
        message: &StudyPreprocessed,
        error: InferError,
    ) -> Result<Outcome, StageError> {
        let InferError::Store(store) = &error else { return Err(error.into()) };
        if store.kind() != StoreErrorKind::NotFound {
            return Err(error.into());
        }
        let context = &message.context;
        let record = QuarantineRecord {
            campaign: self.campaign.clone(),
            stage: Stage::Infer,
            input: context.study_key.clone(),
            inputs: Vec::new(),
            study_key: Some(context.study_key.clone()),
            site_id: Some(context.site_id.clone()),
            reason: "its preprocessed grids are gone from the work store".into(),
            detail: format!(
                "{store}: deleted before the study was scored (by hand, or by an expiry rule on the work store); submit the study again"
            ),
            attempts: 0,
            at: OffsetDateTime::now_utc(),
            generation: context.generation,
        };
        Ok(Outcome::InputGone { output_id: context.message_id(Stage::Infer), record })
    }

    /// A cascade's fine grid: the whole scan on stage 2's grid, HU.
    async fn load_fine(&self, fine: &StoredGrid) -> Result<Vec<i16>, InferError> {
        let bytes = self.work.get(&fine.key).await?;
        let (shape, hu) = npy::decode_fine_grid(&bytes)
            .map_err(|error| InferError::TensorUnreadable(format!("{}: {error}", fine.key)))?;
        if shape != fine.geometry.shape {
            return Err(InferError::TensorShape {
                stored: shape,
                expected: fine.geometry.shape.clone(),
            });
        }
        Ok(hu)
    }

    /// One-stage: the whole tensor through the model.
    async fn judge_whole(
        &self,
        messages: &[StudyPreprocessed],
        volumes: Vec<Vec<f32>>,
    ) -> Result<Vec<Result<Judgement, InferError>>, InferError> {
        let manifest = &self.manifest;
        let output = run_blocking(&self.model, move |model| model.run(&volumes)).await?;
        let output = output.map_err(|error| InferError::InferenceFailed(error.to_string()))?;
        Ok(messages
            .iter()
            .enumerate()
            .map(|(index, message)| {
                let lesion = output.mask.as_ref().and_then(|mask| {
                    let per_study = mask.len() / output.probabilities.len();
                    let slice = mask
                        .as_slice()
                        .map(|all| &all[index * per_study..(index + 1) * per_study])?;
                    lesion_metrics(slice, &message.geometry, manifest.outputs.mask_threshold as f32)
                });
                Ok(Judgement {
                    raw_score: Some(output.probabilities[index] as f64),
                    lesion,
                    ..Judgement::default()
                })
            })
            .collect())
    }

    /// A cascade: stage 1 on every study's coarse grid, then stage 2 on patches of each
    /// pancreas's box cut from the fine grid, patches from all studies batched together.
    /// The fine grid of a study stage 1 finds not assessable is never read; one that
    /// cannot be read fails its own study only.
    async fn judge_cascade(
        &self,
        messages: &[StudyPreprocessed],
        volumes: Vec<Vec<f32>>,
    ) -> Result<Vec<Result<Judgement, InferError>>, InferError> {
        let manifest = &self.manifest;
        let maps = run_blocking(&self.model, move |model| model.locate(&volumes))
            .await?
            .map_err(|error| InferError::InferenceFailed(error.to_string()))?;
        let mut judgements: Vec<Result<Judgement, InferError>> =
            messages.iter().map(|_| Ok(Judgement::default())).collect();
        let mut located = Vec::new();
        let mut fines = Vec::new();
        let mut shifts = Vec::new();
        for (study, (message, map)) in messages.iter().zip(&maps).enumerate() {
            let Some(fine) = &message.fine_grid else {
                judgements[study] = Err(InferError::NoFineGrid(message.model_name.clone()));
                continue;
            };
            let found = cascade::locate(manifest, study, &message.geometry, &fine.geometry, map);
            if let Ok(found) = &found {
                found.log(&message.context.study_key, &fine.geometry);
            }
            match found {
                Err(reason) => judgements[study] = Ok(Judgement::not_assessable(reason)),
                Ok(found) => match self.load_fine(fine).await {
                    Ok(hu) => match reference_shift(manifest, &found, &hu, message, fine) {
                        Ok(shift) => {
                            fines.push(hu);
                            shifts.push(shift);
                            located.push((found, &fine.geometry));
                        }
                        Err(reason) => judgements[study] = Ok(Judgement::not_assessable(reason)),
                    },
                    Err(error) => judgements[study] = Err(error),
                },
            }
        }
        let geometries: Vec<TensorGeometry> = located
            .iter()
            .map(|(found, fine)| cascade::sub_geometry(fine, found.crop_start, found.crop_size))
            .collect();
        let fine_shapes: Vec<[usize; 3]> =
            located.iter().map(|(_, fine)| [fine.shape[2], fine.shape[3], fine.shape[4]]).collect();
        let batch = self.batch_size.max(1);
        let crops: Vec<([i64; 3], [usize; 3])> =
            located.iter().map(|(found, _)| (found.crop_start, found.crop_size)).collect();
        let blended = run_blocking(&self.model, move |model| {
            cascade::detect_crops(model, &crops, &fines, &fine_shapes, &shifts, batch)
        })
        .await?;
        let blended = blended.map_err(|error| InferError::InferenceFailed(error.to_string()))?;
        for (((found, _), geometry), (mut score, mut map)) in
            located.iter().zip(&geometries).zip(blended)
        {
            if let Some(near) = &found.near_pancreas {
                let coarse = &messages[found.study].geometry;
                let shape = [coarse.shape[2], coarse.shape[3], coarse.shape[4]];
                score = cascade::keep_near(&mut map, geometry, near, coarse, shape);
            }
            let lesion = lesion_metrics(&map, geometry, manifest.outputs.mask_threshold as f32);
            let lesion_location = lesion.map(|lesion| {
                let [right, left] = found.pancreas_x_mm();
                let along = (lesion.centroid_mm[0] - right) / (left - right).max(1e-6);
                if along < 1.0 / 3.0 {
                    "head"
                } else if along < 2.0 / 3.0 {
                    "body"
                } else {
                    "tail"
                }
                .to_string()
            });
            judgements[found.study] = Ok(Judgement {
                raw_score: Some(score as f64),
                lesion,
                lesion_location,
                pancreas_volume_mm3: Some(found.pancreas_volume_mm3),
                not_assessable: None,
            });
        }
        Ok(judgements)
    }

    /// Every study of the batch scored: an outcome each, or why that study could not be.
    async fn score(
        &self,
        messages: Vec<StudyPreprocessed>,
        volumes: Vec<Vec<f32>>,
    ) -> Result<Vec<Result<Outcome, StageError>>, InferError> {
        let started = Instant::now();
        let manifest = self.manifest.clone();
        let judgements = if manifest.locate.is_some() {
            self.judge_cascade(&messages, volumes).await?
        } else {
            self.judge_whole(&messages, volumes).await?
        };
        let identity = Self::identity(&manifest);
        let per_study_ms = started.elapsed().as_secs_f64() * 1000.0 / messages.len() as f64;
        let mut outcomes = Vec::with_capacity(messages.len());
        // The operating point is the manifest's, the same for every study of the batch.
        let point = manifest.default_point();
        for (message, judgement) in messages.into_iter().zip(judgements) {
            let judgement = match judgement {
                Ok(judgement) => judgement,
                Err(error) => {
                    outcomes.push(self.failed(&message, error));
                    continue;
                }
            };
            let probability = judgement.raw_score.map(|raw| manifest.calibrate(raw));
            let mut context = message.context;
            context.timings.scored_at = Some(OffsetDateTime::now_utc());
            context.timings.infer_ms = Some(per_study_ms);
            let flagged = probability.is_some_and(|p| p >= point.threshold);
            match &judgement.not_assessable {
                Some(reason) => {
                    self.counters.not_assessable.fetch_add(1, Ordering::Relaxed);
                    info!(study = %context.study_key, reason, "study not assessable")
                }
                None => info!(study = %context.study_key, probability, flagged, "study scored"),
            }
            let scored = StudyScored {
                prediction: Prediction {
                    assessable: judgement.not_assessable.is_none(),
                    not_assessable_reason: judgement.not_assessable,
                    raw_score: judgement.raw_score,
                    lesion_probability: probability,
                    flagged,
                    threshold: point.threshold,
                    operating_point: point.name.clone(),
                    lesion_volume_mm3: judgement.lesion.map(|lesion| lesion.volume_mm3),
                    lesion_centroid_mm: judgement.lesion.map(|lesion| lesion.centroid_mm),
                    lesion_diameter_mm: judgement.lesion.map(|lesion| lesion.diameter_mm),
                    lesion_location: judgement.lesion_location,
                    pancreas_volume_mm3: judgement.pancreas_volume_mm3,
                    model: identity.clone(),
                },
                context,
                series: message.series,
            };
            outcomes.push(Ok(Outcome::Publish {
                subject: subjects::scored(&self.campaign),
                message_id: scored.context.message_id(Stage::Infer),
                payload: Bytes::from(serde_json::to_vec(&scored).expect("contracts serialize")),
            }));
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

    /// The study's score (or quarantine) is in the queue: its grids are not needed
    /// again. Runs before the ack; a redelivery after a kill in between finds them gone
    /// and settles through [`InferHandler::failed`].
    async fn finished(&self, payload: &Bytes) {
        if self.keep_tensors {
            return;
        }
        let Ok(message) = serde_json::from_slice::<StudyPreprocessed>(payload) else { return };
        let fine = message.fine_grid.as_ref().map(|fine| &fine.key);
        let mut keys: Vec<String> =
            std::iter::once(&message.tensor_key).chain(fine).cloned().collect();
        // What attempts that died before publishing wrote beside them (same folder).
        if let Some((folder, _)) = message.tensor_key.rsplit_once('/') {
            match self.work.list(folder).await {
                Ok(objects) => keys.extend(objects.into_iter().map(|object| object.key)),
                Err(error) => {
                    tracing::warn!(kind = ?error.kind(), "listing a scored study's work folder failed")
                }
            }
        }
        keys.sort();
        keys.dedup();
        for key in &keys {
            if let Err(error) = self.work.delete_if_present(key).await {
                tracing::warn!(kind = ?error.kind(), "deleting a scored study's tensor failed; it stays in the work store");
            }
        }
    }

    async fn handle_batch(&self, payloads: Vec<Bytes>) -> Vec<Result<Outcome, StageError>> {
        // Read every message and tensor; only the good ones go through the model together.
        let mut results: Vec<Option<Result<Outcome, StageError>>> =
            Vec::with_capacity(payloads.len());
        let mut ready: Vec<(usize, StudyPreprocessed, Vec<f32>)> = Vec::new();
        let cascade = self.manifest.locate.is_some();
        for (index, payload) in payloads.iter().enumerate() {
            let parsed = serde_json::from_slice::<StudyPreprocessed>(payload)
                .map_err(|error| InferError::BadMessage(error.to_string()));
            match parsed {
                Ok(message) => match self.load_tensor(&message, cascade).await {
                    Ok(tensor) => {
                        results.push(None);
                        ready.push((index, message, tensor));
                    }
                    Err(error) => results.push(Some(self.failed(&message, error))),
                },
                Err(error) => results.push(Some(Err(error.into()))),
            }
        }
        if !ready.is_empty() {
            let indices: Vec<usize> = ready.iter().map(|(index, ..)| *index).collect();
            let (messages, volumes): (Vec<_>, Vec<_>) =
                ready.into_iter().map(|(_, message, volume)| (message, volume)).unzip();
            match self.score(messages, volumes).await {
                Ok(outcomes) => {
                    for (index, outcome) in indices.into_iter().zip(outcomes) {
                        results[index] = Some(outcome);
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
    use panscreen_shared::contracts::example_scored;
    use panscreen_shared::store::OpenMode;

    /// A cascade reads a study's fine grid only when stage 1 has found the pancreas in
    /// it, and a study it cannot score fails alone. Here, in one batch: an empty scan
    /// whose fine grid is missing from the store (not assessable, the grid never read),
    /// a message without a fine grid, one whose tensor is not an `.npy`, and one whose
    /// tensor is gone.
    #[tokio::test]
    async fn a_cascade_reads_the_fine_grid_only_of_a_study_it_can_assess() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let manifest = ModelManifest::load(&models.join("tiny-panda-cascade/manifest.toml"))
            .expect("the shipped cascade loads");
        let model = Model::load(&manifest, &config::Placement::cpu(1)).expect("model");
        let directory = tempfile::tempdir().unwrap();
        let work = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        let locate = manifest.locate.as_ref().expect("a cascade");
        let [_, _, depth, height, width] = locate.input.shape.map(|dim| dim.max(1) as usize);
        let geometry = |shape: Vec<usize>, spacing_mm| TensorGeometry {
            shape,
            spacing_mm,
            origin_mm: [-200.0, -200.0, -200.0],
            row_direction: [1.0, 0.0, 0.0],
            column_direction: [0.0, 1.0, 0.0],
            slice_direction: [0.0, 0.0, 1.0],
        };
        let coarse = geometry(vec![1, 1, depth, height, width], locate.input.spacing_mm);
        // Air everywhere, as stage 1's input: the window's low end, normalised.
        let air = vec![manifest_air(locate); depth * height * width];
        work.put("empty.npy", npy::encode_f32(&coarse.shape, &air)).await.unwrap();
        work.put("garbage.npy", Bytes::from_static(b"not an npy")).await.unwrap();
        let message = |tensor_key: &str, fine: Option<&str>| {
            let scored = example_scored("c", &format!("study-{tensor_key}"), false);
            let fine_grid = fine.map(|key| StoredGrid {
                key: key.to_string(),
                geometry: geometry(vec![1, 1, 60, 200, 200], manifest.input.spacing_mm),
            });
            let message = StudyPreprocessed {
                context: scored.context,
                series: scored.series,
                tensor_key: tensor_key.to_string(),
                geometry: coarse.clone(),
                model_name: manifest.name.clone(),
                fine_grid,
            };
            Bytes::from(serde_json::to_vec(&message).unwrap())
        };
        let handler = InferHandler {
            campaign: "c".into(),
            work,
            model: Arc::new(Mutex::new(model)),
            manifest: Arc::new(manifest.clone()),
            batch_size: 4,
            keep_tensors: false,
            counters: Arc::new(StageCounters::default()),
        };
        let results = handler
            .handle_batch(vec![
                message("empty.npy", Some("never-written.fine.npy.zst")),
                message("empty.npy", None),
                message("garbage.npy", Some("never-written.fine.npy.zst")),
                message("deleted.npy", Some("deleted.fine.npy.zst")),
            ])
            .await;
        let Ok(Outcome::Publish { payload, .. }) = &results[0] else {
            panic!("the empty scan is judged, not failed: {:?}", results[0]);
        };
        let scored: StudyScored = serde_json::from_slice(payload).unwrap();
        assert!(!scored.prediction.assessable);
        let reason = scored.prediction.not_assessable_reason.unwrap();
        assert!(reason.starts_with("no pancreas found"), "{reason}");
        assert!(scored.prediction.raw_score.is_none() && !scored.prediction.flagged);
        let reason = |result: &Result<Outcome, StageError>| match result {
            Err(error) => error.reason.clone(),
            Ok(_) => panic!("scored: {result:?}"),
        };
        assert_eq!(reason(&results[1]), "preprocessed without a fine grid");
        assert_eq!(reason(&results[2]), "stored tensor is unreadable");
        // A grid no longer in the store: settled if a score went out under its id.
        let Ok(Outcome::InputGone { output_id, record }) = &results[3] else {
            panic!("a missing grid is handed to the queue's deduplication: {:?}", results[3]);
        };
        assert_eq!(output_id, "study-deleted.npy:infer");
        assert_eq!(record.study_key.as_deref(), Some("study-deleted.npy"));
        assert_eq!(record.reason, "its preprocessed grids are gone from the work store");
        assert_eq!(handler.counters.not_assessable.load(Ordering::Relaxed), 1);
    }

    /// The value air (the window's low end) takes in stage 1's input.
    fn manifest_air(locate: &panscreen_shared::manifest::LocateSpec) -> f32 {
        use panscreen_shared::manifest::Normalization;
        let [low, _] = locate.input.intensity.window_hu;
        (match locate.input.intensity.normalize {
            Normalization::None => low,
            Normalization::Window => 0.0,
            Normalization::Zscore { mean, std } => (low - mean) / std,
        }) as f32
    }

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
        let lesion = lesion_metrics(&mask, &geometry, 0.5).unwrap();
        assert_eq!(lesion.volume_mm3, 4.0);
        assert_eq!(lesion.centroid_mm, [2.0, 1.0, 102.0]);
        // Columns 1 to 3 at 1 mm: 3 mm across.
        assert_eq!(lesion.diameter_mm, 3.0);
        assert!(lesion_metrics(&[0.1; 24], &geometry, 0.5).is_none());
    }
}
