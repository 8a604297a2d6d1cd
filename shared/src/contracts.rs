//! Cross-service messages and the subjects they travel on.
//!
//! Every fact that crosses a service boundary is a type here. Messages carry object
//! keys and small metadata, never pixel data, and never patient identifiers: only the
//! keyed pseudonyms made by ingest ([`crate::pseudonym`]).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Ingest,
    Preprocess,
    Infer,
    Aggregate,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Ingest, Stage::Preprocess, Stage::Infer, Stage::Aggregate];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest",
            Stage::Preprocess => "preprocess",
            Stage::Infer => "infer",
            Stage::Aggregate => "aggregate",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Subject names, in one place. A campaign id scopes every subject.
pub mod subjects {
    /// Studies ingest accepted, for preprocess.
    pub fn ingested(campaign: &str) -> String {
        format!("panscreen.{campaign}.ingested")
    }
    /// Model-ready tensors, for infer.
    pub fn preprocessed(campaign: &str) -> String {
        format!("panscreen.{campaign}.preprocessed")
    }
    /// Scored studies, for aggregate.
    pub fn scored(campaign: &str) -> String {
        format!("panscreen.{campaign}.scored")
    }
    /// Inputs that did not make it, from any stage, for aggregate.
    pub fn quarantine(campaign: &str) -> String {
        format!("panscreen.{campaign}.quarantine")
    }
    /// Inputs left out on purpose, in chunks, for aggregate.
    pub fn ignored(campaign: &str) -> String {
        format!("panscreen.{campaign}.ignored")
    }
    /// Prefixes registered by `panscreen submit`, for the ingest service.
    pub fn submitted(campaign: &str) -> String {
        format!("panscreen.{campaign}.submitted")
    }
    /// The durable consumer a stage's workers share on each subject they read.
    pub fn consumer(stage: super::Stage) -> String {
        format!("panscreen-{stage}")
    }
}

/// The campaign's wiring in one place: which stage consumes which subject (and under
/// which durable consumer), and what it publishes. `setup` creates a consumer for each
/// pair of [`topology::consumers`], `status` reads their backlog, each stage's service
/// subscribes to its own, and the KEDA manifest test checks its triggers against it.
pub mod topology {
    use super::{subjects, Stage};

    /// The subjects of a campaign, by role.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Subject {
        Submitted,
        Ingested,
        Preprocessed,
        Scored,
        Quarantine,
        Ignored,
    }

    impl Subject {
        /// The NATS subject of this role in `campaign`.
        pub fn name(self, campaign: &str) -> String {
            match self {
                Subject::Submitted => subjects::submitted(campaign),
                Subject::Ingested => subjects::ingested(campaign),
                Subject::Preprocessed => subjects::preprocessed(campaign),
                Subject::Scored => subjects::scored(campaign),
                Subject::Quarantine => subjects::quarantine(campaign),
                Subject::Ignored => subjects::ignored(campaign),
            }
        }
    }

    /// One stage's place in the campaign.
    #[derive(Debug, Clone, Copy)]
    pub struct Wiring {
        pub stage: Stage,
        /// What its instances read, in order (a worker stage reads exactly one).
        pub consumes: &'static [Subject],
        pub publishes: &'static [Subject],
    }

    /// Every stage, in pipeline order.
    pub const STAGES: [Wiring; 4] = [
        Wiring {
            stage: Stage::Ingest,
            consumes: &[Subject::Submitted],
            publishes: &[Subject::Ingested, Subject::Quarantine, Subject::Ignored],
        },
        Wiring {
            stage: Stage::Preprocess,
            consumes: &[Subject::Ingested],
            publishes: &[Subject::Preprocessed, Subject::Quarantine],
        },
        Wiring {
            stage: Stage::Infer,
            consumes: &[Subject::Preprocessed],
            publishes: &[Subject::Scored, Subject::Quarantine],
        },
        Wiring {
            stage: Stage::Aggregate,
            consumes: &[Subject::Scored, Subject::Quarantine, Subject::Ignored],
            publishes: &[],
        },
    ];

    /// The wiring of `stage`.
    pub fn of(stage: Stage) -> Wiring {
        *STAGES.iter().find(|wiring| wiring.stage == stage).expect("every stage is wired")
    }

    /// The subject a worker stage (preprocess, infer) reads in `campaign`.
    pub fn input(stage: Stage, campaign: &str) -> String {
        of(stage).consumes[0].name(campaign)
    }

    /// The durable consumer the instances of `stage` share on every subject they read.
    pub fn consumer(stage: Stage) -> String {
        subjects::consumer(stage)
    }

    /// Every subject of `campaign` with the stage that consumes it.
    pub fn consumers(campaign: &str) -> Vec<(String, Stage)> {
        STAGES
            .iter()
            .flat_map(|wiring| {
                wiring.consumes.iter().map(move |subject| (subject.name(campaign), wiring.stage))
            })
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Whatever a stage publishes, exactly one stage consumes; every stage is wired.
        #[test]
        fn every_published_subject_has_one_consumer() {
            for wiring in STAGES {
                for subject in wiring.publishes {
                    let readers =
                        STAGES.iter().filter(|other| other.consumes.contains(subject)).count();
                    assert_eq!(
                        readers, 1,
                        "{subject:?} published by {} has {readers} consumers",
                        wiring.stage
                    );
                }
            }
            assert_eq!(STAGES.map(|wiring| wiring.stage), Stage::ALL);
            assert_eq!(consumers("c").len(), 6);
            assert_eq!(input(Stage::Infer, "c"), "panscreen.c.preprocessed");
        }
    }
}

