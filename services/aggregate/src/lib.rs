//! aggregate: writes what the pipeline found as Parquet for epidemiologists, and the
//! recall worklist for hospitals.
//!
//! - [`tables`]: the tables and their columns.
//! - [`Aggregator`]: consumes scored studies and quarantine records, drops
//!   duplicates (by study key), and flushes Parquet files by row count or age. A
//!   message is acked only after the file holding it is written.

pub mod tables;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use panscreen_shared::contracts::{subjects, IgnoredInput, QuarantineRecord, StudyScored};
use panscreen_shared::queue::{Delivery, Queue, QueueError};
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::Store;
use panscreen_shared::worker::StageCounters;
use panscreen_shared::SOFTWARE_VERSION;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::tables::RegionCounts;

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("cannot build a Parquet table: {0}")]
    Table(String),
    #[error("cannot write {key}: {source}")]
    Write { key: String, source: object_store::Error },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

#[derive(Debug, Clone)]
pub struct AggregateConfig {
    pub campaign: String,
    /// Distinguishes this writer's files from others' (run id, or host and pid).
    pub writer_id: String,
    /// Flush when this many rows are waiting…
    pub flush_rows: usize,
    /// …or when the oldest has waited this long.
    pub flush_interval: Duration,
    /// Write the summary and worklist when the run ends (embedded runs; a long-running
    /// service leaves them to a later summarizing step).
    pub write_summary: bool,
}

impl AggregateConfig {
    pub fn new(campaign: &str, writer_id: &str) -> Self {
        AggregateConfig {
            campaign: campaign.to_string(),
            writer_id: writer_id.to_string(),
            flush_rows: 5_000,
            flush_interval: Duration::from_secs(1),
            write_summary: true,
        }
    }
}

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
    let cleaned: String =
        value.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if cleaned.is_empty() {
        "unknown".to_string()
    } else {
        cleaned
    }
}

/// What the aggregator wrote.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AggregateReport {
    pub results_written: usize,
    pub quarantine_written: usize,
    pub duplicates_dropped: usize,
    pub files_written: Vec<String>,
    pub regions: Vec<RegionCounts>,
    pub flagged: usize,
}

pub struct Aggregator {
    config: AggregateConfig,
    out: Store,
    sites: SiteRegistry,
    pending_results: Vec<StudyScored>,
    pending_quarantine: Vec<QuarantineRecord>,
    pending_deliveries: Vec<Delivery>,
    seen_results: HashSet<String>,
    seen_quarantine: HashSet<String>,
    regions: BTreeMap<String, RegionCounts>,
    flagged: Vec<StudyScored>,
    sequence: u32,
    report: AggregateReport,
    counters: Arc<StageCounters>,
}

impl Aggregator {
    pub fn new(config: AggregateConfig, out: Store, sites: SiteRegistry, counters: Arc<StageCounters>) -> Self {
        Aggregator {
            config,
            out,
            sites,
            pending_results: Vec::new(),
            pending_quarantine: Vec::new(),
            pending_deliveries: Vec::new(),
            seen_results: HashSet::new(),
            seen_quarantine: HashSet::new(),
            regions: BTreeMap::new(),
            flagged: Vec::new(),
            sequence: 0,
            report: AggregateReport::default(),
            counters,
        }
    }

    fn pending(&self) -> usize {
        self.pending_results.len() + self.pending_quarantine.len()
    }

    async fn accept_scored(&mut self, delivery: Delivery) {
        let scored: StudyScored = match serde_json::from_slice(&delivery.payload) {
            Ok(scored) => scored,
            Err(error) => {
                warn!(%error, "unreadable scored message, terminated");
                let _ = delivery.term().await;
                return;
            }
        };
        if !self.seen_results.insert(scored.context.study_key.clone()) {
            self.report.duplicates_dropped += 1;
            let _ = delivery.ack().await;
            return;
        }
        self.pending_results.push(scored);
        self.pending_deliveries.push(delivery);
    }

