//! `panscreen compact`: merges the many small files a long-running aggregate writes,
//! drops any study that is in the results twice, keeps one final outcome per requeued
//! study or object (its result, else its latest quarantine row), and writes the summary
//! and recall worklist from everything committed.
//!
//! A merged file goes through the same staging and commit as a flush ([`crate::commit`]);
//! its commit names the files it replaces, which are deleted once it is in place. A
//! reader globbing `results/` between the merged file's copy and the deletes can see a
//! study twice for that moment; the window is a few requests long, and a reader that
//! must never see it runs compaction when nobody reads, or deduplicates on `study_key`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use arrow::array::{
    Array, BooleanArray, Date32Array, Float64Array, StringArray, TimestampMicrosecondArray,
};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::Store;
use time::OffsetDateTime;
use tracing::info;

use crate::commit::{self, CommitIds, CommitManifest, Staged};
use crate::tables::{self, RegionCounts, WorklistRow};
use crate::{parquet_bytes, quarantine_region, AggregateError};

/// What a compaction did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CompactReport {
    pub files_before: usize,
    pub files_after: usize,
    pub studies: usize,
    pub duplicates_dropped: usize,
    pub quarantine_rows: usize,
    pub flagged: usize,
    pub regions: Vec<RegionCounts>,
    /// Study keys in the results.
    pub screened: HashSet<String>,
}

fn table_error(key: &str, error: impl std::fmt::Display) -> AggregateError {
    AggregateError::Table(format!("{key}: {error}"))
}

async fn read_parquet(out: &Store, key: &str) -> Result<Vec<RecordBatch>, AggregateError> {
    let bytes = out
        .get(key)
        .await
        .map_err(|source| AggregateError::Write { key: key.to_string(), source })?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|builder| builder.build())
        .map_err(|e| table_error(key, e))?;
    reader.map(|batch| batch.map_err(|e| table_error(key, e))).collect()
}

async fn parquet_keys(out: &Store, prefix: &str) -> Result<Vec<String>, AggregateError> {
    let listed = out
        .list(prefix)
        .await
        .map_err(|source| AggregateError::Write { key: prefix.to_string(), source })?;
    Ok(listed.into_iter().map(|o| o.key).filter(|k| k.ends_with(".parquet")).collect())
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, AggregateError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| AggregateError::Table(format!("results table has no usable column {name}")))
}

/// Keeps the first row of each study key, across calls.
fn first_of_each_study(
    batch: &RecordBatch,
    seen: &mut HashSet<String>,
) -> Result<RecordBatch, AggregateError> {
    let keys = column::<StringArray>(batch, "study_key")?;
    let keep: BooleanArray =
        keys.iter().map(|key| Some(key.is_some_and(|k| seen.insert(k.to_string())))).collect();
    arrow::compute::filter_record_batch(batch, &keep)
        .map_err(|e| AggregateError::Table(e.to_string()))
}

/// The `region_code=…` of a results key.
fn region_of(key: &str) -> String {
    key.split('/')
        .find_map(|part| part.strip_prefix("region_code="))
        .unwrap_or("unknown")
        .to_string()
}

fn optional(array: &Float64Array, row: usize) -> Option<f64> {
    array.is_valid(row).then(|| array.value(row))
}