/// Deterministic message id: the same study at the same stage always gets the same id,
/// so a retried publish is dropped as a duplicate.
pub fn message_id(study_key: &str, stage: Stage) -> String {
    format!("{study_key}:{stage}")
}

/// What every stage knows about a study: pseudonymous ids and the de-identified
/// attributes epidemiologists need. Built by ingest, carried unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyContext {
    pub campaign: String,
    /// Keyed pseudonym of the StudyInstanceUID.
    pub study_key: String,
    /// Keyed pseudonym of the patient (PatientID and its issuer), for recall.
    pub patient_key: String,
    pub site_id: String,
    pub region_code: String,
    pub region_name: String,
    pub province: String,
    /// Five-year age band at the scan, e.g. "55-59"; "unknown" when absent.
    pub age_band: String,
    /// "F", "M", "O" or "U" (unknown).
    pub sex: String,
    /// Scan date, ISO 8601 (YYYY-MM-DD).
    pub scan_date: String,
    pub timings: StageTimes,
    /// How often the study was requeued (`panscreen requeue`); part of its message ids,
    /// so that a requeued study is not dropped as a repeat of its first pass.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u32,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// A message id with the requeue generation appended when there is one.
fn with_generation(id: String, generation: u32) -> String {
    if generation == 0 {
        id
    } else {
        format!("{id}:r{generation}")
    }
}

impl StudyContext {
    /// The id of this study's message from `stage`.
    pub fn message_id(&self, stage: Stage) -> String {
        with_generation(message_id(&self.study_key, stage), self.generation)
    }

    /// "YYYY-MM" of the scan, the partition key of the results.
    pub fn scan_month(&self) -> &str {
        self.scan_date.get(..7).unwrap_or("unknown")
    }
}

/// When each stage finished with the study (UTC).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimes {
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub ingested_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub preprocessed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub scored_at: Option<OffsetDateTime>,
    /// Wall time spent inside each stage's handler, in milliseconds.
    #[serde(default)]
    pub preprocess_ms: Option<f64>,
    #[serde(default)]
    pub infer_ms: Option<f64>,
}

/// The series ingest chose to screen, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesChoice {
    /// Keyed pseudonym of the SeriesInstanceUID.
    pub series_key: String,
    pub series_number: Option<i32>,
    /// Why this series, in words.
    pub reason: String,
    /// How many series the study had.
    pub candidates: u32,
    pub slices: u32,
    pub rows: u32,
    pub columns: u32,
    /// Row and column spacing in mm.
    pub pixel_spacing_mm: [f64; 2],
    /// Distance between consecutive slice centres along the normal, in mm.
    pub slice_spacing_mm: f64,
    pub slice_thickness_mm: Option<f64>,
    /// Every other series of the study and why it was not chosen, in words.
    #[serde(default)]
    pub not_chosen: Vec<String>,
}

/// One slice of the chosen series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceRef {
    /// Object key in the input store.
    pub key: String,
    /// ImagePositionPatient: centre of the first pixel, patient coordinates (mm).
    pub position_mm: [f64; 3],
    /// Frame of a multi-frame (Enhanced CT) object, 0-based; 0 for a single-frame image.
    #[serde(default)]
    pub frame: u32,
}

/// ingest → preprocess: a study ready to decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyIngested {
    pub context: StudyContext,
    pub series: SeriesChoice,
    /// ImageOrientationPatient shared by all slices: row then column direction cosines.
    pub image_orientation: [f64; 6],
    /// The slices, sorted along the slice normal (ascending).
    pub slices: Vec<SliceRef>,
}

