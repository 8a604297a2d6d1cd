//! evaluate: a run's results against a cohort's ground truth (`panscreen evaluate`).
//!
//! - [`stats`]: AUC with DeLong's interval, Wilson intervals, a cut-off at a target
//!   specificity, predictive values at a prevalence.
//! - [`report`]: every figure with its counts and interval, printed and written as one
//!   long Parquet table (`section, grouping, stratum, metric, value, ci_low, ci_high,
//!   numerator, denominator, note`).
//! - [`error`]: why an evaluation cannot be made (missing columns, duplicate keys, no
//!   match, one class): an error that says which, never a NaN printed as a figure.
//!
//! A labelled study ends in one of four places: scored, not assessable (the model
//! found no pancreas to judge), quarantined, or missing from the outputs. Only scored
//! studies enter the figures of the model; the others are counted by truth class, and
//! the "all studies" line counts every lost lesion as a miss.
//!
//! Labels are joined to results by the study's keyed pseudonym, so the evaluation needs
//! the key file of the run (as `panscreen synth`'s labels hold the DICOM UIDs).

pub mod error;
pub mod report;
pub mod stats;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow::array::{Array, BooleanArray, Float64Array, StringArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use panscreen_shared::pseudonym::Pseudonymizer;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub use error::EvaluateError;
pub use report::{Figure, Report};

/// What became of a labelled study.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Scored {
        probability: f64,
        flagged: bool,
    },
    /// Judged by the pipeline as one it cannot assess (no pancreas in view, or at the
    /// scan's edge): no probability, never flagged.
    NotAssessable {
        reason: String,
    },
    Quarantined {
        stage: String,
        reason: String,
    },
    /// In the labels, in no output table.
    Missing,
}

/// One labelled study and its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub study_key: String,
    pub lesion: bool,
    pub diameter_mm: Option<f64>,
    /// How far the lesion is below the gland, in HU.
    pub contrast_hu: Option<f64>,
    pub location: Option<String>,
    pub noise_sigma_hu: Option<f64>,
    pub site_id: Option<String>,
    pub region_code: Option<String>,
    /// How the patient lay (DICOM Patient Position: HFS, HFP, FFS…), when labelled.
    pub patient_position: Option<String>,
    pub outcome: Outcome,
}

/// Every `.parquet` file under `directory`, sorted; none when it does not exist.
pub fn parquet_files(directory: &Path) -> Result<Vec<PathBuf>, EvaluateError> {
    let mut files = Vec::new();
    if !directory.exists() {
        return Ok(files);
    }
    let mut pending = vec![directory.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let unreadable = |error: std::io::Error| EvaluateError::Unreadable {
            path: folder.clone(),
            detail: error.to_string(),
        };
        for entry in std::fs::read_dir(&folder).map_err(unreadable)? {
            let path = entry.map_err(unreadable)?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The record batches of one Parquet file.
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>, EvaluateError> {
    let unreadable =
        |detail: String| EvaluateError::Unreadable { path: path.to_path_buf(), detail };
    let file = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|builder| builder.build())
        .map_err(|e| unreadable(e.to_string()))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| unreadable(e.to_string()))
}

/// A column cast to `to` (strings may be stored as dictionaries or large strings, floats
/// as f32): `None` when the file does not have it.
fn optional_column(
    path: &Path,
    batch: &RecordBatch,
    name: &str,
    to: &DataType,
) -> Result<Option<std::sync::Arc<dyn Array>>, EvaluateError> {
    let Some(column) = batch.column_by_name(name) else { return Ok(None) };
    arrow::compute::cast(column, to).map(Some).map_err(|_| EvaluateError::Column {
        path: path.to_path_buf(),
        column: name.to_string(),
        expected: type_name(to),
    })
}

fn type_name(data_type: &DataType) -> &'static str {
    match data_type {
        DataType::Utf8 => "string",
        DataType::Float64 => "number",
        _ => "boolean",
    }
}

