//! Health and Prometheus metrics over HTTP, for a service.
//!
//! `GET /healthz` answers 200 while the process runs and its handlers still finish (503
//! once it is wedged, see [`crate::counters::WEDGED_AFTER`]); `GET /readyz` 200 once the
//! service is connected and working, 503 before and while draining; `GET /metrics`
//! the counters of [`StageCounters`] in Prometheus text format. Metric names are
//! defined here and nowhere else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::warn;

use crate::contracts::Stage;
use crate::counters::StageCounters;

pub const PROCESSED_TOTAL: &str = "panscreen_processed_total";
pub const QUARANTINED_TOTAL: &str = "panscreen_quarantined_total";
pub const RETRIED_TOTAL: &str = "panscreen_retried_total";
pub const REDELIVERED_TOTAL: &str = "panscreen_redelivered_total";
pub const IN_FLIGHT: &str = "panscreen_in_flight";
pub const NOT_ASSESSABLE_TOTAL: &str = "panscreen_not_assessable_total";
pub const STAGE_SECONDS: &str = "panscreen_stage_seconds";

pub use crate::counters::LATENCY_BUCKETS;

/// Readiness: the service has started, and nothing blocks it now. Each part of a service
/// reports its own blocker ("store unreachable", "NATS disconnected", …), so one part
/// clearing its blocker does not hide another's.
#[derive(Debug, Default)]
pub struct Readiness {
    started: AtomicBool,
    blockers: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
}

impl Readiness {
    /// Started (true) or draining (false).
    pub fn set(&self, ready: bool) {
        self.started.store(ready, Ordering::Relaxed);
    }

    /// Adds (`blocked`) or clears a named blocker.
    pub fn block(&self, blocker: &'static str, blocked: bool) {
        let mut blockers = self.blockers.lock().expect("readiness lock");
        if blocked {
            blockers.insert(blocker);
        } else {
            blockers.remove(blocker);
        }
    }

    pub fn get(&self) -> bool {
        self.started.load(Ordering::Relaxed)
            && self.blockers.lock().expect("readiness lock").is_empty()
    }

    /// Why the service is not ready, for the /readyz body ("" when ready).
    pub fn why_not(&self) -> String {
        if !self.started.load(Ordering::Relaxed) {
            return "starting or draining".to_string();
        }
        self.blockers.lock().expect("readiness lock").iter().copied().collect::<Vec<_>>().join("; ")
    }
}

/// The Prometheus text for one stage's counters.
pub fn render(stage: Stage, counters: &StageCounters) -> String {
    let label = format!("{{stage=\"{stage}\"}}");
    let (processed, quarantined, retried) = counters.snapshot();
    let mut text = String::new();
    let mut counter = |name: &str, help: &str, kind: &str, value: u64| {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{label} {value}\n"
        ));
    };
    counter(PROCESSED_TOTAL, "Messages handled and passed on.", "counter", processed);
    counter(QUARANTINED_TOTAL, "Inputs quarantined.", "counter", quarantined);
    counter(RETRIED_TOTAL, "Retryable failures handed back for redelivery.", "counter", retried);
    counter(
        REDELIVERED_TOTAL,
        "Deliveries after the first.",
        "counter",
        counters.redelivered.load(Ordering::Relaxed),
    );
    counter(
        NOT_ASSESSABLE_TOTAL,
        "Studies the model could not judge (no pancreas found, or it runs off the scan).",
        "counter",
        counters.not_assessable.load(Ordering::Relaxed),
    );
    counter(
        IN_FLIGHT,
        "Messages being handled now.",
        "gauge",
        counters.in_flight.load(Ordering::Relaxed),
    );
    text.push_str(&format!(
        "# HELP {STAGE_SECONDS} Time in the stage's handler per message.\n# TYPE {STAGE_SECONDS} histogram\n"
    ));
    let (buckets, count, sum) = counters.latency.snapshot();
    for (bound, cumulative) in LATENCY_BUCKETS.iter().zip(buckets) {
        text.push_str(&format!(
            "{STAGE_SECONDS}_bucket{{stage=\"{stage}\",le=\"{bound}\"}} {cumulative}\n"
        ));
    }
    text.push_str(&format!("{STAGE_SECONDS}_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {count}\n"));
    text.push_str(&format!(
        "{STAGE_SECONDS}_sum{label} {sum}\n{STAGE_SECONDS}_count{label} {count}\n"
    ));
    text
}

/// Serves /healthz, /readyz and /metrics on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    stage: Stage,
    counters: Arc<StageCounters>,
    readiness: Arc<Readiness>,
) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        let (counters, readiness) = (counters.clone(), readiness.clone());
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let read = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                socket.read(&mut request),
            )
            .await
            {
                Ok(Ok(read)) => read,
                _ => return,
            };
            let line = String::from_utf8_lossy(&request[..read]);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/healthz" => match counters.wedged() {
                    None => ("200 OK", "ok\n".to_string()),
                    Some(why) => ("503 Service Unavailable", format!("{why}\n")),
                },
                "/readyz" if readiness.get() => ("200 OK", "ready\n".to_string()),
                "/readyz" => {
                    ("503 Service Unavailable", format!("not ready: {}\n", readiness.why_not()))
                }
                "/metrics" => ("200 OK", render(stage, &counters)),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(error) = socket.write_all(response.as_bytes()).await {
                warn!(%error, "writing a metrics response failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(port: u16, path: &str) -> String {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        socket.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = String::new();
        socket.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn healthz_fails_once_the_worker_is_wedged() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counters = Arc::new(StageCounters::default());
        let server = tokio::spawn(serve(
            listener,
            Stage::Infer,
            counters.clone(),
            Arc::new(Readiness::default()),
        ));
        assert!(get(port, "/healthz").await.starts_with("HTTP/1.1 200"));
        counters.timed_out_in_a_row.store(crate::counters::WEDGED_AFTER, Ordering::Relaxed);
        let response = get(port, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 503") && response.contains("wedged"), "{response}");
        server.abort();
    }

    #[test]
    fn renders_counters_and_histogram() {
        let counters = StageCounters::default();
        counters.processed.fetch_add(3, Ordering::Relaxed);
        counters.not_assessable.fetch_add(1, Ordering::Relaxed);
        counters.latency.observe(0.2);
        counters.latency.observe(7.0);
        let text = render(Stage::Infer, &counters);
        assert!(text.contains("panscreen_processed_total{stage=\"infer\"} 3\n"), "{text}");
        assert!(text.contains("panscreen_not_assessable_total{stage=\"infer\"} 1\n"), "{text}");
        assert!(
            text.contains("panscreen_stage_seconds_bucket{stage=\"infer\",le=\"0.25\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("panscreen_stage_seconds_bucket{stage=\"infer\",le=\"10\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("panscreen_stage_seconds_count{stage=\"infer\"} 2\n"), "{text}");
    }
}