/// Where a tensor sits in patient coordinates (LPS, mm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorGeometry {
    /// Tensor shape, `[1, 1, depth, height, width]`.
    pub shape: Vec<usize>,
    /// Voxel spacing along (depth, height, width), in mm.
    pub spacing_mm: [f64; 3],
    /// Patient coordinates of the centre of voxel (0, 0, 0).
    pub origin_mm: [f64; 3],
    /// Unit vectors of the width (row), height (column) and depth (slice) axes.
    pub row_direction: [f64; 3],
    pub column_direction: [f64; 3],
    pub slice_direction: [f64; 3],
}

impl TensorGeometry {
    /// Patient coordinates of a (depth, height, width) index, fractional allowed.
    pub fn to_patient(&self, index: [f64; 3]) -> [f64; 3] {
        let [dz, dy, dx] = self.spacing_mm;
        std::array::from_fn(|axis| {
            self.origin_mm[axis]
                + index[2] * dx * self.row_direction[axis]
                + index[1] * dy * self.column_direction[axis]
                + index[0] * dz * self.slice_direction[axis]
        })
    }

    pub fn voxel_volume_mm3(&self) -> f64 {
        self.spacing_mm.iter().product()
    }
}

/// preprocess → infer: the model-ready tensor is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyPreprocessed {
    pub context: StudyContext,
    pub series: SeriesChoice,
    /// Key of the `.npy` tensor in the work store.
    pub tensor_key: String,
    pub geometry: TensorGeometry,
    /// Name of the model manifest the tensor was made for.
    pub model_name: String,
    /// For a cascade: the whole scan on stage 2's finer grid, HU as int16 clamped to stage
    /// 2's window, which infer cuts the pancreas's box from (`tensor_key` is then stage 1's
    /// input).
    #[serde(default)]
    pub fine_grid: Option<StoredGrid>,
}

/// A grid preprocess stored in the work store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredGrid {
    /// Key of the grid (HU as int16, `npy::encode_fine_grid`'s format) in the work store.
    pub key: String,
    pub geometry: TensorGeometry,
}

/// The model that scored a study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

/// What the model said about one study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// False when the model could not judge the study (no pancreas found, or it runs
    /// off the scan): no probability, never flagged, never counted as negative.
    #[serde(default = "assessable")]
    pub assessable: bool,
    /// Why the study is not assessable, for a person.
    #[serde(default)]
    pub not_assessable_reason: Option<String>,
    /// The model's own output, before calibration (none when not assessable).
    #[serde(default)]
    pub raw_score: Option<f64>,
    /// The calibrated probability (the raw score when the manifest has no calibration).
    pub lesion_probability: Option<f64>,
    pub flagged: bool,
    /// The operating point's threshold on `lesion_probability`.
    pub threshold: f64,
    /// The manifest's operating point that set `flagged` ("default" for a manifest with
    /// one threshold).
    #[serde(default)]
    pub operating_point: String,
    /// Present when the model returns a mask and the mask is not empty.
    pub lesion_volume_mm3: Option<f64>,
    pub lesion_centroid_mm: Option<[f64; 3]>,
    /// Longest extent of the lesion's voxels along the tensor's axes, mm.
    #[serde(default)]
    pub lesion_diameter_mm: Option<f64>,
    /// Part of the pancreas the lesion lies in (head, body, tail: thirds of the
    /// pancreas's extent from the patient's right), cascades only.
    #[serde(default)]
    pub lesion_location: Option<String>,
    /// The pancreas stage 1 found: its volume (mm³) and its box's centre (patient mm).
    #[serde(default)]
    pub pancreas_volume_mm3: Option<f64>,
    pub model: ModelIdentity,
}

fn assessable() -> bool {
    true
}

/// infer → aggregate: a scored study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyScored {
    pub context: StudyContext,
    pub series: SeriesChoice,
    pub prediction: Prediction,
}

/// Any stage → aggregate: an input that did not make it, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub campaign: String,
    pub stage: Stage,
    /// What failed: the input object key, the folder holding a study's objects (ingest),
    /// or the study pseudonym (later stages).
    pub input: String,
    /// Every object key behind the record, so that an operator can find each file of a
    /// quarantined study (empty when the stage no longer knows them).
    #[serde(default)]
    pub inputs: Vec<String>,
    pub study_key: Option<String>,
    pub site_id: Option<String>,
    /// A reason a person understands.
    pub reason: String,
    pub detail: String,
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The requeue generation of the study or object (0: its first pass).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u32,
}