fn required_column(
    path: &Path,
    batch: &RecordBatch,
    name: &str,
    to: &DataType,
) -> Result<std::sync::Arc<dyn Array>, EvaluateError> {
    optional_column(path, batch, name, to)?.ok_or_else(|| EvaluateError::Column {
        path: path.to_path_buf(),
        column: name.to_string(),
        expected: type_name(to),
    })
}

fn strings(array: &std::sync::Arc<dyn Array>) -> &StringArray {
    array.as_any().downcast_ref::<StringArray>().expect("cast to Utf8")
}

fn floats(array: &std::sync::Arc<dyn Array>) -> &Float64Array {
    array.as_any().downcast_ref::<Float64Array>().expect("cast to Float64")
}

fn booleans(array: &std::sync::Arc<dyn Array>) -> &BooleanArray {
    array.as_any().downcast_ref::<BooleanArray>().expect("cast to Boolean")
}

fn string_at(array: &Option<std::sync::Arc<dyn Array>>, row: usize) -> Option<String> {
    let array = array.as_ref()?;
    array.is_valid(row).then(|| strings(array).value(row).to_string())
}

fn float_at(array: &Option<std::sync::Arc<dyn Array>>, row: usize) -> Option<f64> {
    let array = array.as_ref()?;
    array.is_valid(row).then(|| floats(array).value(row)).filter(|v| v.is_finite())
}

/// A key that occurs more than once, and how often.
fn repeated<'a>(keys: impl Iterator<Item = &'a str>) -> Option<(String, usize)> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for key in keys {
        *counts.entry(key).or_default() += 1;
    }
    counts.into_iter().find(|(_, times)| *times > 1).map(|(key, times)| (key.to_string(), times))
}

