//! The ingest service (`panscreen serve ingest`): a pass over every watched prefix on
//! each tick and on each submission. The embedded `panscreen run` scans its input once
//! instead ([`crate::run_once`]): it has no ledger, no quiet period and no submissions.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use panscreen_shared::contracts::{topology, Stage};
use panscreen_shared::metrics::Readiness;
use panscreen_shared::queue::{Queue, QueueError};
use panscreen_shared::retry::until_it_works;
use panscreen_shared::store::Store;
use panscreen_shared::worker::StageCounters;
use tracing::{info, warn};

use crate::config::IngestServiceConfig;
use crate::watch::Watcher;
use crate::{accounting, submissions, IngestReport};

/// Where the service reads and writes.
pub struct IngestStores {
    /// The store the watched prefixes are in.
    pub input: Store,
    /// Ingest's state: the ledger, submission records, requeue requests.
    pub state: Store,
    /// The campaign's tables (each pass's `accounting/` file goes there).
    pub out: Store,
}

/// Watches, decides and publishes until `shutdown` fires.
pub async fn serve(
    config: IngestServiceConfig,
    queue: Arc<dyn Queue>,
    stores: IngestStores,
    counters: Arc<StageCounters>,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), QueueError> {
    let campaign = config.ingest.campaign.clone();
    let IngestStores { input, state, out } = stores;
    let mut watcher = until_it_works("reading the ingest ledger", || {
        Watcher::open(
            input.clone(),
            state.clone(),
            config.ingest.clone(),
            config.completion.clone(),
            config.pseudonymizer.clone(),
            config.sites.clone(),
        )
    })
    .await;
    let mut prefixes = watched_prefixes(&state, &config.watch, &BTreeSet::new()).await;
    let submitted = topology::of(Stage::Ingest).consumes[0].name(&campaign);
    let mut requests = queue.subscribe(&submitted, &topology::consumer(Stage::Ingest)).await?;
    let mut tick = tokio::time::interval(config.rescan.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    readiness.set(true);
    info!(prefixes = prefixes.len(), "ingest watching");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            next = requests.next() => match next {
                // A wake-up: the submission is already recorded in the store.
                Some(Ok(delivery)) => {
                    if let Err(error) = delivery.ack().await {
                        warn!(%error, "acknowledging a submission failed");
                    }
                }
                Some(Err(error)) => {
                    warn!(%error, "receiving submissions failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                None => break,
            },
            _ = tick.tick() => {},
        };
        prefixes = watched_prefixes(&state, &config.watch, &prefixes).await;
        let listed: Vec<String> = prefixes.iter().cloned().collect();
        match watcher.pass(&*queue, &listed).await {
            Ok(pass) => {
                counters.processed.fetch_add(pass.decided.studies.len() as u64, Ordering::Relaxed);
                counters
                    .quarantined
                    .fetch_add(pass.decided.quarantined.len() as u64, Ordering::Relaxed);
                counters.in_flight.store(pass.waiting_studies as u64, Ordering::Relaxed);
                if pass.decided.objects_listed > 0 {
                    write_accounting(&out, &pass.decided).await;
                }
            }
            Err(error) => {
                warn!(error = %format!("{error:#}"), "ingest pass failed; the next pass retries")
            }
        }
    }
    Ok(())
}

/// The configured prefixes and every submitted one; `last` when the records cannot be
/// read now (a store outage must not make ingest forget what it watches).
async fn watched_prefixes(
    state: &Store,
    configured: &[String],
    last: &BTreeSet<String>,
) -> BTreeSet<String> {
    match submissions::submitted(state).await {
        Ok(requests) => {
            let mut prefixes: BTreeSet<String> = configured.iter().cloned().collect();
            prefixes.extend(requests.into_iter().map(|request| request.prefix));
            prefixes
        }
        Err(error) => {
            warn!(%error, "cannot read the submitted prefixes; watching the last known set");
            last.clone()
        }
    }
}

/// One pass's accounting, beside the tables, as an embedded run writes its own. A
/// failed write is logged: the objects' rows are in the quarantine and ignored tables
/// all the same.
async fn write_accounting(out: &Store, decided: &IngestReport) {
    let pass_id = format!("ingest-{}", time::OffsetDateTime::now_utc().unix_timestamp_nanos());
    let written = match accounting::table(&pass_id, decided) {
        Ok(table) => out
            .put(&format!("accounting/{pass_id}.parquet"), table)
            .await
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = written {
        warn!(%error, "writing the pass's accounting failed");
    }
}
