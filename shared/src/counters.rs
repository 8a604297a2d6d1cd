//! The live counters of one stage: what the worker counts, `/metrics` and `/healthz`
//! serve, `panscreen status` reads and the embedded run's progress bars show.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the stage latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Live counters of one stage, read by progress bars and metrics.
#[derive(Debug, Default)]
pub struct StageCounters {
    pub processed: AtomicU64,
    pub quarantined: AtomicU64,
    pub retried: AtomicU64,
    /// Deliveries after the first (naks, and work a stopped worker never settled).
    pub redelivered: AtomicU64,
    pub in_flight: AtomicU64,
    /// Handlers abandoned at `handler_timeout`.
    pub timed_out: AtomicU64,
    /// Handlers abandoned in a row, none finishing in between (see [`StageCounters::wedged`]).
    pub timed_out_in_a_row: AtomicU64,
    /// Messages held through an outage right now.
    pub held: AtomicU64,
    /// Studies the model could not judge (infer: a cascade found no pancreas, or one
    /// that runs off the scan). Scored, not quarantined: also in `processed`.
    pub not_assessable: AtomicU64,
    pub latency: LatencyHistogram,
}

/// This many handler runs abandoned in a row, none finishing in between, and the worker
/// counts as wedged: `/healthz` fails, so that Kubernetes restarts it (an abandoned
/// handler may still hold a thread or a lock that every later run waits for).
pub const WEDGED_AFTER: u64 = 3;

impl StageCounters {
    /// Why the worker is wedged, or `None` while handlers still finish.
    pub fn wedged(&self) -> Option<String> {
        let in_a_row = self.timed_out_in_a_row.load(Ordering::Relaxed);
        (in_a_row >= WEDGED_AFTER)
            .then(|| format!("wedged: the last {in_a_row} handler runs ran past their limit and none finished since"))
    }
}

/// Handler time per message, in the buckets of [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, seconds: f64) {
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Cumulative bucket counts, total count, sum in seconds.
    pub fn snapshot(&self) -> ([u64; 10], u64, f64) {
        let buckets = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        (
            buckets,
            self.count.load(Ordering::Relaxed),
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

impl StageCounters {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.processed.load(Ordering::Relaxed),
            self.quarantined.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
        )
    }
}