/// Adds a partition's rows to the regional counts and the worklist.
fn tally(
    batch: &RecordBatch,
    region_code: &str,
    regions: &mut BTreeMap<String, RegionCounts>,
    worklist: &mut Vec<WorklistRow>,
) -> Result<(), AggregateError> {
    let text = |name| column::<StringArray>(batch, name);
    let (study, patient, series, site) =
        (text("study_key")?, text("patient_key")?, text("series_key")?, text("site_id")?);
    let (region_name, province) = (text("region_name")?, text("province")?);
    let (model_name, model_version) = (text("model_name")?, text("model_version")?);
    let flagged = column::<BooleanArray>(batch, "flagged")?;
    // Files written before not-assessable studies existed lack the column.
    let assessable = batch
        .column_by_name("assessable")
        .and_then(|array| array.as_any().downcast_ref::<BooleanArray>());
    let probability = column::<Float64Array>(batch, "lesion_probability")?;
    let volume = column::<Float64Array>(batch, "lesion_volume_mm3")?;
    let centroid = [
        column::<Float64Array>(batch, "lesion_centroid_x_mm")?,
        column(batch, "lesion_centroid_y_mm")?,
        column(batch, "lesion_centroid_z_mm")?,
    ];
    let scan_date = column::<Date32Array>(batch, "scan_date")?;
    for row in 0..batch.num_rows() {
        let counts = regions.entry(region_code.to_string()).or_insert_with(|| RegionCounts {
            region_code: region_code.to_string(),
            region_name: region_name.value(row).to_string(),
            province: province.value(row).to_string(),
            ..RegionCounts::default()
        });
        counts.screened += 1;
        if assessable.is_some_and(|a| a.is_valid(row) && !a.value(row)) {
            counts.not_assessable += 1;
        }
        if flagged.value(row) {
            counts.flagged += 1;
            worklist.push(WorklistRow {
                site_id: site.value(row).to_string(),
                patient_key: patient.value(row).to_string(),
                study_key: study.value(row).to_string(),
                series_key: series.value(row).to_string(),
                scan_date: scan_date.is_valid(row).then(|| scan_date.value(row)),
                region_code: region_code.to_string(),
                lesion_probability: probability.value(row),
                lesion_volume_mm3: optional(volume, row),
                lesion_centroid_mm: centroid.map(|axis| optional(axis, row)),
                model_name: model_name.value(row).to_string(),
                model_version: model_version.value(row).to_string(),
            });
        }
    }
    Ok(())
}

/// The batches of one table as one. Files written by an earlier version may lack
/// columns added since (`inputs`, `generation` of the quarantine table): every batch is
/// brought to the columns of the widest, a missing column read as nulls.
fn concat(batches: &[RecordBatch]) -> Result<Option<RecordBatch>, AggregateError> {
    let Some(widest) = batches.iter().max_by_key(|batch| batch.num_columns()) else {
        return Ok(None);
    };
    let schema = widest.schema();
    let disagree = |e: arrow::error::ArrowError| {
        AggregateError::Table(format!("files of one table disagree on columns: {e}"))
    };
    let aligned = batches
        .iter()
        .map(|batch| {
            let columns = schema
                .fields()
                .iter()
                .map(|field| match batch.column_by_name(field.name()) {
                    Some(column) => column.clone(),
                    None => arrow::array::new_null_array(field.data_type(), batch.num_rows()),
                })
                .collect();
            RecordBatch::try_new(schema.clone(), columns).map_err(disagree)
        })
        .collect::<Result<Vec<_>, _>>()?;
    arrow::compute::concat_batches(&schema, &aligned).map(Some).map_err(disagree)
}

