//! aggregate: writes what the pipeline found as Parquet for epidemiologists, and the
//! recall worklist for hospitals.
//!
//! - [`tables`]: the tables and their columns.
//! - [`Aggregator`]: consumes scored studies and quarantine records, drops
//!   duplicates (by study key), and flushes Parquet files by row count or age. A
//!   message is acked only after the file holding it is committed ([`commit`]).
//! - [`compact`]: merges small files, drops duplicates, and writes the summary and
//!   worklist from everything committed (`panscreen compact`).
//! - [`service`]: the stage as it runs, for `panscreen serve aggregate` and `run`;
//!   [`config`]: its settings; [`error`]: what can go wrong writing the tables.
//!
//! Why aggregate is not a [`panscreen_shared::worker::Handler`]: a handler settles each
//! message when its outcome is published, one batch at a time. Aggregate must hold
//! messages from three subjects across many deliveries until the Parquet file holding
//! them is committed (a flush by row count or age), settle a redelivered copy together
//! with the original, and keep holding everything through a store outage. That is its
//! own loop ([`Aggregator::run`]); it shares the worker's envelope reading, attempt
//! counting and quarantine records ([`panscreen_shared::worker::Envelope`]).

pub mod commit;
pub mod compact;
pub mod config;
pub mod error;
pub mod service;
pub mod tables;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use panscreen_shared::contracts::{
    subjects, topology, IgnoredInputs, QuarantineRecord, Stage, StudyScored,
};
use panscreen_shared::metrics::Readiness;
use panscreen_shared::queue::{Delivery, Queue};
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::Store;
use panscreen_shared::worker::{Envelope, StageCounters};
use panscreen_shared::SOFTWARE_VERSION;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use time::OffsetDateTime;
use tracing::{info, warn};

pub use crate::config::AggregateConfig;
pub use crate::error::AggregateError;
use crate::tables::RegionCounts;

/// Encodes a record batch as a Parquet file (Snappy).
pub fn parquet_bytes(batch: &RecordBatch) -> Result<Bytes, AggregateError> {
    let properties = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, batch.schema(), Some(properties))
        .map_err(|error| AggregateError::Table(error.to_string()))?;
    writer.write(batch).map_err(|error| AggregateError::Table(error.to_string()))?;
    writer.close().map_err(|error| AggregateError::Table(error.to_string()))?;
    Ok(Bytes::from(buffer))
}

/// Hive-style partition value: keeps letters, digits, '-' and '_'.
fn partition_value(value: &str) -> String {
    let cleaned: String = value
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if cleaned.is_empty() {
        "unknown".to_string()
    } else {
        cleaned
    }
}

/// The region a quarantine record counts under: its site's, or "unknown".
pub fn quarantine_region(sites: &SiteRegistry, site_id: Option<&str>) -> [String; 3] {
    match site_id.and_then(|id| sites.sites.iter().find(|s| s.id == id)) {
        Some(site) => [site.region_code.clone(), site.region_name.clone(), site.province.clone()],
        None => ["unknown".to_string(), "unknown".to_string(), "unknown".to_string()],
    }
}

/// What the aggregator wrote.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AggregateReport {
    pub results_written: usize,
    pub quarantine_written: usize,
    pub ignored_written: usize,
    pub duplicates_dropped: usize,
    pub files_written: Vec<String>,
    pub regions: Vec<RegionCounts>,
    pub flagged: usize,
}

/// A message waiting for the next flush.
enum Pending {
    /// Boxed: a scored study is three times the size of the other two.
    Result(Box<StudyScored>),
    Quarantine(QuarantineRecord),
    Ignored(IgnoredInputs),
}

impl Pending {
    /// What duplicates are recognised by: the study key, or the message id.
    fn id(&self) -> String {
        match self {
            Pending::Result(scored) => scored.context.study_key.clone(),
            Pending::Quarantine(record) => record.message_id(),
            Pending::Ignored(ignored) => ignored.message_id(),
        }
    }

