//! The aggregate stage as it runs: the one entry point of `panscreen serve aggregate`
//! and of the embedded `panscreen run`.

use std::future::Future;
use std::sync::Arc;

use std::time::Duration;

use panscreen_shared::queue::Queue;
use tracing::{info, warn};

use crate::{AggregateError, Aggregator};

/// Reads what earlier writers committed (waiting for the store when it is down at
/// start-up), then aggregates until the three input subjects end or `shutdown` fires.
/// `producers_done` says every message is already queued (the embedded run; a service
/// passes `std::future::pending()`): see [`Aggregator::run_until`].
pub async fn serve(
    aggregator: &mut Aggregator,
    queue: Arc<dyn Queue>,
    shutdown: impl Future<Output = ()>,
    producers_done: impl Future<Output = ()>,
) -> Result<(), AggregateError> {
    let mut pause = Duration::from_millis(500);
    let existing = loop {
        // Started while the store is down: wait for it, not ready, not exiting.
        match aggregator.recover().await {
            Ok(existing) => break existing,
            Err(error) => {
                warn!(%error, retry_in_s = pause.as_secs_f64(), "reading the committed tables failed at start-up; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(15));
            }
        }
    };
    info!(existing, "studies already in the results");
    if let Some(readiness) = &aggregator.readiness {
        readiness.set(true);
    }
    aggregator.run_until(queue, shutdown, producers_done).await
}
