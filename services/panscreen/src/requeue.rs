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
//! A row of ingest or preprocess lists its objects (`inputs`); a row of infer or
//! aggregate knows its study only by pseudonym, and ingest's ledger names that study's
//! objects (as keyed hashes), so the request carries those. A study the ledger does not
//! name (decided before the ledger kept studies' objects) is reported as not requeueable.
//!
//! The embedded run has the same in `panscreen run --requeue` ([`redo`]): it screens the
//! selected rows' studies and objects again into the same OUT, then compacts it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use bytes::Bytes;
use panscreen_aggregate::compact::{final_quarantine, QuarantinedInput};
use panscreen_ingest::watch::{objects_of_studies, RequeueRequest, REQUEUE};
use panscreen_ingest::Redo;
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
    /// Rows that list no objects and whose study the ledger does not name, by (stage, reason).
    pub not_requeueable: BTreeMap<(String, String), usize>,
}

impl RequeueReport {
    /// The rows selected, by stage and reason, one line each.
    fn selected_lines(&self) -> String {
        self.selected
            .iter()
            .map(|((stage, reason), rows)| format!("{rows:>7}  {stage:<10} {reason}\n"))
            .collect()
    }

    /// What `panscreen requeue` did (or would do) to a campaign.
    pub fn render(&self, dry_run: bool) -> String {
        let mut text = self.selected_lines();
        let verb = if dry_run { "would requeue" } else { "requeued" };
        text.push_str(&format!(
            "{verb} {} quarantine rows ({} objects); ingest decides them again at its next pass\n",
            self.rows_requeued, self.objects_requeued
        ));
        for ((stage, reason), rows) in &self.not_requeueable {
            text.push_str(&format!(
                "{rows} {stage} rows ({reason}) cannot be requeued: they list no objects and ingest's ledger does \
                 not name their study's (decided by an earlier version); submit their files again under a new prefix\n"
            ));
        }
        text
    }

    /// What `panscreen run --requeue` screens (or would screen) again.
    pub fn render_embedded(&self, dry_run: bool) -> String {
        let verb = if dry_run { "would screen again" } else { "screening again" };
        format!(
            "{}{verb} {} quarantine rows ({} objects named)\n",
            self.selected_lines(),
            self.rows_requeued,
            self.objects_requeued
        )
    }
}

/// The final quarantine rows of the tables in `out` that `selection` picks.
async fn selected_rows(
    out: &Store,
    selection: &Selection,
) -> anyhow::Result<Vec<QuarantinedInput>> {
    let rows = final_quarantine(out).await.context("reading the quarantine table")?;
    Ok(rows.into_iter().filter(|row| selection.matches(row)).collect())
}

/// Requeues the selected final quarantine rows of a campaign (`campaign_root` is
/// `campaigns/<campaign>` in the store).
pub async fn requeue(
    campaign_root: &Store,
    selection: &Selection,
    dry_run: bool,
) -> anyhow::Result<RequeueReport> {
    let rows = selected_rows(&campaign_root.sub("out"), selection).await?;
    let state = campaign_root.sub("ingest");
    let keyless: BTreeSet<String> = rows
        .iter()
        .filter(|row| row.inputs.is_empty())
        .filter_map(|row| row.study_key.clone())
        .collect();
    let ledger = objects_of_studies(&state, &keyless).await.context("reading ingest's ledger")?;
    let mut report = RequeueReport::default();
    let (mut objects, mut object_ids, mut studies) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for row in rows {
        let label = (row.stage.clone(), row.reason.clone());
        *report.selected.entry(label.clone()).or_default() += 1;
        let from_ledger = row.study_key.as_ref().and_then(|study| ledger.get(study));
        match (row.inputs.is_empty(), from_ledger) {
            (false, _) => objects.extend(row.inputs),
            (true, Some(ids)) => object_ids.extend(ids.iter().cloned()),
            (true, None) => {
                *report.not_requeueable.entry(label).or_default() += 1;
                continue;
            }
        }
        report.rows_requeued += 1;
        studies.extend(row.study_key);
    }
    report.objects_requeued = objects.len() + object_ids.len();
    if dry_run || report.objects_requeued == 0 {
        return Ok(report);
    }
    let request = RequeueRequest {
        objects: objects.into_iter().collect(),
        studies: studies.into_iter().collect(),
        object_ids: object_ids.into_iter().collect(),
    };
    let key =
        format!("{REQUEUE}/{:024}.json", time::OffsetDateTime::now_utc().unix_timestamp_nanos());
    state
        .put(&key, Bytes::from(serde_json::to_vec(&request)?))
        .await
        .context("writing the requeue request")?;
    Ok(report)
}

/// What an embedded run screens again for the selected rows of the tables in `out`:
/// their objects and studies, each one generation up.
pub async fn redo(out: &Store, selection: &Selection) -> anyhow::Result<(Redo, RequeueReport)> {
    let mut report = RequeueReport::default();
    let mut redo = Redo::default();
    for row in selected_rows(out, selection).await? {
        *report.selected.entry((row.stage.clone(), row.reason.clone())).or_default() += 1;
        report.rows_requeued += 1;
        let generation = row.generation + 1;
        for key in row.inputs {
            let known = redo.objects.entry(key).or_default();
            *known = (*known).max(generation);
        }
        if let Some(study) = row.study_key {
            let known = redo.studies.entry(study).or_default();
            *known = (*known).max(generation);
        }
    }
    report.objects_requeued = redo.objects.len();
    Ok((redo, report))
}