/// The cohort: every labelled study of `labels` (a `labels.parquet` of `panscreen
/// synth`, or any file with `study_instance_uid` and `lesion_present`) with its outcome
/// in `results` (an output directory of `panscreen run`, or a compacted campaign).
pub fn read_cohort(
    labels: &Path,
    results: &Path,
    pseudonymizer: &Pseudonymizer,
) -> Result<Vec<Case>, EvaluateError> {
    let mut cases: Vec<Case> = Vec::new();
    for batch in read_batches(labels)? {
        let uid = required_column(labels, &batch, "study_instance_uid", &DataType::Utf8)?;
        let present = required_column(labels, &batch, "lesion_present", &DataType::Boolean)?;
        let float = |name| optional_column(labels, &batch, name, &DataType::Float64);
        let string = |name| optional_column(labels, &batch, name, &DataType::Utf8);
        let (diameter, contrast, noise) = (
            float("lesion_diameter_mm")?,
            float("lesion_hu_below_pancreas")?,
            float("noise_sigma_hu")?,
        );
        let (location, site, region) =
            (string("lesion_location")?, string("site_id")?, string("region_code")?);
        let position = string("patient_position")?;
        for row in 0..batch.num_rows() {
            if !uid.is_valid(row) {
                continue;
            }
            let study_key = pseudonymizer.study(strings(&uid).value(row));
            let lesion = present.is_valid(row) && booleans(&present).value(row);
            cases.push(Case {
                study_key,
                lesion,
                diameter_mm: float_at(&diameter, row).filter(|_| lesion),
                contrast_hu: float_at(&contrast, row).filter(|_| lesion),
                location: string_at(&location, row).filter(|_| lesion),
                noise_sigma_hu: float_at(&noise, row),
                site_id: string_at(&site, row),
                region_code: string_at(&region, row),
                patient_position: string_at(&position, row),
                outcome: Outcome::Missing,
            });
        }
    }
    if cases.is_empty() {
        return Err(EvaluateError::NoLabels { path: labels.to_path_buf() });
    }
    if let Some((study_key, times)) = repeated(cases.iter().map(|case| case.study_key.as_str())) {
        return Err(EvaluateError::DuplicateLabel { study_key, times });
    }
    let index: HashMap<String, usize> =
        cases.iter().enumerate().map(|(i, case)| (case.study_key.clone(), i)).collect();

    let mut results_read = 0usize;
    let mut scored: Vec<String> = Vec::new();
    for path in parquet_files(&results.join("results"))? {
        for batch in read_batches(&path)? {
            let key = required_column(&path, &batch, "study_key", &DataType::Utf8)?;
            let probability =
                required_column(&path, &batch, "lesion_probability", &DataType::Float64)?;
            let flagged = required_column(&path, &batch, "flagged", &DataType::Boolean)?;
            let assessable = optional_column(&path, &batch, "assessable", &DataType::Boolean)?;
            let why = optional_column(&path, &batch, "not_assessable_reason", &DataType::Utf8)?;
            for row in 0..batch.num_rows() {
                results_read += 1;
                let study_key = strings(&key).value(row).to_string();
                scored.push(study_key.clone());
                let Some(&at) = index.get(&study_key) else { continue };
                let judged =
                    assessable.as_ref().is_none_or(|a| !a.is_valid(row) || booleans(a).value(row));
                cases[at].outcome = if judged && probability.is_valid(row) {
                    Outcome::Scored {
                        probability: floats(&probability).value(row),
                        flagged: flagged.is_valid(row) && booleans(&flagged).value(row),
                    }
                } else {
                    Outcome::NotAssessable {
                        reason: string_at(&why, row).unwrap_or_else(|| "not assessable".into()),
                    }
                };
            }
        }
    }
    if let Some((study_key, times)) = repeated(scored.iter().map(String::as_str)) {
        return Err(EvaluateError::DuplicateResult { study_key, times });
    }
    for path in parquet_files(&results.join("quarantine"))? {
        for batch in read_batches(&path)? {
            let key = required_column(&path, &batch, "study_key", &DataType::Utf8)?;
            let stage = required_column(&path, &batch, "stage", &DataType::Utf8)?;
            let reason = required_column(&path, &batch, "reason", &DataType::Utf8)?;
            for row in 0..batch.num_rows() {
                let Some(study_key) = string_at(&Some(key.clone()), row) else { continue };
                let Some(&at) = index.get(&study_key) else { continue };
                // A result wins over a quarantine row (a redelivered copy's).
                if cases[at].outcome == Outcome::Missing {
                    cases[at].outcome = Outcome::Quarantined {
                        stage: strings(&stage).value(row).to_string(),
                        reason: strings(&reason).value(row).to_string(),
                    };
                }
            }
        }
    }
    if cases.iter().all(|case| case.outcome == Outcome::Missing) {
        return Err(EvaluateError::NoMatch {
            labels: labels.to_path_buf(),
            output: results.to_path_buf(),
            labelled: cases.len(),
            results: results_read,
        });
    }
    Ok(cases)
}

