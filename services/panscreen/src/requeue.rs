//! `panscreen requeue`: sends quarantined inputs through the pipeline again, after the
//! cause is fixed (a decoder bug, a replaced file, a rule changed).
//!
//! It reads the campaign's committed quarantine rows that are still final outcomes,
//! keeps those matching `--reason` and `--stage`, and asks ingest (a request under
//! `campaigns/<campaign>/ingest/requeue/`) to decide their objects again. Ingest forgets
//! those objects and studies in its ledger and raises their generation, which goes into
//! every message id of the new pass (so JetStream does not drop them as repeats) and into
//! the new quarantine rows. Afterwards each study has one final outcome: its result, or
//! its latest quarantine row; `compact` keeps only that (`final_quarantine_rows`).
//!
//! A row can be requeued when it lists its objects (`inputs`): ingest and preprocess
//! rows do; a row written by infer or aggregate knows its study only by pseudonym, and
//! is reported as not requeueable.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use bytes::Bytes;
use panscreen_aggregate::compact::{final_quarantine, QuarantinedInput};
use panscreen_ingest::watch::{RequeueRequest, REQUEUE};
use panscreen_shared::store::Store;

/// Which quarantine rows to requeue.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Rows whose reason contains this text (all when absent).
    pub reason: Option<String>,
    /// Rows of this stage (all when absent).
    pub stage: Option<String>,
}

impl Selection {
    fn matches(&self, row: &QuarantinedInput) -> bool {
        self.reason.as_ref().is_none_or(|text| row.reason.contains(text.as_str()))
            && self.stage.as_ref().is_none_or(|stage| row.stage == *stage)
    }
}

/// What a requeue did (or, dry, would do).
#[derive(Debug, Default)]
pub struct RequeueReport {
    /// Rows selected, by (stage, reason).
    pub selected: BTreeMap<(String, String), usize>,
    pub rows_requeued: usize,
    pub objects_requeued: usize,
    /// Rows that list no objects (infer and aggregate rows), by (stage, reason).
    pub not_requeueable: BTreeMap<(String, String), usize>,
}

impl RequeueReport {
    pub fn render(&self, dry_run: bool) -> String {
        let mut text = String::new();
        for ((stage, reason), rows) in &self.selected {
            text.push_str(&format!("{rows:>7}  {stage:<10} {reason}\n"));
        }
        let verb = if dry_run { "would requeue" } else { "requeued" };
        text.push_str(&format!(
            "{verb} {} quarantine rows ({} objects); ingest decides them again at its next pass\n",
            self.rows_requeued, self.objects_requeued
        ));
        for ((stage, reason), rows) in &self.not_requeueable {
            text.push_str(&format!(
                "{rows} {stage} rows ({reason}) list no objects and cannot be requeued; their files must be \
                 submitted again under a new prefix\n"
            ));
        }
        text
    }
}

/// Requeues the selected final quarantine rows of a campaign (`campaign_root` is
/// `campaigns/<campaign>` in the store).
pub async fn requeue(campaign_root: &Store, selection: &Selection, dry_run: bool) -> anyhow::Result<RequeueReport> {
    let rows = final_quarantine(&campaign_root.sub("out")).await.context("reading the quarantine table")?;
    let mut report = RequeueReport::default();
    let (mut objects, mut studies) = (BTreeSet::new(), BTreeSet::new());
    for row in rows.into_iter().filter(|row| selection.matches(row)) {
        let label = (row.stage.clone(), row.reason.clone());
        *report.selected.entry(label.clone()).or_default() += 1;
        if row.inputs.is_empty() {
            *report.not_requeueable.entry(label).or_default() += 1;
            continue;
        }
        report.rows_requeued += 1;
        objects.extend(row.inputs);
        studies.extend(row.study_key);
    }
    report.objects_requeued = objects.len();
    if dry_run || objects.is_empty() {
        return Ok(report);
    }
    let request = RequeueRequest { objects: objects.into_iter().collect(), studies: studies.into_iter().collect() };
    let key = format!("{REQUEUE}/{:024}.json", time::OffsetDateTime::now_utc().unix_timestamp_nanos());
    campaign_root
        .sub("ingest")
        .put(&key, Bytes::from(serde_json::to_vec(&request)?))
        .await
        .context("writing the requeue request")?;
    Ok(report)
}