    async fn accept_quarantine(&mut self, delivery: Delivery) {
        let record: QuarantineRecord = match serde_json::from_slice(&delivery.payload) {
            Ok(record) => record,
            Err(error) => {
                warn!(%error, "unreadable quarantine message, terminated");
                let _ = delivery.term().await;
                return;
            }
        };
        if !self.seen_quarantine.insert(record.message_id()) {
            self.report.duplicates_dropped += 1;
            let _ = delivery.ack().await;
            return;
        }
        self.pending_quarantine.push(record);
        self.pending_deliveries.push(delivery);
    }

    async fn put(&mut self, key: String, batch: RecordBatch) -> Result<(), AggregateError> {
        let bytes = parquet_bytes(&batch)?;
        self.out.put(&key, bytes).await.map_err(|source| AggregateError::Write { key: key.clone(), source })?;
        self.report.files_written.push(key);
        Ok(())
    }

    async fn write_pending(&mut self) -> Result<(), AggregateError> {
        let now = OffsetDateTime::now_utc();
        let mut partitions: BTreeMap<(String, String), Vec<StudyScored>> = BTreeMap::new();
        for row in &self.pending_results {
            let key = (partition_value(&row.context.region_code), partition_value(row.context.scan_month()));
            partitions.entry(key).or_default().push(row.clone());
        }
        self.sequence += 1;
        for ((region, month), rows) in partitions {
            let batch = tables::results_batch(&rows, SOFTWARE_VERSION, now)
                .map_err(|e| AggregateError::Table(e.to_string()))?;
            let key = format!(
                "results/region_code={region}/scan_month={month}/part-{}-{:05}.parquet",
                self.config.writer_id, self.sequence
            );
            self.put(key, batch).await?;
        }
        if !self.pending_quarantine.is_empty() {
            let batch =
                tables::quarantine_batch(&self.pending_quarantine).map_err(|e| AggregateError::Table(e.to_string()))?;
            let key = format!("quarantine/part-{}-{:05}.parquet", self.config.writer_id, self.sequence);
            self.put(key, batch).await?;
        }
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

    /// Writes what is pending, then settles it: ack when written, nak when not.
    pub async fn flush(&mut self) -> Result<(), AggregateError> {
        if self.pending() == 0 {
            return Ok(());
        }
        let deliveries = std::mem::take(&mut self.pending_deliveries);
        match self.write_pending().await {
            Ok(()) => {
                for row in std::mem::take(&mut self.pending_results) {
                    let region =
                        self.region_entry(&row.context.region_code, &row.context.region_name, &row.context.province);
                    region.screened += 1;
                    region.flagged += i64::from(row.prediction.flagged);
                    self.report.results_written += 1;
                    if row.prediction.flagged {
                        self.flagged.push(row);
                    }
                    self.counters.processed.fetch_add(1, Ordering::Relaxed);
                }
                for record in std::mem::take(&mut self.pending_quarantine) {
                    let site =
                        record.site_id.as_deref().and_then(|id| self.sites.sites.iter().find(|s| s.id == id)).cloned();
                    let (code, name, province) = match &site {
                        Some(site) => (site.region_code.as_str(), site.region_name.as_str(), site.province.as_str()),
                        None => ("unknown", "unknown", "unknown"),
                    };
                    self.region_entry(code, name, province).quarantined += 1;
                    self.report.quarantine_written += 1;
                    self.counters.quarantined.fetch_add(1, Ordering::Relaxed);
                }
                for delivery in deliveries {
                    if let Err(error) = delivery.ack().await {
                        warn!(%error, "ack failed after a durable write; the duplicate will be dropped on redelivery");
                    }
                }
                info!(sequence = self.sequence, "flushed");
                Ok(())
            }
            Err(error) => {
                warn!(%error, "writing Parquet failed; messages handed back for redelivery");
                for row in std::mem::take(&mut self.pending_results) {
                    self.seen_results.remove(&row.context.study_key);
                }
                for record in std::mem::take(&mut self.pending_quarantine) {
                    self.seen_quarantine.remove(&record.message_id());
                }
                for delivery in deliveries {
                    let _ = delivery.nak(Duration::from_secs(2)).await;
                }
                Err(error)
            }
        }
    }

    /// Writes the regional summary and the recall worklist for everything flushed.
    pub async fn write_summary_and_worklist(&mut self) -> Result<(), AggregateError> {
        let regions: Vec<RegionCounts> = self.regions.values().cloned().collect();
        let summary =
            tables::summary_batch(&regions, &self.config.campaign).map_err(|e| AggregateError::Table(e.to_string()))?;
        self.put("summary/summary.parquet".to_string(), summary).await?;
        let worklist = tables::worklist_batch(&self.flagged).map_err(|e| AggregateError::Table(e.to_string()))?;
        self.put("worklist/worklist.parquet".to_string(), worklist).await?;
        self.report.regions = regions;
        self.report.flagged = self.flagged.len();
        Ok(())
    }

    /// Records inputs ingest left out on purpose.
    pub async fn write_ignored(&mut self, ignored: &[IgnoredInput]) -> Result<(), AggregateError> {
        if ignored.is_empty() {
            return Ok(());
        }
        let batch = tables::ignored_batch(ignored).map_err(|e| AggregateError::Table(e.to_string()))?;
        self.put(format!("ignored/part-{}.parquet", self.config.writer_id), batch).await
    }

    /// Remembers the studies already in the results, so that a redelivered study is
    /// not written twice across restarts. Returns how many there were.
    pub async fn load_existing(&mut self) -> Result<usize, AggregateError> {
        let objects = self.out.list("results").await.map_err(|e| AggregateError::Table(e.to_string()))?;
        for object in objects.iter().filter(|o| o.location.as_ref().ends_with(".parquet")) {
            let key = object.location.to_string();
            let bytes =
                self.out.get(&key).await.map_err(|source| AggregateError::Write { key: key.clone(), source })?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|builder| builder.build())
                .map_err(|e| AggregateError::Table(format!("{key}: {e}")))?;
            for batch in reader {
                let batch = batch.map_err(|e| AggregateError::Table(format!("{key}: {e}")))?;
                let Some(keys) = batch
                    .column_by_name("study_key")
                    .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>().cloned())
                else {
                    continue;
                };
                self.seen_results.extend(keys.iter().flatten().map(str::to_string));
            }
        }
        Ok(self.seen_results.len())
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
        let consumer = "panscreen-aggregate";
        let mut scored = queue.subscribe(&subjects::scored(&self.config.campaign), consumer).await?;
        let mut quarantine = queue.subscribe(&subjects::quarantine(&self.config.campaign), consumer).await?;
        let (mut scored_open, mut quarantine_open) = (true, true);
        let mut next_flush = tokio::time::Instant::now() + self.config.flush_interval;
        tokio::pin!(shutdown);
        while scored_open || quarantine_open {
            tokio::select! {
                _ = &mut shutdown => break,
                next = scored.next(), if scored_open => match next {
                    None => scored_open = false,
                    Some(Ok(delivery)) => self.accept_scored(delivery).await,
                    Some(Err(error)) => warn!(%error, "receiving scored studies failed"),
                },
                next = quarantine.next(), if quarantine_open => match next {
                    None => quarantine_open = false,
                    Some(Ok(delivery)) => self.accept_quarantine(delivery).await,
                    Some(Err(error)) => warn!(%error, "receiving quarantine records failed"),
                },
                _ = tokio::time::sleep_until(next_flush) => {
                    if let Err(error) = self.flush().await {
                        warn!(%error, "flush failed, will retry");
                    }
                    next_flush = tokio::time::Instant::now() + self.config.flush_interval;
                }
            }
            if self.pending() >= self.config.flush_rows {
                self.flush().await?;
                next_flush = tokio::time::Instant::now() + self.config.flush_interval;
            }
        }
        self.flush().await?;
        if self.config.write_summary {
            self.write_summary_and_worklist().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_values_are_path_safe() {
        assert_eq!(partition_value("330203"), "330203");
        assert_eq!(partition_value("2025-03"), "2025-03");
        assert_eq!(partition_value("a/b c"), "a_b_c");
        assert_eq!(partition_value(""), "unknown");
    }
}