impl QuarantineRecord {
    /// Message id for the quarantine subject: one record per input per stage and pass.
    pub fn message_id(&self) -> String {
        let id = format!(
            "quarantine:{}:{}",
            self.stage,
            self.study_key.as_deref().unwrap_or(&self.input)
        );
        with_generation(id, self.generation)
    }
}

/// An input object that is not screened and is not an error either
/// (e.g. a DICOMDIR, a dose report next to the CT). Counted, never silent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IgnoredInput {
    pub input: String,
    pub reason: String,
}

/// A chunk of ignored inputs (ingest may ignore thousands of files of one study).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IgnoredInputs {
    pub campaign: String,
    pub inputs: Vec<IgnoredInput>,
}

impl IgnoredInputs {
    /// Deterministic: the same inputs give the same id.
    pub fn message_id(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for input in &self.inputs {
            hash.update(input.input.as_bytes());
            hash.update([0]);
        }
        format!("ignored:{}", &hex::encode(hash.finalize())[..32])
    }
}

/// `panscreen submit`: screen what is under `prefix` (a key prefix of the store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanRequest {
    pub campaign: String,
    pub prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
}

/// A scored study with made-up, pseudonymous-looking values, for tests of the stages
/// that read scored studies (aggregate's unit tests, the outage tests).
pub fn example_scored(campaign: &str, study_key: &str, flagged: bool) -> StudyScored {
    StudyScored {
        context: StudyContext {
            campaign: campaign.into(),
            study_key: study_key.into(),
            patient_key: format!("patient-{study_key}"),
            site_id: "NB-J01".into(),
            region_code: "330205".into(),
            region_name: "Jiangbei".into(),
            province: "Zhejiang".into(),
            age_band: "60-64".into(),
            sex: "F".into(),
            scan_date: "2025-06-06".into(),
            timings: StageTimes::default(),
            generation: 0,
        },
        series: SeriesChoice {
            series_key: format!("series-{study_key}"),
            series_number: Some(2),
            reason: "the only series".into(),
            candidates: 1,
            slices: 50,
            rows: 64,
            columns: 64,
            pixel_spacing_mm: [5.6, 5.6],
            slice_spacing_mm: 2.5,
            slice_thickness_mm: Some(2.5),
            not_chosen: Vec::new(),
        },
        prediction: Prediction {
            assessable: true,
            not_assessable_reason: None,
            raw_score: Some(if flagged { 0.9 } else { 0.1 }),
            lesion_probability: Some(if flagged { 0.9 } else { 0.1 }),
            flagged,
            threshold: 0.5,
            operating_point: "default".into(),
            lesion_volume_mm3: None,
            lesion_centroid_mm: None,
            lesion_diameter_mm: None,
            lesion_location: None,
            pancreas_volume_mm3: None,
            model: ModelIdentity { name: "m".into(), version: "1".into(), sha256: "0".into() },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_maps_index_to_patient_coordinates() {
        let geometry = TensorGeometry {
            shape: vec![1, 1, 4, 4, 4],
            spacing_mm: [3.0, 2.0, 1.0],
            origin_mm: [10.0, 20.0, 30.0],
            row_direction: [1.0, 0.0, 0.0],
            column_direction: [0.0, 1.0, 0.0],
            slice_direction: [0.0, 0.0, 1.0],
        };
        assert_eq!(geometry.to_patient([1.0, 2.0, 3.0]), [13.0, 24.0, 33.0]);
        assert_eq!(geometry.voxel_volume_mm3(), 6.0);
    }

    #[test]
    fn a_requeued_study_gets_new_message_ids() {
        let mut context: StudyContext = serde_json::from_str(
            r#"{"campaign":"c","study_key":"k","patient_key":"p","site_id":"s","region_code":"r",
                "region_name":"n","province":"v","age_band":"60-64","sex":"F","scan_date":"2025-01-01",
                "timings":{}}"#,
        )
        .unwrap();
        assert_eq!(context.generation, 0, "messages of earlier versions read as generation 0");
        assert_eq!(context.message_id(Stage::Ingest), "k:ingest");
        context.generation = 2;
        assert_eq!(context.message_id(Stage::Ingest), "k:ingest:r2");
        assert!(serde_json::to_string(&context).unwrap().contains(r#""generation":2"#));
    }

    #[test]
    fn message_ids_are_deterministic() {
        assert_eq!(message_id("abc", Stage::Infer), message_id("abc", Stage::Infer));
        assert_ne!(message_id("abc", Stage::Infer), message_id("abc", Stage::Preprocess));
    }
}