    /// A quarantine record of a study whose result is among `ids` (written or held): a
    /// stale redelivery (JetStream is at least once: a nats-server crash can forget
    /// acks) whose work was already done. The result is the study's outcome.
    fn superseded_by(&self, ids: &HashSet<String>) -> bool {
        matches!(self, Pending::Quarantine(record) if record.study_key.as_ref().is_some_and(|k| ids.contains(k)))
    }
}

#[derive(Debug, Clone, Copy)]
enum PendingKind {
    Result,
    Quarantine,
    Ignored,
}

impl PendingKind {
    fn noun(self) -> &'static str {
        match self {
            PendingKind::Result => "scored-study",
            PendingKind::Quarantine => "quarantine",
            PendingKind::Ignored => "ignored-inputs",
        }
    }
}

/// Runs `work`, sending in-progress acks for every held delivery meanwhile.
async fn while_holding<F: Future>(held: &[Held], every: Duration, work: F) -> F::Output {
    let every = every.max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = ticker.tick() => {
                for delivery in held.iter().flat_map(|held| &held.deliveries) {
                    if let Err(error) = delivery.progress().await {
                        warn!(%error, "in-progress ack failed");
                    }
                }
            }
        }
    }
}

/// The readiness blocker while flushes fail.
const STORE_FAILING: &str = "writing to the store fails";

/// A message waiting for the next flush, with every delivery of it this aggregate holds
/// (a redelivered copy is settled with the original, never before it is written).
struct Held {
    deliveries: Vec<Delivery>,
    pending: Pending,
}

pub struct Aggregator {
    config: AggregateConfig,
    out: Store,
    sites: SiteRegistry,
    pending: Vec<Held>,
    /// Consecutive failed flushes, and when the next may be tried.
    failed_flushes: u32,
    retry_at: Option<tokio::time::Instant>,
    readiness: Option<Arc<Readiness>>,
    /// Ids ([`Pending::id`]) written by any writer or pending here.
    seen: HashSet<String>,
    /// Commit manifests already read.
    commits_read: BTreeSet<String>,
    regions: BTreeMap<String, RegionCounts>,
    flagged: Vec<StudyScored>,
    sequence: u64,
    report: AggregateReport,
    counters: Arc<StageCounters>,
}

impl Aggregator {
    pub fn new(
        config: AggregateConfig,
        out: Store,
        sites: SiteRegistry,
        counters: Arc<StageCounters>,
    ) -> Self {
        Aggregator {
            config,
            out,
            sites,
            pending: Vec::new(),
            failed_flushes: 0,
            retry_at: None,
            readiness: None,
            seen: HashSet::new(),
            commits_read: BTreeSet::new(),
            regions: BTreeMap::new(),
            flagged: Vec::new(),
            sequence: 0,
            report: AggregateReport::default(),
            counters,
        }
    }

    /// Reports readiness false while flushes fail.
    pub fn with_readiness(mut self, readiness: Arc<Readiness>) -> Self {
        self.readiness = Some(readiness);
        self
    }