/// Whether `out` holds panscreen tables (compaction never writes tables into a place
/// that holds none to begin with: a mistyped campaign or store).
pub async fn holds_tables(out: &Store) -> Result<bool, AggregateError> {
    for table in ["_commits", "results", "quarantine"] {
        if out
            .has_objects(table)
            .await
            .map_err(|source| AggregateError::Write { key: table.to_string(), source })?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Compacts `out` (a campaign's output root) and writes its summary and worklist.
pub async fn compact(
    out: &Store,
    campaign: &str,
    sites: &SiteRegistry,
) -> Result<CompactReport, AggregateError> {
    let manifests = commit::read_commits(out, &BTreeSet::new()).await?;
    commit::roll_forward(out, &manifests).await?;
    let writer =
        format!("compact-{}", OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000);
    let mut staged = Staged::new(&writer, 0);
    let mut replaced: Vec<String> = Vec::new();
    let mut report = CompactReport::default();
    let mut regions = BTreeMap::new();
    let mut worklist = Vec::new();
    let mut seen = HashSet::new();

    let results = parquet_keys(out, "results").await?;
    let mut partitions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for key in results {
        let folder = key.rsplit_once('/').map(|(folder, _)| folder.to_string()).unwrap_or_default();
        partitions.entry(folder).or_default().push(key);
    }
    for (folder, keys) in &partitions {
        report.files_before += keys.len();
        let mut batches = Vec::new();
        let mut rows_before = 0;
        for key in keys {
            for batch in read_parquet(out, key).await? {
                rows_before += batch.num_rows();
                batches.push(first_of_each_study(&batch, &mut seen)?);
            }
        }
        let Some(merged) = concat(&batches)? else { continue };
        report.duplicates_dropped += rows_before - merged.num_rows();
        tally(&merged, &region_of(folder), &mut regions, &mut worklist)?;
        if keys.len() == 1 && rows_before == merged.num_rows() {
            report.files_after += 1;
            continue;
        }
        let key = format!("{folder}/part-{writer}.parquet");
        staged.stage(out, key, merged.num_rows(), parquet_bytes(&merged)?).await?;
        replaced.extend(keys.iter().cloned());
        report.files_after += 1;
    }
    report.studies = seen.len();

    if let Some(merged) =
        merge_flat(out, "quarantine", &writer, &mut staged, &mut replaced, &mut report, Some(&seen))
            .await?
    {
        report.quarantine_rows = merged.num_rows();
        let site = column::<StringArray>(&merged, "site_id")?;
        for row in 0..merged.num_rows() {
            let [code, name, province] =
                quarantine_region(sites, site.is_valid(row).then(|| site.value(row)));
            regions
                .entry(code.clone())
                .or_insert_with(|| RegionCounts {
                    region_code: code,
                    region_name: name,
                    province,
                    ..Default::default()
                })
                .quarantined += 1;
        }
    }
    merge_flat(out, "ignored", &writer, &mut staged, &mut replaced, &mut report, None).await?;
    report.screened = seen;

    if !replaced.is_empty() {
        // The commits whose files are all replaced go; their ids move to this one.
        let replaced_set: BTreeSet<&String> = replaced.iter().collect();
        let superseded: Vec<&CommitManifest> = manifests
            .iter()
            .filter(|m| m.files.iter().all(|f| replaced_set.contains(&f.key)))
            .collect();
        let ids = CommitIds {
            study_keys: superseded.iter().flat_map(|m| m.study_keys.iter().cloned()).collect(),
            quarantine_ids: superseded
                .iter()
                .flat_map(|m| m.quarantine_ids.iter().cloned())
                .collect(),
            ignored_ids: superseded.iter().flat_map(|m| m.ignored_ids.iter().cloned()).collect(),
        };
        let (manifest, published) = staged.commit(out, ids, replaced).await?;
        if !published {
            commit::publish(out, &manifest).await?;
        }
        for old in superseded {
            out.delete_if_present(&old.key())
                .await
                .map_err(|source| AggregateError::Write { key: old.key(), source })?;
        }
    }

    report.regions = regions.into_values().collect();
    report.flagged = worklist.len();
    let summary = tables::summary_batch(&report.regions, campaign)
        .map_err(|e| AggregateError::Table(e.to_string()))?;
    put(out, "summary/summary.parquet", parquet_bytes(&summary)?).await?;
    let worklist =
        tables::worklist_batch(&worklist).map_err(|e| AggregateError::Table(e.to_string()))?;
    put(out, "worklist/worklist.parquet", parquet_bytes(&worklist)?).await?;
    info!(
        files_before = report.files_before,
        files_after = report.files_after,
        studies = report.studies,
        duplicates = report.duplicates_dropped,
        "compacted"
    );
    Ok(report)
}

/// One quarantine row, as `panscreen requeue` needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedInput {
    pub stage: String,
    pub input: String,
    pub inputs: Vec<String>,
    pub study_key: Option<String>,
    pub reason: String,
    /// How many times it was requeued before (0: its first outcome).
    pub generation: u32,
}

/// The quarantine rows of `out` that are final outcomes now (what `compact` keeps).
pub async fn final_quarantine(out: &Store) -> Result<Vec<QuarantinedInput>, AggregateError> {
    let mut screened = HashSet::new();
    for key in parquet_keys(out, "results").await? {
        for batch in read_parquet(out, &key).await? {
            screened.extend(
                column::<StringArray>(&batch, "study_key")?.iter().flatten().map(str::to_string),
            );
        }
    }
    let mut batches = Vec::new();
    for key in parquet_keys(out, "quarantine").await? {
        batches.extend(read_parquet(out, &key).await?);
    }
    let Some(merged) = concat(&batches)? else { return Ok(Vec::new()) };
    let kept = final_quarantine_rows(&merged, &screened)?;
    let text = |name| column::<StringArray>(&kept, name);
    let (stage, input, study, reason) =
        (text("stage")?, text("input")?, text("study_key")?, text("reason")?);
    let inputs = column::<arrow::array::ListArray>(&kept, "inputs")?;
    let generation = column::<arrow::array::Int32Array>(&kept, "generation")?;
    let mut rows = Vec::with_capacity(kept.num_rows());
    for row in 0..kept.num_rows() {
        let keys = inputs.value(row);
        let keys = keys
            .as_any()
            .downcast_ref::<StringArray>()
            .map(|k| k.iter().flatten().map(str::to_string).collect());
        rows.push(QuarantinedInput {
            stage: stage.value(row).to_string(),
            input: input.value(row).to_string(),
            inputs: keys.unwrap_or_default(),
            study_key: study.is_valid(row).then(|| study.value(row).to_string()),
            reason: reason.value(row).to_string(),
            generation: if generation.is_valid(row) {
                generation.value(row).max(0) as u32
            } else {
                0
            },
        });
    }
    Ok(rows)
}

/// The quarantine rows that are a final outcome: none for a study in the results (it was
/// requeued and screened), and of several rows for one study or object (requeued and
/// quarantined again) only the latest.
fn final_quarantine_rows(
    batch: &RecordBatch,
    screened: &HashSet<String>,
) -> Result<RecordBatch, AggregateError> {
    let study = column::<StringArray>(batch, "study_key")?;
    let input = column::<StringArray>(batch, "input")?;
    let at = column::<TimestampMicrosecondArray>(batch, "at")?;
    let mut latest: HashMap<(bool, &str), usize> = HashMap::new();
    for row in 0..batch.num_rows() {
        let identity =
            if study.is_valid(row) { (true, study.value(row)) } else { (false, input.value(row)) };
        if identity.0 && screened.contains(identity.1) {
            continue;
        }
        let kept = latest.entry(identity).or_insert(row);
        if at.value(row) >= at.value(*kept) {
            *kept = row;
        }
    }
    let kept: HashSet<usize> = latest.into_values().collect();
    let keep: BooleanArray = (0..batch.num_rows()).map(|row| Some(kept.contains(&row))).collect();
    arrow::compute::filter_record_batch(batch, &keep)
        .map_err(|e| AggregateError::Table(e.to_string()))
}

/// Merges the files of an unpartitioned table into one (when there is more than one, or
/// when rows go: for quarantine, `screened` names the studies in the results, and only
/// final outcomes stay).
async fn merge_flat(
    out: &Store,
    table: &str,
    writer: &str,
    staged: &mut Staged,
    replaced: &mut Vec<String>,
    report: &mut CompactReport,
    screened: Option<&HashSet<String>>,
) -> Result<Option<RecordBatch>, AggregateError> {
    let keys = parquet_keys(out, table).await?;
    report.files_before += keys.len();
    let mut batches = Vec::new();
    for key in &keys {
        batches.extend(read_parquet(out, key).await?);
    }
    let merged = match (concat(&batches)?, screened) {
        (Some(merged), Some(screened)) => Some(final_quarantine_rows(&merged, screened)?),
        (merged, _) => merged,
    };
    let rows_before: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if let Some(merged) = &merged {
        report.files_after += 1;
        if keys.len() > 1 || merged.num_rows() != rows_before {
            staged
                .stage(
                    out,
                    format!("{table}/part-{writer}.parquet"),
                    merged.num_rows(),
                    parquet_bytes(merged)?,
                )
                .await?;
            replaced.extend(keys);
        }
    }
    Ok(merged)
}

async fn put(out: &Store, key: &str, bytes: Bytes) -> Result<(), AggregateError> {
    out.put(key, bytes)
        .await
        .map_err(|source| AggregateError::Write { key: key.to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use panscreen_shared::contracts::{QuarantineRecord, Stage};

    fn record(input: &str, study: Option<&str>, reason: &str, seconds: i64) -> QuarantineRecord {
        QuarantineRecord {
            campaign: "c".into(),
            stage: Stage::Preprocess,
            input: input.into(),
            inputs: vec![input.into()],
            study_key: study.map(str::to_string),
            site_id: None,
            reason: reason.into(),
            detail: String::new(),
            attempts: 1,
            at: OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds).unwrap(),
            generation: 0,
        }
    }

    #[test]
    fn a_requeued_study_keeps_only_its_final_outcome() {
        let rows = [
            record("s1", Some("s1"), "gave up after 5 attempts: object store error", 0),
            record("s2", Some("s2"), "cannot decode a slice", 0),
            record("s2", Some("s2"), "the decoder failed on this file", 60),
            record("a/x.txt", None, "not a DICOM file", 0),
            record("a/x.txt", None, "not a DICOM file", 30),
            record("b/y.txt", None, "not a DICOM file", 0),
        ];
        let batch = tables::quarantine_batch(&rows).unwrap();
        let screened: HashSet<String> = ["s1".to_string()].into();
        let kept = final_quarantine_rows(&batch, &screened).unwrap();
        let reasons = column::<StringArray>(&kept, "reason").unwrap();
        let inputs = column::<StringArray>(&kept, "input").unwrap();
        let mut left: Vec<(&str, &str)> =
            (0..kept.num_rows()).map(|r| (inputs.value(r), reasons.value(r))).collect();
        left.sort();
        // s1 was screened after its requeue; s2 failed again (the later row stays); the
        // requeued object keeps its later row; the other object is untouched.
        assert_eq!(
            left,
            [
                ("a/x.txt", "not a DICOM file"),
                ("b/y.txt", "not a DICOM file"),
                ("s2", "the decoder failed on this file")
            ]
        );
        let at = column::<TimestampMicrosecondArray>(&kept, "at").unwrap();
        let x = (0..kept.num_rows()).find(|r| inputs.value(*r) == "a/x.txt").unwrap();
        assert_eq!(at.value(x), (1_800_000_030) * 1_000_000);
    }

    /// A quarantine file written before `inputs` and `generation` existed is read with
    /// today's: by compaction and by requeue, its missing columns as nulls.
    #[tokio::test]
    async fn quarantine_files_of_an_earlier_version_are_read_with_todays() {
        let directory = tempfile::tempdir().unwrap();
        let out = Store::open(
            directory.path().to_str().unwrap(),
            panscreen_shared::store::OpenMode::Existing,
        )
        .unwrap();
        let old = tables::quarantine_batch(&[record(
            "a/old.dcm",
            Some("s-old"),
            "cannot decode a slice",
            0,
        )])
        .unwrap();
        let keep: Vec<usize> = (0..old.num_columns())
            .filter(|i| !["inputs", "generation"].contains(&old.schema().field(*i).name().as_str()))
            .collect();
        let old = old.project(&keep).unwrap();
        let mut new = record("b/new.dcm", Some("s-new"), "cannot decode a slice", 10);
        new.generation = 2;
        put(&out, "quarantine/a-old.parquet", parquet_bytes(&old).unwrap()).await.unwrap();
        put(
            &out,
            "quarantine/b-new.parquet",
            parquet_bytes(&tables::quarantine_batch(&[new]).unwrap()).unwrap(),
        )
        .await
        .unwrap();
        let mut rows = final_quarantine(&out).await.unwrap();
        rows.sort_by(|a, b| a.input.cmp(&b.input));
        let seen: Vec<(&str, usize, u32)> =
            rows.iter().map(|r| (r.input.as_str(), r.inputs.len(), r.generation)).collect();
        assert_eq!(seen, [("a/old.dcm", 0, 0), ("b/new.dcm", 1, 2)]);
    }
}
