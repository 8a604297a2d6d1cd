//! The aggregate stage's settings: a plain struct the CLI fills from its flags.

use std::time::Duration;

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
    /// A message delivered more often than this (its earlier aggregates died holding it)
    /// is written to the quarantine table instead.
    pub max_deliver: u32,
    /// Held messages get an in-progress ack this often (well under the queue's ack wait),
    /// so that a slow or failing flush does not make the queue hand them out again.
    pub progress_every: Duration,
    /// Pauses between flush attempts while the store fails (the last repeats).
    pub retry_backoff: Vec<Duration>,
}

impl AggregateConfig {
    pub fn new(campaign: &str, writer_id: &str) -> Self {
        AggregateConfig {
            campaign: campaign.to_string(),
            writer_id: writer_id.to_string(),
            flush_rows: 5_000,
            flush_interval: Duration::from_secs(1),
            write_summary: true,
            max_deliver: 5,
            progress_every: Duration::from_secs(20),
            retry_backoff: [1, 2, 4, 8, 15, 30].into_iter().map(Duration::from_secs).collect(),
        }
    }
}