    /// Takes a delivery for the next flush. An unreadable message, or one delivered past
    /// `max_deliver`, becomes a quarantine record (written like any other, so nothing
    /// is dropped without a row); a copy of a message already committed is acked; a copy
    /// of one still waiting here is held with it.
    async fn accept(&mut self, delivery: Delivery, kind: PendingKind) {
        let payload = &delivery.payload;
        let parsed = match kind {
            PendingKind::Result => {
                serde_json::from_slice(payload).map(|scored| Pending::Result(Box::new(scored)))
            }
            PendingKind::Quarantine => serde_json::from_slice(payload).map(Pending::Quarantine),
            PendingKind::Ignored => serde_json::from_slice(payload).map(Pending::Ignored),
        };
        let envelope = Envelope::peek(payload);
        let pending = match parsed {
            Err(error) => {
                warn!(?kind, study = %envelope.study_key.as_deref().unwrap_or("-"), "unreadable message, quarantined");
                Pending::Quarantine(envelope.quarantine_record(
                    &self.config.campaign,
                    Stage::Aggregate,
                    format!("unreadable {} message", kind.noun()),
                    error.to_string(),
                    delivery.attempt,
                ))
            }
            Ok(_) if delivery.attempt > self.config.max_deliver => {
                let attempts = delivery.attempt - 1;
                warn!(?kind, study = %envelope.study_key.as_deref().unwrap_or("-"), attempts, "delivered past the limit, quarantined");
                Pending::Quarantine(envelope.quarantine_record(
                    &self.config.campaign,
                    Stage::Aggregate,
                    format!("gave up after {attempts} attempts: no aggregate finished writing it"),
                    format!(
                        "a {} message delivered past max_deliver without ever being settled",
                        kind.noun()
                    ),
                    delivery.attempt,
                ))
            }
            Ok(pending) => pending,
        };
        if pending.superseded_by(&self.seen) {
            info!("a quarantine record of a study already screened; dropped");
            self.report.duplicates_dropped += 1;
            if let Err(error) = delivery.ack().await {
                warn!(%error, "acking a superseded record failed; it comes back and is dropped again");
            }
            return;
        }
        let id = pending.id();
        if let Some(held) = self.pending.iter_mut().find(|held| held.pending.id() == id) {
            held.deliveries.push(delivery);
            return;
        }
        if !self.seen.insert(id) {
            self.report.duplicates_dropped += 1;
            if let Err(error) = delivery.ack().await {
                warn!(%error, "acking a duplicate failed; it comes back and is dropped again");
            }
            return;
        }
        self.pending.push(Held { deliveries: vec![delivery], pending });
    }

    async fn put(&mut self, key: String, batch: RecordBatch) -> Result<(), AggregateError> {
        let bytes = parquet_bytes(&batch)?;
        self.out
            .put(&key, bytes)
            .await
            .map_err(|source| AggregateError::Write { key: key.clone(), source })?;
        self.report.files_written.push(key);
        Ok(())
    }

    /// Reads the commits other writers (or this writer's earlier life) made since the
    /// last look, finishing any left unpublished. Returns the ids they hold and how
    /// many of those are study keys.
    async fn read_new_commits(&mut self) -> Result<(HashSet<String>, usize), AggregateError> {
        let manifests = commit::read_commits(&self.out, &self.commits_read).await?;
        commit::roll_forward(&self.out, &manifests).await?;
        let (mut ids, mut studies) = (HashSet::new(), 0);
        for manifest in manifests {
            self.commits_read.insert(manifest.key());
            studies += manifest.study_keys.len();
            ids.extend(
                manifest
                    .study_keys
                    .into_iter()
                    .chain(manifest.quarantine_ids)
                    .chain(manifest.ignored_ids),
            );
        }
        Ok((ids, studies))
    }

    /// Drops from `held` what another writer committed meanwhile; acks it.
    async fn drop_committed_elsewhere(
        &mut self,
        held: &mut Vec<Held>,
    ) -> Result<(), AggregateError> {
        let (committed, _) =
            while_holding(held, self.config.progress_every, self.read_new_commits()).await?;
        self.seen.extend(committed.iter().cloned());
        // Also a quarantine record of a study whose result came in meanwhile.
        let seen = &self.seen;
        let (duplicates, keep): (Vec<_>, Vec<_>) =
            std::mem::take(held).into_iter().partition(|held| {
                committed.contains(&held.pending.id()) || held.pending.superseded_by(seen)
            });
        *held = keep;
        if !duplicates.is_empty() {
            info!(
                dropped = duplicates.len(),
                "already committed, or superseded by a study's result; dropped"
            );
            self.report.duplicates_dropped += duplicates.len();
        }
        for delivery in duplicates.into_iter().flat_map(|held| held.deliveries) {
            let _ = delivery.ack().await;
        }
        Ok(())
    }

