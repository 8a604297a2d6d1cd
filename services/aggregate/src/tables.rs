//! The Parquet tables epidemiologists read, as Arrow record batches.
//!
//! | table        | path                                                        | one row per |
//! |--------------|-------------------------------------------------------------|-------------|
//! | results      | `results/region_code=…/scan_month=YYYY-MM/part-….parquet`   | screened study |
//! | quarantine   | `quarantine/part-….parquet`                                 | input that did not make it (`inputs`: every object key behind it) |
//! | ignored      | `ignored/part-….parquet`                                    | input left out on purpose |
//! | summary      | `summary/summary.parquet`                                   | region |
//! | worklist     | `worklist/worklist.parquet`                                 | flagged study, for recall |
//!
//! The Hive partition keys of `results` (`region_code`, `scan_month`) live in the path,
//! not in the files, as DuckDB, Polars, pyarrow and Spark expect.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int32Array, Int64Array, ListBuilder,
    StringArray, StringBuilder, TimestampMicrosecondArray,
};
use arrow::datatypes::{Field, Schema};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use panscreen_shared::contracts::{IgnoredInput, QuarantineRecord, StudyScored};
use time::{Date, OffsetDateTime};

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

/// A `list<string>` column.
fn string_lists<'a>(values: impl Iterator<Item = &'a [String]>) -> ArrayRef {
    let mut builder = ListBuilder::new(StringBuilder::new());
    for list in values {
        for value in list {
            builder.values().append_value(value);
        }
        builder.append(true);
    }
    Arc::new(builder.finish())
}

fn floats(values: impl Iterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(values.collect::<Float64Array>())
}

fn timestamps(values: impl Iterator<Item = Option<OffsetDateTime>>) -> ArrayRef {
    let micros = values.map(|v| v.map(|t| (t.unix_timestamp_nanos() / 1000) as i64));
    Arc::new(micros.collect::<TimestampMicrosecondArray>().with_timezone("UTC"))
}

fn days_since_epoch(iso: &str) -> Option<i32> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = Date::parse(iso, &format).ok()?;
    Some(
        date.to_julian_day()
            - Date::from_calendar_date(1970, time::Month::January, 1).ok()?.to_julian_day(),
    )
}

fn batch(columns: Vec<(&str, ArrayRef)>) -> Result<RecordBatch, ArrowError> {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, array)| Field::new(*name, array.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
}

