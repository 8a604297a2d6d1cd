//! The preprocess stage as it runs: the one entry point of `panscreen serve preprocess`
//! and of the embedded `panscreen run`.

use std::future::Future;
use std::sync::Arc;

use panscreen_shared::contracts::{topology, Stage};
use panscreen_shared::queue::{Queue, QueueError};
use panscreen_shared::store::Store;
use panscreen_shared::worker::{run_worker, StageCounters};

use crate::config::{PreprocessConfig, FETCH_AHEAD};
use crate::PreprocessHandler;

/// Preprocesses the campaign's ingested studies, reading slices from `input` and
/// writing tensors to `work`, until `shutdown` fires or the input subject is closed and
/// drained (the embedded run).
pub async fn serve(
    config: PreprocessConfig,
    queue: Arc<dyn Queue>,
    input: Store,
    work: Store,
    counters: Arc<StageCounters>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), QueueError> {
    let subject = topology::input(Stage::Preprocess, &config.campaign);
    let handler = Arc::new(PreprocessHandler {
        campaign: config.campaign,
        input,
        work,
        manifest: config.manifest,
        fetch_ahead: FETCH_AHEAD,
    });
    if let Some(readiness) = &config.worker.readiness {
        readiness.set(true);
    }
    run_worker(queue, &subject, handler, config.worker, counters, shutdown).await
}
