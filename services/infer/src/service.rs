//! The infer stage as it runs: the one entry point of `panscreen serve infer` and of
//! the embedded `panscreen run`.

use std::future::Future;
use std::sync::{Arc, Mutex};

use panscreen_shared::contracts::{topology, Stage};
use panscreen_shared::manifest::ModelManifest;
use panscreen_shared::queue::{Queue, QueueError};
use panscreen_shared::store::Store;
use panscreen_shared::worker::{run_worker, StageCounters};

use crate::config::{InferConfig, Placement};
use crate::{InferHandler, Model};

/// A loaded model, shared by a worker's concurrent batches (one runs at a time).
pub type SharedModel = Arc<Mutex<Model>>;

/// Loads and checks the model on a blocking thread (loading takes seconds).
pub async fn load_model(
    manifest: ModelManifest,
    placement: Placement,
) -> anyhow::Result<SharedModel> {
    let model = tokio::task::spawn_blocking(move || Model::load(&manifest, &placement)).await??;
    Ok(Arc::new(Mutex::new(model)))
}

/// Scores the campaign's preprocessed studies, reading tensors from `work`, until
/// `shutdown` fires or the input subject is closed and drained (the embedded run).
pub async fn serve(
    config: InferConfig,
    model: SharedModel,
    queue: Arc<dyn Queue>,
    work: Store,
    counters: Arc<StageCounters>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), QueueError> {
    let subject = topology::input(Stage::Infer, &config.campaign);
    let manifest =
        Arc::new(model.lock().unwrap_or_else(std::sync::PoisonError::into_inner).manifest.clone());
    let handler = Arc::new(InferHandler {
        campaign: config.campaign,
        work,
        model,
        manifest,
        batch_size: config.batch_size,
        keep_tensors: config.keep_tensors,
        counters: counters.clone(),
    });
    if let Some(readiness) = &config.worker.readiness {
        readiness.set(true);
    }
    run_worker(queue, &subject, handler, config.worker, counters, shutdown).await
}