/// Reads each cohort (its labels and the output of its run) and computes every figure
/// over all of them pooled, as one cohort: several campaigns, or several synthetic
/// cohorts, whose studies must all differ.
pub fn evaluate(
    cohorts: &[(&Path, &Path)],
    pseudonymizer: &Pseudonymizer,
    screening_prevalence: f64,
) -> Result<Report, EvaluateError> {
    if !(screening_prevalence > 0.0 && screening_prevalence < 1.0) {
        return Err(EvaluateError::Prevalence(screening_prevalence));
    }
    let mut cases = Vec::new();
    for (labels, results) in cohorts {
        cases.extend(read_cohort(labels, results, pseudonymizer)?);
    }
    if let Some((study_key, times)) = repeated(cases.iter().map(|case| case.study_key.as_str())) {
        return Err(EvaluateError::DuplicateLabel { study_key, times });
    }
    Report::new(&cases, screening_prevalence)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::ArrayRef;
    use std::sync::Arc;

    fn case(key: &str, lesion: bool, outcome: Outcome) -> Case {
        Case {
            study_key: key.into(),
            lesion,
            diameter_mm: lesion.then_some(15.0),
            contrast_hu: lesion.then_some(12.0),
            location: None,
            noise_sigma_hu: Some(10.0),
            site_id: Some("site-a".into()),
            region_code: Some("330203".into()),
            patient_position: None,
            outcome,
        }
    }

    fn scored(probability: f64) -> Outcome {
        Outcome::Scored { probability, flagged: probability >= 0.5 }
    }

    fn cohort() -> Vec<Case> {
        let mut cases = vec![
            case("p1", true, scored(0.9)),
            case("p2", true, scored(0.8)),
            case("p3", true, scored(0.3)),
            case(
                "p4",
                true,
                Outcome::Quarantined {
                    stage: "ingest".into(),
                    reason: "series has missing slices".into(),
                },
            ),
        ];
        for (i, p) in [0.1, 0.2, 0.05, 0.4, 0.6, 0.15].into_iter().enumerate() {
            cases.push(case(&format!("n{i}"), false, scored(p)));
        }
        cases.push(case(
            "n9",
            false,
            Outcome::NotAssessable { reason: "no pancreas found".into() },
        ));
        cases
    }

    #[test]
    fn figures_count_what_they_say_and_hold_no_nan() {
        let report = Report::new(&cohort(), 0.001).unwrap();
        let figure = |section, grouping, stratum, metric| {
            report
                .figure(section, grouping, stratum, metric)
                .unwrap_or_else(|| panic!("{section}/{grouping}/{stratum}/{metric}"))
        };
        let se = figure("model", "shipped operating point", "scored studies", "sensitivity");
        assert_eq!((se.numerator, se.denominator), (Some(2), Some(3)));
        let sp = figure("model", "shipped operating point", "scored studies", "specificity");
        assert_eq!((sp.numerator, sp.denominator), (Some(5), Some(6)));
        // p3 (0.3) outranks 0.1, 0.2, 0.05, 0.15 of six: 2 + 2 + 4/6 over 3.
        let auc = figure("model", "scored studies", "all", "auc");
        assert!((auc.value.unwrap() - (6.0 + 6.0 + 4.0) / 18.0).abs() < 1e-12, "{auc:?}");
        // The quarantined lesion is a miss over all studies.
        let all = figure(
            "all studies",
            "every labelled study",
            "lost lesions count as misses",
            "sensitivity",
        );
        assert_eq!((all.numerator, all.denominator), (Some(2), Some(4)));
        let lost = figure(
            "cohort",
            "with lesion",
            "quarantined by ingest: series has missing slices",
            "studies",
        );
        assert_eq!(lost.value, Some(1.0));
        let unassessed =
            figure("cohort", "without lesion", "not assessable: no pancreas found", "studies");
        assert_eq!(unassessed.value, Some(1.0));
        // Calibration over the nine scored studies, worked by hand: mean predicted
        // 3.5 / 9; Brier (0.1² + 0.2² + 0.7² + 0.1² + 0.2² + 0.05² + 0.4² + 0.6² + 0.15²) / 9.
        let mean = figure("calibration", "all scored studies", "all", "mean predicted");
        assert!((mean.value.unwrap() - 3.5 / 9.0).abs() < 1e-12, "{mean:?}");
        let share = figure("calibration", "all scored studies", "all", "observed lesion share");
        assert_eq!((share.numerator, share.denominator), (Some(3), Some(9)));
        let brier = figure("calibration", "all scored studies", "all", "brier score");
        assert!((brier.value.unwrap() - 1.135 / 9.0).abs() < 1e-12, "{brier:?}");
        // At 99% specificity on six negatives every negative stays unflagged.
        let strict = figure("model", "99% specificity", "scored studies", "specificity");
        assert_eq!((strict.numerator, strict.denominator), (Some(6), Some(6)));
        let batch = report.batch();
        let values =
            batch.column_by_name("value").unwrap().as_any().downcast_ref::<Float64Array>().unwrap();
        assert!(values.iter().flatten().all(f64::is_finite));
        assert!(report.render().contains("real patients, not comparable"));
    }

    #[test]
    fn the_gate_verdict_names_each_part_missed_with_its_counts() {
        let report = Report::new(&cohort(), 0.001).unwrap();
        // Three scored lesions of 15 mm and 12 HU, six scored negatives: AUC 16/18,
        // sensitivity 2/3 and specificity 5/6 at the run's flags.
        let missed = report.gate_verdict().unwrap_err();
        assert!(missed.starts_with("held-out gate not met"), "{missed}");
        for part in
            ["auc 0.889 < 0.95", "sensitivity 0.667 [2/3] < 0.9", "specificity 0.833 [5/6] < 0.95"]
        {
            assert!(missed.contains(part), "{part} in {missed}");
        }
        // Every lesion flagged and above every negative, no negative flagged: met.
        let mut cases: Vec<Case> =
            (0..3).map(|i| case(&format!("p{i}"), true, scored(0.7 + 0.1 * i as f64))).collect();
        cases.extend((0..6).map(|i| case(&format!("n{i}"), false, scored(0.05 * i as f64))));
        let met = Report::new(&cases, 0.001).unwrap().gate_verdict().unwrap();
        assert!(met.contains("sensitivity 1.000 [3/3] ≥ 0.9"), "{met}");
        // The same with one lesion too faint for the gate's stratum and one negative
        // flagged: AUC and sensitivity still met, specificity 5/6 not.
        cases[0].contrast_hu = Some(8.0);
        cases[3].outcome = Outcome::Scored { probability: 0.0, flagged: true };
        let one = Report::new(&cases, 0.001).unwrap().gate_verdict().unwrap_err();
        assert!(one.ends_with("specificity 0.833 [5/6] < 0.95"), "{one}");
        assert!(!one.contains("sensitivity"), "{one}");
    }

    #[test]
    fn a_cohort_of_one_class_is_an_error_that_says_which() {
        let cases: Vec<Case> = cohort().into_iter().filter(|c| !c.lesion).collect();
        let error = Report::new(&cases, 0.001).unwrap_err().to_string();
        assert!(error.contains("no studies with a lesion"), "{error}");
    }

    fn write(path: &Path, columns: Vec<(&str, ArrayRef)>) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let file = std::fs::File::create(path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    fn labels(path: &Path, uids: &[&str]) {
        write(
            path,
            vec![
                ("study_instance_uid", Arc::new(StringArray::from(uids.to_vec())) as ArrayRef),
                (
                    "lesion_present",
                    Arc::new(BooleanArray::from(
                        uids.iter().map(|u| u.starts_with('p')).collect::<Vec<_>>(),
                    )),
                ),
            ],
        );
    }

    #[test]
    fn labels_are_joined_by_pseudonym_and_bad_inputs_are_named() {
        let directory = tempfile::tempdir().unwrap();
        let key = Pseudonymizer::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap();
        let (label_file, out) =
            (directory.path().join("labels.parquet"), directory.path().join("out"));
        labels(&label_file, &["p1", "n1", "p2"]);
        write(
            &out.join("results/region_code=1/part-0.parquet"),
            vec![
                (
                    "study_key",
                    Arc::new(StringArray::from(vec![key.study("p1"), key.study("n1")])) as ArrayRef,
                ),
                ("lesion_probability", Arc::new(Float64Array::from(vec![0.9, 0.1]))),
                ("flagged", Arc::new(BooleanArray::from(vec![true, false]))),
            ],
        );
        write(
            &out.join("quarantine/part-0.parquet"),
            vec![
                (
                    "study_key",
                    Arc::new(StringArray::from(vec![Some(key.study("p2")), None])) as ArrayRef,
                ),
                ("stage", Arc::new(StringArray::from(vec!["preprocess", "ingest"]))),
                (
                    "reason",
                    Arc::new(StringArray::from(vec!["cannot decode a slice", "not a DICOM file"])),
                ),
            ],
        );
        let cases = read_cohort(&label_file, &out, &key).unwrap();
        let outcomes: Vec<&Outcome> = cases.iter().map(|c| &c.outcome).collect();
        assert_eq!(outcomes[0], &Outcome::Scored { probability: 0.9, flagged: true });
        assert!(matches!(outcomes[2], Outcome::Quarantined { stage, .. } if stage == "preprocess"));

        // Another key: nothing matches.
        let other = Pseudonymizer::new(b"another key, another run's pseudonyms".to_vec()).unwrap();
        let error = read_cohort(&label_file, &out, &other).unwrap_err().to_string();
        assert!(error.contains("none of the 3 labelled studies"), "{error}");
        // A study labelled twice.
        labels(&label_file, &["p1", "n1", "p1"]);
        let error = read_cohort(&label_file, &out, &key).unwrap_err().to_string();
        assert!(error.contains(&format!("study {} 2 times", key.study("p1"))), "{error}");
        // Labels without the truth column.
        write(
            &label_file,
            vec![("study_instance_uid", Arc::new(StringArray::from(vec!["p1"])) as ArrayRef)],
        );
        let error = read_cohort(&label_file, &out, &key).unwrap_err().to_string();
        assert!(error.contains("has no column lesion_present"), "{error}");
    }

    /// One cohort's labels and a run that scored every study of it.
    fn scored_cohort(directory: &Path, key: &Pseudonymizer, scores: &[(&str, f64)]) {
        let uids: Vec<&str> = scores.iter().map(|(uid, _)| *uid).collect();
        labels(&directory.join("labels.parquet"), &uids);
        write(
            &directory.join("out/results/part-0.parquet"),
            vec![
                (
                    "study_key",
                    Arc::new(StringArray::from(
                        uids.iter().map(|uid| key.study(uid)).collect::<Vec<_>>(),
                    )) as ArrayRef,
                ),
                (
                    "lesion_probability",
                    Arc::new(Float64Array::from(
                        scores.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
                    )),
                ),
                (
                    "flagged",
                    Arc::new(BooleanArray::from(
                        scores.iter().map(|(_, p)| *p > 0.5).collect::<Vec<_>>(),
                    )),
                ),
            ],
        );
    }

    #[test]
    fn cohorts_are_pooled_and_a_study_in_two_of_them_is_an_error() {
        let directory = tempfile::tempdir().unwrap();
        let key = Pseudonymizer::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap();
        let (a, b) = (directory.path().join("a"), directory.path().join("b"));
        // Each cohort alone separates perfectly; pooled, b's lesion scores below a's
        // lesion-free study: 3 of the 4 pairs ordered, AUC 0.75.
        scored_cohort(&a, &key, &[("p1", 0.9), ("n1", 0.6)]);
        scored_cohort(&b, &key, &[("p2", 0.5), ("n2", 0.1)]);
        let paths = |d: &Path| (d.join("labels.parquet"), d.join("out"));
        let ((la, ra), (lb, rb)) = (paths(&a), paths(&b));
        let one = evaluate(&[(&la, &ra)], &key, 0.001).unwrap();
        let auc = |report: &Report| {
            report.figure("model", "scored studies", "all", "auc").and_then(|f| f.value)
        };
        assert_eq!(auc(&one), Some(1.0));
        let pooled = evaluate(&[(&la, &ra), (&lb, &rb)], &key, 0.001).unwrap();
        let labelled = pooled.figure("cohort", "with lesion", "labelled", "studies").unwrap();
        assert_eq!((labelled.numerator, labelled.denominator), (Some(2), Some(4)));
        assert_eq!(auc(&pooled), Some(0.75));
        // The same cohort given twice: every study is labelled twice.
        let error = evaluate(&[(&la, &ra), (&la, &ra)], &key, 0.001).unwrap_err().to_string();
        assert!(error.contains("2 times"), "{error}");
        // One cohort run with another key: the error names that cohort's files.
        let c = directory.path().join("c");
        let other = Pseudonymizer::new(b"another key, another run's pseudonyms".to_vec()).unwrap();
        scored_cohort(&c, &other, &[("p3", 0.7), ("n3", 0.2)]);
        let (lc, rc) = paths(&c);
        let error = evaluate(&[(&la, &ra), (&lc, &rc)], &key, 0.001).unwrap_err().to_string();
        let named = format!("in {} has", lc.display());
        assert!(error.contains(&named) && error.contains(&rc.display().to_string()), "{error}");
        assert!(!error.contains(&la.display().to_string()), "{error}");
    }
}