    async fn write_pending(&mut self, held: &[Held]) -> Result<(), AggregateError> {
        let now = OffsetDateTime::now_utc();
        let (mut results, mut quarantine, mut ignored) = (Vec::new(), Vec::new(), Vec::new());
        for held in held {
            match &held.pending {
                Pending::Result(scored) => results.push(scored.as_ref()),
                Pending::Quarantine(record) => quarantine.push(record.clone()),
                Pending::Ignored(chunk) => ignored.push(chunk),
            }
        }
        let mut partitions: BTreeMap<(String, String), Vec<StudyScored>> = BTreeMap::new();
        for row in &results {
            let key = (
                partition_value(&row.context.region_code),
                partition_value(row.context.scan_month()),
            );
            partitions.entry(key).or_default().push((*row).clone());
        }
        self.sequence += 1;
        let mut staged = commit::Staged::new(&self.config.writer_id, self.sequence);
        for ((region, month), rows) in partitions {
            let batch = tables::results_batch(&rows, SOFTWARE_VERSION, now)
                .map_err(|e| AggregateError::Table(e.to_string()))?;
            let key = format!(
                "results/region_code={region}/scan_month={month}/part-{}-{:05}.parquet",
                self.config.writer_id, self.sequence
            );
            staged.stage(&self.out, key, rows.len(), parquet_bytes(&batch)?).await?;
        }
        if !quarantine.is_empty() {
            let batch = tables::quarantine_batch(&quarantine)
                .map_err(|e| AggregateError::Table(e.to_string()))?;
            let key =
                format!("quarantine/part-{}-{:05}.parquet", self.config.writer_id, self.sequence);
            staged.stage(&self.out, key, quarantine.len(), parquet_bytes(&batch)?).await?;
        }
        if !ignored.is_empty() {
            let rows: Vec<_> =
                ignored.iter().flat_map(|chunk| chunk.inputs.iter().cloned()).collect();
            let batch =
                tables::ignored_batch(&rows).map_err(|e| AggregateError::Table(e.to_string()))?;
            let key =
                format!("ignored/part-{}-{:05}.parquet", self.config.writer_id, self.sequence);
            staged.stage(&self.out, key, rows.len(), parquet_bytes(&batch)?).await?;
        }
        let ids = commit::CommitIds {
            study_keys: results.iter().map(|r| r.context.study_key.clone()).collect(),
            quarantine_ids: quarantine.iter().map(QuarantineRecord::message_id).collect(),
            ignored_ids: ignored.iter().map(|chunk| chunk.message_id()).collect(),
        };
        let (manifest, _published) = staged.commit(&self.out, ids, Vec::new()).await?;
        self.commits_read.insert(manifest.key());
        self.report.files_written.extend(manifest.files.into_iter().map(|f| f.key));
        Ok(())
    }

    fn region_entry(&mut self, code: &str, name: &str, province: &str) -> &mut RegionCounts {
        self.regions.entry(code.to_string()).or_insert_with(|| RegionCounts {
            region_code: code.to_string(),
            region_name: name.to_string(),
            province: province.to_string(),
            ..RegionCounts::default()
        })
    }