/// Results rows (without the partition keys).
pub fn results_batch(
    rows: &[StudyScored],
    software_version: &str,
    aggregated_at: OffsetDateTime,
) -> Result<RecordBatch, ArrowError> {
    let centroid = |axis: usize| {
        floats(rows.iter().map(move |r| r.prediction.lesion_centroid_mm.map(|c| c[axis])))
    };
    batch(vec![
        ("study_key", strings(rows.iter().map(|r| Some(r.context.study_key.as_str())))),
        ("patient_key", strings(rows.iter().map(|r| Some(r.context.patient_key.as_str())))),
        ("campaign", strings(rows.iter().map(|r| Some(r.context.campaign.as_str())))),
        ("site_id", strings(rows.iter().map(|r| Some(r.context.site_id.as_str())))),
        ("region_name", strings(rows.iter().map(|r| Some(r.context.region_name.as_str())))),
        ("province", strings(rows.iter().map(|r| Some(r.context.province.as_str())))),
        ("age_band", strings(rows.iter().map(|r| Some(r.context.age_band.as_str())))),
        ("sex", strings(rows.iter().map(|r| Some(r.context.sex.as_str())))),
        (
            "scan_date",
            Arc::new(
                rows.iter()
                    .map(|r| days_since_epoch(&r.context.scan_date))
                    .collect::<Date32Array>(),
            ),
        ),
        ("series_key", strings(rows.iter().map(|r| Some(r.series.series_key.as_str())))),
        (
            "series_number",
            Arc::new(rows.iter().map(|r| r.series.series_number).collect::<Int32Array>()),
        ),
        ("series_reason", strings(rows.iter().map(|r| Some(r.series.reason.as_str())))),
        (
            "series_candidates",
            Arc::new(rows.iter().map(|r| Some(r.series.candidates as i32)).collect::<Int32Array>()),
        ),
        (
            "series_not_chosen",
            Arc::new(
                rows.iter().map(|r| Some(r.series.not_chosen.join("; "))).collect::<StringArray>(),
            ),
        ),
        (
            "slices",
            Arc::new(rows.iter().map(|r| Some(r.series.slices as i32)).collect::<Int32Array>()),
        ),
        ("slice_spacing_mm", floats(rows.iter().map(|r| Some(r.series.slice_spacing_mm)))),
        ("pixel_spacing_mm", floats(rows.iter().map(|r| Some(r.series.pixel_spacing_mm[0])))),
        (
            "assessable",
            Arc::new(rows.iter().map(|r| Some(r.prediction.assessable)).collect::<BooleanArray>()),
        ),
        (
            "not_assessable_reason",
            strings(rows.iter().map(|r| r.prediction.not_assessable_reason.as_deref())),
        ),
        ("raw_score", floats(rows.iter().map(|r| r.prediction.raw_score))),
        ("lesion_probability", floats(rows.iter().map(|r| r.prediction.lesion_probability))),
        (
            "flagged",
            Arc::new(rows.iter().map(|r| Some(r.prediction.flagged)).collect::<BooleanArray>()),
        ),
        ("threshold", floats(rows.iter().map(|r| Some(r.prediction.threshold)))),
        (
            "operating_point",
            strings(rows.iter().map(|r| Some(r.prediction.operating_point.as_str()))),
        ),
        ("lesion_volume_mm3", floats(rows.iter().map(|r| r.prediction.lesion_volume_mm3))),
        ("lesion_centroid_x_mm", centroid(0)),
        ("lesion_centroid_y_mm", centroid(1)),
        ("lesion_centroid_z_mm", centroid(2)),
        ("lesion_diameter_mm", floats(rows.iter().map(|r| r.prediction.lesion_diameter_mm))),
        ("lesion_location", strings(rows.iter().map(|r| r.prediction.lesion_location.as_deref()))),
        ("pancreas_volume_mm3", floats(rows.iter().map(|r| r.prediction.pancreas_volume_mm3))),
        ("model_name", strings(rows.iter().map(|r| Some(r.prediction.model.name.as_str())))),
        ("model_version", strings(rows.iter().map(|r| Some(r.prediction.model.version.as_str())))),
        ("model_sha256", strings(rows.iter().map(|r| Some(r.prediction.model.sha256.as_str())))),
        ("software_version", strings(rows.iter().map(|_| Some(software_version)))),
        ("ingested_at", timestamps(rows.iter().map(|r| r.context.timings.ingested_at))),
        ("preprocessed_at", timestamps(rows.iter().map(|r| r.context.timings.preprocessed_at))),
        ("scored_at", timestamps(rows.iter().map(|r| r.context.timings.scored_at))),
        ("aggregated_at", timestamps(rows.iter().map(|_| Some(aggregated_at)))),
        ("preprocess_ms", floats(rows.iter().map(|r| r.context.timings.preprocess_ms))),
        ("infer_ms", floats(rows.iter().map(|r| r.context.timings.infer_ms))),
    ])
}

pub fn quarantine_batch(rows: &[QuarantineRecord]) -> Result<RecordBatch, ArrowError> {
    batch(vec![
        ("campaign", strings(rows.iter().map(|r| Some(r.campaign.as_str())))),
        ("stage", strings(rows.iter().map(|r| Some(r.stage.as_str())))),
        ("input", strings(rows.iter().map(|r| Some(r.input.as_str())))),
        ("inputs", string_lists(rows.iter().map(|r| r.inputs.as_slice()))),
        ("study_key", strings(rows.iter().map(|r| r.study_key.as_deref()))),
        ("site_id", strings(rows.iter().map(|r| r.site_id.as_deref()))),
        ("reason", strings(rows.iter().map(|r| Some(r.reason.as_str())))),
        ("detail", strings(rows.iter().map(|r| Some(r.detail.as_str())))),
        (
            "attempts",
            Arc::new(rows.iter().map(|r| Some(r.attempts as i32)).collect::<Int32Array>()),
        ),
        ("at", timestamps(rows.iter().map(|r| Some(r.at)))),
        (
            "generation",
            Arc::new(rows.iter().map(|r| Some(r.generation as i32)).collect::<Int32Array>()),
        ),
    ])
}

pub fn ignored_batch(rows: &[IgnoredInput]) -> Result<RecordBatch, ArrowError> {
    batch(vec![
        ("input", strings(rows.iter().map(|r| Some(r.input.as_str())))),
        ("reason", strings(rows.iter().map(|r| Some(r.reason.as_str())))),
    ])
}

/// Per-region counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionCounts {
    pub region_code: String,
    pub region_name: String,
    pub province: String,
    pub screened: i64,
    pub flagged: i64,
    /// Screened, but the model could not judge them (no pancreas found, …).
    pub not_assessable: i64,
    pub quarantined: i64,
}

