//! What each running service tells `panscreen status`: its counters, written every few
//! seconds to the campaign's JetStream key-value bucket under `<stage>.<instance>`.
//! Totals of stopped instances stay (they did that work); rates count only instances
//! heard from within the last [`FRESH`].

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::warn;

use crate::contracts::Stage;
use crate::counters::StageCounters;

/// How often a service reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// A report older than this (three missed reports) is from an instance that is gone
/// (killed without a word); a stopped one says so itself and drops out at once.
pub const FRESH: Duration = Duration::from_secs(15);

/// One instance's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStats {
    pub stage: Stage,
    pub instance: String,
    pub processed: u64,
    pub quarantined: u64,
    pub retried: u64,
    pub redelivered: u64,
    pub in_flight: u64,
    /// Messages finished (processed or quarantined) in the last minute.
    pub last_minute: u64,
    /// The rate over that window, per minute: the growth divided by the time the window
    /// really spans, so that an instance started 20 s ago is not read as a slow one.
    #[serde(default)]
    pub per_minute: f64,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The instance stopped (SIGTERM): its counts are final and it is not live.
    #[serde(default)]
    pub stopped: bool,
    /// Infer only: studies judged not assessable (no pancreas found, or it runs off
    /// the scan), counted in `processed` too.
    #[serde(default)]
    pub not_assessable: u64,
}

impl InstanceStats {
    pub fn is_fresh(&self, now: OffsetDateTime) -> bool {
        !self.stopped && now - self.updated_at <= FRESH
    }
}

/// Finished-message counts over a sliding minute.
#[derive(Debug, Default)]
pub struct MinuteWindow {
    samples: VecDeque<(Instant, u64)>,
}

impl MinuteWindow {
    /// Records the running total; returns how much it grew over the last minute.
    pub fn observe(&mut self, now: Instant, total: u64) -> u64 {
        self.samples.push_back((now, total));
        while self.samples.len() > 1
            && now.duration_since(self.samples[0].0) > Duration::from_secs(60)
        {
            self.samples.pop_front();
        }
        total - self.samples.front().map(|(_, first)| *first).unwrap_or(total)
    }

    /// The growth per minute over the span the window holds (none before two samples).
    pub fn per_minute(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some((first_at, first)), Some((last_at, last))) if last_at > first_at => {
                (last - first) as f64 * 60.0 / last_at.duration_since(*first_at).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// Writes this instance's counters to `bucket` every [`REPORT_EVERY`] until aborted.
/// Writes an instance's counters to the status bucket every [`REPORT_EVERY`] until
/// `stop` fires, then once more marked stopped: a stopped service's last counts stay
/// exact, and it drops out of the live instances at once.
pub async fn report_until(
    bucket: async_nats::jetstream::kv::Store,
    stage: Stage,
    instance: String,
    counters: Arc<StageCounters>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut window = MinuteWindow::default();
    let key = format!(
        "{stage}.{}",
        instance.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
    );
    tokio::pin!(stop);
    let mut stopped = false;
    loop {
        let (processed, quarantined, retried) = counters.snapshot();
        let stats = InstanceStats {
            stage,
            instance: instance.clone(),
            processed,
            quarantined,
            retried,
            redelivered: counters.redelivered.load(Ordering::Relaxed),
            in_flight: counters.in_flight.load(Ordering::Relaxed),
            last_minute: window.observe(Instant::now(), processed + quarantined),
            per_minute: window.per_minute(),
            updated_at: OffsetDateTime::now_utc(),
            stopped,
            not_assessable: counters.not_assessable.load(Ordering::Relaxed),
        };
        let body = Bytes::from(serde_json::to_vec(&stats).expect("stats serialize"));
        if let Err(error) = bucket.put(&key, body).await {
            warn!(%error, "reporting counters to the status bucket failed");
        }
        if stopped {
            return;
        }
        tokio::select! {
            _ = &mut stop => stopped = true,
            _ = tokio::time::sleep(REPORT_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_the_last_minute_only() {
        let start = Instant::now();
        let mut window = MinuteWindow::default();
        assert_eq!(window.observe(start, 10), 0);
        assert_eq!(window.observe(start + Duration::from_secs(30), 40), 30);
        assert_eq!(window.observe(start + Duration::from_secs(61), 50), 10);
        assert_eq!(window.observe(start + Duration::from_secs(200), 50), 0);
    }

    #[test]
    fn the_rate_is_over_the_time_the_window_spans() {
        let start = Instant::now();
        let mut window = MinuteWindow::default();
        window.observe(start, 0);
        assert_eq!(window.per_minute(), 0.0);
        // 5 finished in the first 20 s of an instance's life: 15 a minute, not 5.
        window.observe(start + Duration::from_secs(20), 5);
        assert!((window.per_minute() - 15.0).abs() < 1e-9);
        window.observe(start + Duration::from_secs(60), 20);
        assert!((window.per_minute() - 20.0).abs() < 1e-9);
    }
}