    /// Writes what is pending, then acks it. When the write fails (the store is down),
    /// everything stays held, with in-progress acks, for the next attempt: an outage
    /// spends none of a message's delivery attempts.
    pub async fn flush(&mut self) -> Result<(), AggregateError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // The held messages get in-progress acks while the store is slow to answer.
        let mut held = std::mem::take(&mut self.pending);
        let written = match self.drop_committed_elsewhere(&mut held).await {
            Ok(()) if held.is_empty() => return Ok(()),
            Ok(()) => {
                let every = self.config.progress_every;
                let write = self.write_pending(&held);
                while_holding(&held, every, write).await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = written {
            self.pending = held;
            self.failed_flushes += 1;
            let backoff = &self.config.retry_backoff;
            let pause = backoff
                .get((self.failed_flushes as usize - 1).min(backoff.len().saturating_sub(1)))
                .copied()
                .unwrap_or(Duration::from_secs(1));
            self.retry_at = Some(tokio::time::Instant::now() + pause);
            if let Some(readiness) = &self.readiness {
                readiness.block(STORE_FAILING, true);
            }
            warn!(%error, held = self.pending.len(), retry_in_s = pause.as_secs_f64(), "writing Parquet failed; messages held for the next attempt");
            return Err(error);
        }
        if self.failed_flushes > 0 {
            info!(failed_flushes = self.failed_flushes, "writing works again");
            if let Some(readiness) = &self.readiness {
                readiness.block(STORE_FAILING, false);
            }
        }
        self.failed_flushes = 0;
        self.retry_at = None;
        for Held { deliveries, pending } in held {
            match pending {
                Pending::Result(row) => {
                    let region = self.region_entry(
                        &row.context.region_code,
                        &row.context.region_name,
                        &row.context.province,
                    );
                    region.screened += 1;
                    region.flagged += i64::from(row.prediction.flagged);
                    region.not_assessable += i64::from(!row.prediction.assessable);
                    self.report.results_written += 1;
                    if row.prediction.flagged {
                        self.flagged.push(*row);
                    }
                    self.counters.processed.fetch_add(1, Ordering::Relaxed);
                }
                Pending::Quarantine(record) => {
                    let [code, name, province] =
                        quarantine_region(&self.sites, record.site_id.as_deref());
                    self.region_entry(&code, &name, &province).quarantined += 1;
                    self.report.quarantine_written += 1;
                    self.counters.quarantined.fetch_add(1, Ordering::Relaxed);
                }
                Pending::Ignored(chunk) => self.report.ignored_written += chunk.inputs.len(),
            }
            for delivery in deliveries {
                if let Err(error) = delivery.ack().await {
                    warn!(%error, "ack failed after a durable write; the duplicate will be dropped on redelivery");
                }
            }
        }
        info!(sequence = self.sequence, "flushed");
        Ok(())
    }

    /// Whether a flush may be tried now (not while waiting out a failed one).
    fn may_flush(&self) -> bool {
        self.retry_at.is_none_or(|at| tokio::time::Instant::now() >= at)
    }

    /// Keeps every held message from being handed out again while it waits.
    async fn keep_held(&self) {
        for delivery in self.pending.iter().flat_map(|held| &held.deliveries) {
            if let Err(error) = delivery.progress().await {
                warn!(%error, "in-progress ack failed");
            }
        }
    }

    /// Flushes, trying again through a store outage until `deadline`; what is still not
    /// written then is handed back to the queue for another aggregate (or a later run).
    async fn flush_until(&mut self, deadline: tokio::time::Instant) -> Result<(), AggregateError> {
        loop {
            match self.flush().await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    let retry_at = self.retry_at.unwrap_or_else(tokio::time::Instant::now);
                    if retry_at >= deadline {
                        for delivery in std::mem::take(&mut self.pending)
                            .into_iter()
                            .flat_map(|held| held.deliveries)
                        {
                            let _ = delivery.nak(Duration::from_secs(1)).await;
                        }
                        return Err(error);
                    }
                    self.keep_held().await;
                    tokio::time::sleep_until(retry_at).await;
                }
            }
        }
    }

    /// Writes the regional summary and the recall worklist for everything flushed.
    pub async fn write_summary_and_worklist(&mut self) -> Result<(), AggregateError> {
        let regions: Vec<RegionCounts> = self.regions.values().cloned().collect();
        let summary = tables::summary_batch(&regions, &self.config.campaign)
            .map_err(|e| AggregateError::Table(e.to_string()))?;
        self.put("summary/summary.parquet".to_string(), summary).await?;
        let rows: Vec<tables::WorklistRow> =
            self.flagged.iter().map(tables::WorklistRow::from).collect();
        let worklist =
            tables::worklist_batch(&rows).map_err(|e| AggregateError::Table(e.to_string()))?;
        self.put("worklist/worklist.parquet".to_string(), worklist).await?;
        self.report.regions = regions;
        self.report.flagged = self.flagged.len();
        Ok(())
    }

    /// Finishes commits a stopped writer left unpublished and remembers every study
    /// already committed, so that a redelivered study is not written twice across
    /// restarts and replicas. Returns how many studies there were.
    pub async fn recover(&mut self) -> Result<usize, AggregateError> {
        let (committed, studies) = self.read_new_commits().await?;
        self.seen.extend(committed);
        Ok(studies)
    }

    pub fn report(&self) -> &AggregateReport {
        &self.report
    }

    /// Consumes scored studies and quarantine records until both subjects end or
    /// `shutdown` fires, flushing by size and age; then flushes the rest and writes the
    /// summary and worklist.
    pub async fn run(
        &mut self,
        queue: Arc<dyn Queue>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AggregateError> {
        self.run_until(queue, shutdown, std::future::pending()).await
    }

    /// [`Aggregator::run`], told by `producers_done` that every message it will get is
    /// already queued (an embedded run, once infer has ended). It then takes what is
    /// queued and writes it at once: the subjects cannot end while it holds messages, so
    /// otherwise the run would wait out the flush interval after its last study.
    pub async fn run_until(
        &mut self,
        queue: Arc<dyn Queue>,
        shutdown: impl Future<Output = ()>,
        producers_done: impl Future<Output = ()>,
    ) -> Result<(), AggregateError> {
        let consumer = &topology::consumer(Stage::Aggregate);
        let mut scored =
            queue.subscribe(&subjects::scored(&self.config.campaign), consumer).await?;
        let mut quarantine =
            queue.subscribe(&subjects::quarantine(&self.config.campaign), consumer).await?;
        let mut ignored =
            queue.subscribe(&subjects::ignored(&self.config.campaign), consumer).await?;
        let (mut scored_open, mut quarantine_open, mut ignored_open) = (true, true, true);
        let mut next_flush = tokio::time::Instant::now() + self.config.flush_interval;
        let every = self.config.progress_every.max(Duration::from_millis(100));
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // While the store fails, messages are still taken and held (with in-progress acks):
        // the queue bounds how many (JetStream's max_ack_pending), and a message left
        // unread in the client's buffer would be redelivered and spend an attempt.
        tokio::pin!(shutdown);
        tokio::pin!(producers_done);
        let (mut stopping, mut done) = (false, false);
        while scored_open || quarantine_open || ignored_open {
            tokio::select! {
                _ = &mut shutdown => { stopping = true; break }
                _ = &mut producers_done => { done = true; break }
                next = scored.next(), if scored_open => match next {
                    None => scored_open = false,
                    Some(Ok(delivery)) => self.accept(delivery, PendingKind::Result).await,
                    Some(Err(error)) => warn!(%error, "receiving scored studies failed"),
                },
                next = quarantine.next(), if quarantine_open => match next {
                    None => quarantine_open = false,
                    Some(Ok(delivery)) => self.accept(delivery, PendingKind::Quarantine).await,
                    Some(Err(error)) => warn!(%error, "receiving quarantine records failed"),
                },
                next = ignored.next(), if ignored_open => match next {
                    None => ignored_open = false,
                    Some(Ok(delivery)) => self.accept(delivery, PendingKind::Ignored).await,
                    Some(Err(error)) => warn!(%error, "receiving ignored inputs failed"),
                },
                _ = tokio::time::sleep_until(next_flush) => {
                    if self.may_flush() {
                        // A failure is logged and retried after its backoff.
                        let _ = self.flush().await;
                    }
                    next_flush = self.retry_at.unwrap_or_else(tokio::time::Instant::now).max(tokio::time::Instant::now() + self.config.flush_interval);
                }
                _ = progress.tick() => self.keep_held().await,
            }
            if self.pending.len() >= self.config.flush_rows && self.may_flush() {
                let _ = self.flush().await;
                next_flush = tokio::time::Instant::now() + self.config.flush_interval;
            }
        }
        if done {
            // Take what is already queued; nothing more will come.
            loop {
                let mut took = false;
                for (subscription, kind, open) in [
                    (&mut scored, PendingKind::Result, &mut scored_open),
                    (&mut quarantine, PendingKind::Quarantine, &mut quarantine_open),
                    (&mut ignored, PendingKind::Ignored, &mut ignored_open),
                ] {
                    if !*open {
                        continue;
                    }
                    // A zero timeout polls once: what is ready, or nothing.
                    match tokio::time::timeout(Duration::ZERO, subscription.next()).await {
                        Ok(None) => *open = false,
                        Ok(Some(Ok(delivery))) => {
                            self.accept(delivery, kind).await;
                            took = true;
                            if self.pending.len() >= self.config.flush_rows && self.may_flush() {
                                let _ = self.flush().await;
                            }
                        }
                        Ok(Some(Err(error))) => warn!(%error, "receiving a message failed"),
                        Err(_) => {}
                    }
                }
                if !took {
                    break;
                }
            }
        }
        // The subjects ended (an embedded run) or shutdown: write what is held, through a
        // short outage; on shutdown what cannot be written goes back to the queue.
        let patience = if stopping { Duration::from_secs(10) } else { Duration::from_secs(120) };
        self.flush_until(tokio::time::Instant::now() + patience).await?;
        if self.config.write_summary {
            self.write_summary_and_worklist().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use panscreen_shared::contracts::example_scored;
    use panscreen_shared::queue::MemoryQueue;
    use panscreen_shared::store::OpenMode;

    fn scored(study: &str) -> StudyScored {
        example_scored("c", study, true)
    }

    /// A queue holding `studies` as scored messages, its subjects closed.
    async fn queued(writer: &str, studies: &[&str]) -> Arc<dyn Queue> {
        let queue = MemoryQueue::new();
        for (index, study) in studies.iter().enumerate() {
            // Ids of their own: a copy published again (not dropped by the queue's
            // duplicate window), as after a redelivery with a new id.
            let payload = Bytes::from(serde_json::to_vec(&scored(study)).unwrap());
            let id = format!("{study}:{writer}:{index}");
            queue.publish(&subjects::scored("c"), &id, payload).await.unwrap();
        }
        for subject in [subjects::scored("c"), subjects::quarantine("c"), subjects::ignored("c")] {
            queue.close(&subject).await;
        }
        Arc::new(queue)
    }

    fn writer(out: &Store, writer: &str) -> Aggregator {
        let counters = Arc::new(StageCounters::default());
        Aggregator::new(
            AggregateConfig::new("c", writer),
            out.clone(),
            SiteRegistry::builtin(),
            counters,
        )
    }

    /// Runs one aggregate writer over `studies` until its queue ends.
    async fn aggregate(out: &Store, name: &str, studies: &[&str]) -> AggregateReport {
        let queue = queued(name, studies).await;
        let mut aggregator = writer(out, name);
        let never = std::future::pending;
        service::serve(&mut aggregator, queue, never(), never()).await.unwrap();
        aggregator.report().clone()
    }

    /// One writer's commit of `studies`' results, as a flush writes it.
    async fn commit_results(out: &Store, writer: &str, studies: &[&str]) {
        let rows: Vec<StudyScored> = studies.iter().map(|study| scored(study)).collect();
        let batch = tables::results_batch(&rows, SOFTWARE_VERSION, OffsetDateTime::now_utc());
        let mut staged = commit::Staged::new(writer, 1);
        let key =
            format!("results/region_code=330203/scan_month=2026-01/part-{writer}-00001.parquet");
        let bytes = parquet_bytes(&batch.unwrap()).unwrap();
        staged.stage(out, key, rows.len(), bytes).await.unwrap();
        let ids = commit::CommitIds {
            study_keys: studies.iter().map(|study| study.to_string()).collect(),
            quarantine_ids: Vec::new(),
            ignored_ids: Vec::new(),
        };
        staged.commit(out, ids, Vec::new()).await.unwrap();
    }

    /// Two writers whose flushes raced (each read the other's commits before either was
    /// written) both committed s2; compaction keeps one row per study in one file per
    /// partition, moves the commits' ids to its own, and a second compaction finds
    /// nothing to do.
    #[tokio::test]
    async fn compaction_merges_duplicates_across_commits() {
        let directory = tempfile::tempdir().unwrap();
        let out = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        commit_results(&out, "writer-a", &["s1", "s2"]).await;
        commit_results(&out, "writer-b", &["s2", "s3"]).await;
        let committed = commit::read_commits(&out, &BTreeSet::new()).await.unwrap();
        let keys: usize = committed.iter().map(|m| m.study_keys.len()).sum();
        assert_eq!((committed.len(), keys), (2, 4), "s2 committed by both writers");

        let sites = SiteRegistry::builtin();
        let report = compact::compact(&out, "c", &sites).await.unwrap();
        assert_eq!((report.studies, report.duplicates_dropped), (3, 1), "{report:?}");
        assert_eq!((report.files_before, report.files_after), (2, 1), "{report:?}");
        let committed = commit::read_commits(&out, &BTreeSet::new()).await.unwrap();
        let mut keys: Vec<String> =
            committed.iter().flat_map(|m| m.study_keys.iter().cloned()).collect();
        keys.sort();
        assert_eq!(committed.len(), 1, "the two commits are replaced by compaction's");
        assert_eq!(keys.len(), 4, "their ids move with them (a late copy is still dropped)");
        let results = out.list("results").await.unwrap();
        assert_eq!(results.len(), 1, "{results:?}");

        let again = compact::compact(&out, "c", &sites).await.unwrap();
        assert_eq!((again.studies, again.duplicates_dropped), (3, 0));
        assert_eq!((again.files_before, again.files_after), (1, 1));
    }

    /// A study another writer already committed (a redelivery that reached a second
    /// replica) is dropped; a copy of a waiting study is written once with it.
    #[tokio::test]
    async fn a_second_writer_drops_what_the_first_committed() {
        let directory = tempfile::tempdir().unwrap();
        let out = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        let first = aggregate(&out, "writer-a", &["s1", "s2"]).await;
        assert_eq!((first.results_written, first.duplicates_dropped), (2, 0));
        // s2 is in writer a's commits: dropped. The copy of s3 arrives while s3 waits
        // for the flush: held and settled with it, written once.
        let second = aggregate(&out, "writer-b", &["s2", "s3", "s3"]).await;
        assert_eq!((second.results_written, second.duplicates_dropped), (1, 1), "{second:?}");
        let studies: usize = commit::read_commits(&out, &BTreeSet::new())
            .await
            .unwrap()
            .iter()
            .map(|manifest| manifest.study_keys.len())
            .sum();
        assert_eq!(studies, 3, "each study committed once");
    }

    #[test]
    fn partition_values_are_path_safe() {
        assert_eq!(partition_value("330203"), "330203");
        assert_eq!(partition_value("2025-03"), "2025-03");
        assert_eq!(partition_value("a/b c"), "a_b_c");
        assert_eq!(partition_value(""), "unknown");
    }
}