pub fn summary_batch(rows: &[RegionCounts], campaign: &str) -> Result<RecordBatch, ArrowError> {
    batch(vec![
        ("campaign", strings(rows.iter().map(|_| Some(campaign)))),
        ("region_code", strings(rows.iter().map(|r| Some(r.region_code.as_str())))),
        ("region_name", strings(rows.iter().map(|r| Some(r.region_name.as_str())))),
        ("province", strings(rows.iter().map(|r| Some(r.province.as_str())))),
        ("screened", Arc::new(rows.iter().map(|r| Some(r.screened)).collect::<Int64Array>())),
        ("flagged", Arc::new(rows.iter().map(|r| Some(r.flagged)).collect::<Int64Array>())),
        (
            "flag_rate",
            floats(
                rows.iter().map(|r| (r.screened > 0).then(|| r.flagged as f64 / r.screened as f64)),
            ),
        ),
        (
            "not_assessable",
            Arc::new(rows.iter().map(|r| Some(r.not_assessable)).collect::<Int64Array>()),
        ),
        ("quarantined", Arc::new(rows.iter().map(|r| Some(r.quarantined)).collect::<Int64Array>())),
    ])
}

/// What the worklist needs of a flagged study; built from a scored message or read
/// back from the results table.
#[derive(Debug, Clone, PartialEq)]
pub struct WorklistRow {
    pub site_id: String,
    pub patient_key: String,
    pub study_key: String,
    pub series_key: String,
    pub scan_date: Option<i32>,
    pub region_code: String,
    pub lesion_probability: f64,
    pub lesion_volume_mm3: Option<f64>,
    pub lesion_centroid_mm: [Option<f64>; 3],
    pub model_name: String,
    pub model_version: String,
}

impl From<&StudyScored> for WorklistRow {
    fn from(r: &StudyScored) -> Self {
        let centroid = |axis: usize| r.prediction.lesion_centroid_mm.map(|c| c[axis]);
        WorklistRow {
            site_id: r.context.site_id.clone(),
            patient_key: r.context.patient_key.clone(),
            study_key: r.context.study_key.clone(),
            series_key: r.series.series_key.clone(),
            scan_date: days_since_epoch(&r.context.scan_date),
            region_code: r.context.region_code.clone(),
            // Only flagged studies are on the worklist, and a flagged study has one.
            lesion_probability: r.prediction.lesion_probability.unwrap_or_default(),
            lesion_volume_mm3: r.prediction.lesion_volume_mm3,
            lesion_centroid_mm: [centroid(0), centroid(1), centroid(2)],
            model_name: r.prediction.model.name.clone(),
            model_version: r.prediction.model.version.clone(),
        }
    }
}

/// Flagged studies for the hospitals: by site, most suspicious first.
pub fn worklist_batch(rows: &[WorklistRow]) -> Result<RecordBatch, ArrowError> {
    let mut sorted: Vec<&WorklistRow> = rows.iter().collect();
    sorted.sort_by(|a, b| {
        a.site_id
            .cmp(&b.site_id)
            .then(b.lesion_probability.total_cmp(&a.lesion_probability))
            .then(a.study_key.cmp(&b.study_key))
    });
    let mut rank = Vec::with_capacity(sorted.len());
    for (index, row) in sorted.iter().enumerate() {
        let first_of_site = index == 0 || sorted[index - 1].site_id != row.site_id;
        let previous = if first_of_site { 0 } else { rank[index - 1] };
        rank.push(previous + 1);
    }
    let centroid = |axis: usize| floats(sorted.iter().map(move |r| r.lesion_centroid_mm[axis]));
    batch(vec![
        ("site_id", strings(sorted.iter().map(|r| Some(r.site_id.as_str())))),
        ("priority", Arc::new(rank.into_iter().map(Some).collect::<Int32Array>())),
        ("patient_key", strings(sorted.iter().map(|r| Some(r.patient_key.as_str())))),
        ("study_key", strings(sorted.iter().map(|r| Some(r.study_key.as_str())))),
        ("series_key", strings(sorted.iter().map(|r| Some(r.series_key.as_str())))),
        ("scan_date", Arc::new(sorted.iter().map(|r| r.scan_date).collect::<Date32Array>())),
        ("region_code", strings(sorted.iter().map(|r| Some(r.region_code.as_str())))),
        ("lesion_probability", floats(sorted.iter().map(|r| Some(r.lesion_probability)))),
        ("lesion_volume_mm3", floats(sorted.iter().map(|r| r.lesion_volume_mm3))),
        ("lesion_centroid_x_mm", centroid(0)),
        ("lesion_centroid_y_mm", centroid(1)),
        ("lesion_centroid_z_mm", centroid(2)),
        ("model_name", strings(sorted.iter().map(|r| Some(r.model_name.as_str())))),
        ("model_version", strings(sorted.iter().map(|r| Some(r.model_version.as_str())))),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_count_from_the_epoch() {
        assert_eq!(days_since_epoch("1970-01-02"), Some(1));
        assert_eq!(days_since_epoch("2025-01-01"), Some(20089));
        assert_eq!(days_since_epoch("unknown"), None);
    }
}
