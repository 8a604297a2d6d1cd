//! The loop every queue-driven stage runs.
//!
//! Pull a message, hand it to the stage's [`Handler`] (no queue types inside, so the
//! handler is unit-testable), publish the outcome and wait for the queue to hold it,
//! and only then ack. What to do with an error is decided here, once, from its class:
//!
//! | outcome                                | queue action                      |
//! |----------------------------------------|-----------------------------------|
//! | next message published                 | ack                               |
//! | handler says quarantine / permanent    | quarantine record, then term      |
//! | retryable, attempts left               | nak with backoff                  |
//! | retryable, `max_deliver` reached       | quarantine "gave up after N attempts: …", term |
//! | infrastructure (store or broker down)  | hold the message (in-progress acks), pause pulling, readiness false, try again after backoff: no attempt spent |
//! | publishing the outcome failed          | the same: hold and publish again  |
//! | handler ran past `handler_timeout`     | retryable ("ran past its limit")  |
//! | delivered past `max_deliver` (earlier attempts never settled: the worker died or hung) | quarantine without handling, term |
//!
//! On shutdown, a message held through an outage is handed back (nak) for another
//! worker, and the subscription hands back what it had fetched but not started.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tracing::{info, info_span, warn, Instrument};

use crate::contracts::{subjects, QuarantineRecord, Stage};
pub use crate::counters::{LatencyHistogram, StageCounters, WEDGED_AFTER};
use crate::error::StageError;
use crate::queue::{Delivery, Published, Queue, QueueError};

/// What a handler made of one input.
#[derive(Debug)]
pub enum Outcome {
    /// Publish this message for the next stage.
    Publish { subject: String, message_id: String, payload: Bytes },
    /// The input cannot be screened; record why.
    Quarantine(QuarantineRecord),
    /// What the input points to is gone from the work store. Either an earlier attempt
    /// published `output_id`, released the input's data ([`Handler::finished`]) and died
    /// before acking, and the message is settled; or the data was lost, and the input is
    /// quarantined with `record`. The queue's deduplication tells which: the record is
    /// published under `output_id`, and is dropped if that output is already there.
    InputGone { output_id: String, record: QuarantineRecord },
}

/// One stage's work on messages. Implementations do their blocking work on
/// `spawn_blocking`, never on the async workers.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    fn stage(&self) -> Stage;

    /// How many messages are handled together (infer batches; others take one).
    fn batch_size(&self) -> usize {
        1
    }

    /// One result per payload, in order.
    async fn handle_batch(&self, payloads: Vec<Bytes>) -> Vec<Result<Outcome, StageError>>;

    /// Called once a message's outcome is in the queue for good, so what only it needed
    /// (a work tensor) can go: for a published output, after the publish and *before*
    /// the ack, so that a worker killed in between has the message redelivered rather
    /// than the data left behind (the handler answers that redelivery with
    /// [`Outcome::InputGone`]); for a quarantine, after the message is terminated.
    async fn finished(&self, _payload: &Bytes) {}

    /// Called with an output the queue dropped as a duplicate: an earlier attempt at the
    /// same input (on a worker that died after publishing, before acking) published first,
    /// and its message is what the next stage reads. Whatever this attempt wrote for
    /// `output` alone is referenced by nothing and can go. Runs before the input is acked.
    async fn superseded(&self, _output: &Bytes) {}
}

/// Settings chosen on purpose for every stage worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub campaign: String,
    /// Durable consumer name.
    pub consumer: String,
    /// Messages (or batches) handled at once by this process.
    pub concurrency: usize,
    /// Deliveries before a retryable failure is quarantined.
    pub max_deliver: u32,
    /// Delay before redelivery, by attempt (the last entry repeats).
    pub backoff: Vec<Duration>,
    /// How long to wait for a batch to fill.
    pub batch_linger: Duration,
    /// While a handler works, each of its messages gets an in-progress ack this often,
    /// so that long work is not redelivered (keep it well under the queue's ack wait).
    pub progress_every: Duration,
    /// After shutdown, how long work in flight may take to finish. What is not settled
    /// by then is redelivered by the queue (JetStream's ack wait).
    pub drain_deadline: Duration,
    /// A handler still running after this long is abandoned and its messages retried.
    pub handler_timeout: Duration,
    /// Told when the worker pauses for an outage (not ready) and resumes.
    pub readiness: Option<Arc<crate::metrics::Readiness>>,
}

/// The readiness blocker while an outage holds the worker.
const OUTAGE: &str = "the store or the queue is failing; work is held";

impl WorkerConfig {
    pub fn new(campaign: &str, stage: Stage) -> Self {
        WorkerConfig {
            campaign: campaign.to_string(),
            consumer: subjects::consumer(stage),
            concurrency: 1,
            max_deliver: 5,
            backoff: vec![
                Duration::from_millis(500),
                Duration::from_secs(2),
                Duration::from_secs(10),
                Duration::from_secs(30),
            ],
            batch_linger: Duration::from_millis(50),
            progress_every: Duration::from_secs(20),
            drain_deadline: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(600),
            readiness: None,
        }
    }

    fn backoff_for(&self, attempt: u32) -> Duration {
        let index = (attempt.max(1) as usize - 1).min(self.backoff.len().saturating_sub(1));
        self.backoff.get(index).copied().unwrap_or(Duration::from_secs(1))
    }
}

/// Whether the worker is pausing for an outage, and whether it is stopping.
#[derive(Default)]
struct Pause {
    /// Tasks holding messages through an outage.
    holding: AtomicU64,
    stopping: std::sync::atomic::AtomicBool,
}

impl Pause {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// Runs `handler` on `input_subject` until the subscription ends or `shutdown` fires;
/// then waits for the work in flight to be settled.
pub async fn run_worker<H: Handler>(
    queue: Arc<dyn Queue>,
    input_subject: &str,
    handler: Arc<H>,
    config: WorkerConfig,
    counters: Arc<StageCounters>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), QueueError> {
    let mut subscription = queue.subscribe(input_subject, &config.consumer).await?;
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let config = Arc::new(config);
    let pause = Arc::new(Pause::default());
    tokio::pin!(shutdown);

    let mut stopping = false;
    loop {
        // While an outage holds messages, pull no more: they would wait and time out.
        while pause.holding.load(Ordering::Relaxed) > 0 {
            tokio::select! {
                _ = &mut shutdown => {
                    stopping = true;
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        if stopping {
            break;
        }
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let first = tokio::select! {
            _ = &mut shutdown => break,
            next = subscription.next() => next,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first?];
        while batch.len() < handler.batch_size() {
            match tokio::time::timeout(config.batch_linger, subscription.next()).await {
                Ok(Some(next)) => batch.push(next?),
                Ok(None) | Err(_) => break,
            }
        }
        counters.in_flight.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (queue, handler, config, counters, pause) =
            (queue.clone(), handler.clone(), config.clone(), counters.clone(), pause.clone());
        tokio::spawn(async move {
            handle_batch(&*queue, &*handler, &config, &counters, &pause, batch).await;
            drop(permit);
        });
    }
    pause.stopping.store(true, Ordering::Relaxed);
    // What the subscription fetched but no handler started goes back at once.
    subscription.drain().await;
    // Drain: every permit back means nothing is in flight.
    let drained = tokio::time::timeout(
        config.drain_deadline,
        permits.acquire_many(config.concurrency.max(1) as u32),
    )
    .await;
    if drained.is_err() {
        warn!(
            deadline_s = config.drain_deadline.as_secs(),
            "work still in flight at the drain deadline; the queue redelivers it"
        );
    }
    Ok(())
}

async fn handle_batch<H: Handler>(
    queue: &dyn Queue,
    handler: &H,
    config: &WorkerConfig,
    counters: &StageCounters,
    pause: &Pause,
    batch: Vec<Delivery>,
) {
    let stage = handler.stage();
    // A message delivered past the limit took its earlier workers down with it (crash,
    // out of memory, hang): it is not handled again.
    let (mut batch, poisoned): (Vec<Delivery>, Vec<Delivery>) =
        batch.into_iter().partition(|delivery| delivery.attempt <= config.max_deliver);
    for delivery in poisoned {
        let attempts = delivery.attempt - 1;
        let error = StageError::permanent(
            format!("gave up after {attempts} attempts: no worker finished it (crashed, killed or timed out)"),
            "the message was delivered past max_deliver without ever being settled",
        );
        settle_one(queue, handler, config, counters, pause, delivery, Err(error)).await;
    }
    // Messages held through an outage are handled again, until it passes or the
    // worker stops; none of their attempts is spent meanwhile.
    let mut outages = 0u32;
    while !batch.is_empty() {
        let results = run_handler(handler, config, counters, &batch).await;
        debug_assert_eq!(results.len(), batch.len(), "one result per payload");
        let mut held = Vec::new();
        for (delivery, result) in batch.into_iter().zip(results) {
            match result {
                Err(error) if error.is_infrastructure() && !pause.stopping() => {
                    held.push((delivery, error))
                }
                result => {
                    settle_one(queue, handler, config, counters, pause, delivery, result).await
                }
            }
        }
        if held.is_empty() {
            break;
        }
        outages += 1;
        let wait = config.backoff_for(outages);
        warn!(stage = %stage, messages = held.len(), reason = %held[0].1.reason, wait_s = wait.as_secs_f64(), "outage: holding the work and trying again");
        batch = held.into_iter().map(|(delivery, _)| delivery).collect();
        hold_through(config, counters, pause, &batch, wait).await;
    }
}

/// Keeps `held` (in-progress acks) for `wait`, paused and not ready meanwhile.
async fn hold_through(
    config: &WorkerConfig,
    counters: &StageCounters,
    pause: &Pause,
    held: &[Delivery],
    wait: Duration,
) {
    pause.holding.fetch_add(1, Ordering::Relaxed);
    counters.held.fetch_add(held.len() as u64, Ordering::Relaxed);
    if let Some(readiness) = &config.readiness {
        readiness.block(OUTAGE, true);
    }
    let deadline = tokio::time::Instant::now() + wait;
    let every = config.progress_every.max(Duration::from_millis(100));
    while tokio::time::Instant::now() < deadline && !pause.stopping() {
        for delivery in held {
            let _ = delivery.progress().await;
        }
        tokio::time::sleep(
            every.min(Duration::from_millis(500)).min(deadline - tokio::time::Instant::now()),
        )
        .await;
    }
    counters.held.fetch_sub(held.len() as u64, Ordering::Relaxed);
    if pause.holding.fetch_sub(1, Ordering::Relaxed) == 1 {
        if let Some(readiness) = &config.readiness {
            readiness.block(OUTAGE, false);
        }
    }
}

async fn settle_one<H: Handler>(
    queue: &dyn Queue,
    handler: &H,
    config: &WorkerConfig,
    counters: &StageCounters,
    pause: &Pause,
    delivery: Delivery,
    result: Result<Outcome, StageError>,
) {
    let stage = handler.stage();
    let envelope = Envelope::peek(&delivery.payload);
    if delivery.attempt > 1 {
        counters.redelivered.fetch_add(1, Ordering::Relaxed);
        info!(stage = %stage, study = %envelope.study_key.as_deref().unwrap_or("-"), attempt = delivery.attempt, "redelivered message");
    }
    let span = info_span!("message", stage = %stage, study = %envelope.study_key.as_deref().unwrap_or("-"), attempt = delivery.attempt);
    settle(queue, handler, config, counters, pause, delivery, envelope, result)
        .instrument(span)
        .await;
    counters.in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// Runs the handler on a batch, sending in-progress acks while it works, and records
/// its time per message.
async fn run_handler<H: Handler>(
    handler: &H,
    config: &WorkerConfig,
    counters: &StageCounters,
    batch: &[Delivery],
) -> Vec<Result<Outcome, StageError>> {
    let payloads: Vec<Bytes> = batch.iter().map(|delivery| delivery.payload.clone()).collect();
    let started = std::time::Instant::now();
    let work = handler.handle_batch(payloads);
    tokio::pin!(work);
    let every = config.progress_every.max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let deadline = tokio::time::sleep(config.handler_timeout);
    tokio::pin!(deadline);
    let results = loop {
        tokio::select! {
            results = &mut work => {
                counters.timed_out_in_a_row.store(0, Ordering::Relaxed);
                break results;
            }
            _ = &mut deadline => {
                counters.timed_out.fetch_add(1, Ordering::Relaxed);
                counters.timed_out_in_a_row.fetch_add(1, Ordering::Relaxed);
                let limit = config.handler_timeout.as_secs_f64();
                warn!(limit_s = limit, messages = batch.len(), "a handler ran past its limit; abandoned");
                break batch
                    .iter()
                    .map(|_| Err(StageError::retryable(
                        format!("the stage ran past its limit of {limit} s"),
                        "abandoned and tried again (see handler_timeout)",
                    )))
                    .collect();
            }
            _ = ticker.tick() => {
                for delivery in batch {
                    if let Err(error) = delivery.progress().await {
                        warn!(%error, "in-progress ack failed");
                    }
                }
            }
        }
    };
    let per_message = started.elapsed().as_secs_f64() / batch.len().max(1) as f64;
    for _ in 0..batch.len() {
        counters.latency.observe(per_message);
    }
    results
}

/// Publishes, holding `delivery` through an outage of the queue (in-progress acks,
/// paused) until it goes through or the worker stops. `None` if it did not go through.
async fn publish_holding(
    queue: &dyn Queue,
    config: &WorkerConfig,
    counters: &StageCounters,
    pause: &Pause,
    delivery: &Delivery,
    (subject, message_id, payload): (&str, &str, Bytes),
) -> Option<Published> {
    let mut outages = 0u32;
    loop {
        match queue.publish(subject, message_id, payload.clone()).await {
            Ok(published) => return Some(published),
            Err(error) if pause.stopping() => {
                warn!(%error, "publishing failed while stopping; the message goes back to the queue");
                return None;
            }
            Err(error) => {
                outages += 1;
                let wait = config.backoff_for(outages);
                warn!(%error, wait_s = wait.as_secs_f64(), "publishing failed; holding the message and trying again");
                hold_through(config, counters, pause, std::slice::from_ref(delivery), wait).await;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn settle<H: Handler>(
    queue: &dyn Queue,
    handler: &H,
    config: &WorkerConfig,
    counters: &StageCounters,
    pause: &Pause,
    delivery: Delivery,
    envelope: Envelope,
    result: Result<Outcome, StageError>,
) {
    let attempt = delivery.attempt;
    let stage = handler.stage();
    let quarantine = match result {
        Ok(Outcome::Publish { subject, message_id, payload }) => {
            let published = publish_holding(
                queue,
                config,
                counters,
                pause,
                &delivery,
                (&subject, &message_id, payload.clone()),
            )
            .await;
            if let Some(published) = published {
                if published == Published::Duplicate {
                    info!("an earlier attempt published this study's output first; this attempt's is dropped");
                    handler.superseded(&payload).await;
                }
                handler.finished(&delivery.payload).await;
                counters.processed.fetch_add(1, Ordering::Relaxed);
                log_settle_error(delivery.ack().await);
                return;
            }
            counters.retried.fetch_add(1, Ordering::Relaxed);
            log_settle_error(delivery.nak(Duration::from_millis(500)).await);
            return;
        }
        Ok(Outcome::Quarantine(record)) => record,
        Ok(Outcome::InputGone { output_id, mut record }) => {
            record.attempts = attempt;
            let payload =
                Bytes::from(serde_json::to_vec(&record).expect("quarantine record serializes"));
            let subject = subjects::quarantine(&config.campaign);
            match publish_holding(
                queue,
                config,
                counters,
                pause,
                &delivery,
                (&subject, &output_id, payload),
            )
            .await
            {
                Some(Published::Duplicate) => {
                    info!("its data is gone, released by an earlier attempt that published its output; settled");
                    // That attempt may have died part-way through releasing it.
                    handler.finished(&delivery.payload).await;
                    counters.processed.fetch_add(1, Ordering::Relaxed);
                    log_settle_error(delivery.ack().await);
                }
                Some(Published::New) => {
                    warn!(reason = %record.reason, "quarantined");
                    settle_quarantined(handler, counters, delivery).await;
                }
                None => {
                    counters.retried.fetch_add(1, Ordering::Relaxed);
                    log_settle_error(delivery.nak(Duration::from_millis(500)).await);
                }
            }
            return;
        }
        // Only while stopping: an outage hands the message back, whatever its attempt.
        Err(error) if error.is_infrastructure() => {
            warn!(reason = %error.reason, "stopping during an outage; the message goes back to the queue");
            counters.retried.fetch_add(1, Ordering::Relaxed);
            log_settle_error(delivery.nak(Duration::from_millis(500)).await);
            return;
        }
        Err(error) if error.is_retryable() && attempt < config.max_deliver => {
            // The detail may name object keys (folder names can be patients'): it goes
            // to the quarantine table if the message is given up, not to the log.
            warn!(reason = %error.reason, "retryable failure, will retry");
            counters.retried.fetch_add(1, Ordering::Relaxed);
            log_settle_error(delivery.nak(config.backoff_for(attempt)).await);
            return;
        }
        Err(error) => {
            let reason = if error.is_retryable() {
                format!("gave up after {attempt} attempts: {}", error.reason)
            } else {
                error.reason.clone()
            };
            envelope.quarantine_record(&config.campaign, stage, reason, error.detail, attempt)
        }
    };
    warn!(reason = %quarantine.reason, "quarantined");
    let message_id = quarantine.message_id();
    let payload =
        Bytes::from(serde_json::to_vec(&quarantine).expect("quarantine record serializes"));
    let subject = subjects::quarantine(&config.campaign);
    if publish_holding(queue, config, counters, pause, &delivery, (&subject, &message_id, payload))
        .await
        .is_some()
    {
        settle_quarantined(handler, counters, delivery).await;
        return;
    }
    log_settle_error(delivery.nak(Duration::from_millis(500)).await);
}

/// Settles a message whose quarantine record went out. Terminated first, then its data
/// released: a quarantined message is not delivered again, so nothing comes back to find
/// its data gone.
async fn settle_quarantined<H: Handler>(handler: &H, counters: &StageCounters, delivery: Delivery) {
    counters.quarantined.fetch_add(1, Ordering::Relaxed);
    let payload = delivery.payload.clone();
    if log_settle_error(delivery.term().await) {
        handler.finished(&payload).await;
    }
}

/// Logs a failed settlement; returns whether it went through.
fn log_settle_error(result: Result<(), QueueError>) -> bool {
    match result {
        Ok(()) => true,
        Err(error) => {
            warn!(%error, "settling a message failed; it will be redelivered");
            false
        }
    }
}

/// The few fields every stage message has, read without knowing its type, so that
/// even an unreadable message can be quarantined under its study.
#[derive(Debug, Default)]
pub struct Envelope {
    pub study_key: Option<String>,
    pub site_id: Option<String>,
    /// The study's object keys, when the message still lists them (ingest → preprocess).
    pub inputs: Vec<String>,
    /// The study's requeue generation.
    pub generation: u32,
    /// For a message without a study key (not JSON, or not a study message): a digest
    /// of its bytes, so that two different unreadable messages get two records.
    pub unreadable_digest: Option<String>,
}

fn digest(payload: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(payload)[..12])
}

impl Envelope {
    pub fn peek(payload: &[u8]) -> Envelope {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return Envelope { unreadable_digest: Some(digest(payload)), ..Envelope::default() };
        };
        let field = |name: &str| {
            value.pointer(&format!("/context/{name}")).and_then(|v| v.as_str()).map(str::to_string)
        };
        let inputs = value
            .pointer("/slices")
            .and_then(|slices| slices.as_array())
            .map(|slices| {
                slices.iter().filter_map(|s| s.get("key")?.as_str().map(str::to_string)).collect()
            })
            .unwrap_or_default();
        let study_key = field("study_key");
        let unreadable_digest = study_key.is_none().then(|| digest(payload));
        let generation =
            value.pointer("/context/generation").and_then(|g| g.as_u64()).unwrap_or(0) as u32;
        Envelope { study_key, site_id: field("site_id"), inputs, generation, unreadable_digest }
    }

    pub fn quarantine_record(
        &self,
        campaign: &str,
        stage: Stage,
        reason: String,
        detail: String,
        attempts: u32,
    ) -> QuarantineRecord {
        let unreadable =
            format!("unreadable message {}", self.unreadable_digest.as_deref().unwrap_or("-"));
        QuarantineRecord {
            campaign: campaign.to_string(),
            stage,
            input: self.study_key.clone().unwrap_or(unreadable),
            inputs: self.inputs.clone(),
            study_key: self.study_key.clone(),
            site_id: self.site_id.clone(),
            reason,
            detail,
            attempts,
            at: OffsetDateTime::now_utc(),
            generation: self.generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::MemoryQueue;
    use std::sync::atomic::AtomicU32;

    /// Fails with a retryable error a set number of times per message, then publishes.
    struct Flaky {
        failures_before_success: u32,
        calls: AtomicU32,
        permanent_for: &'static str,
    }

    /// The store is down for the first `outage_calls` calls, then everything works;
    /// records the attempt of every delivery it saw.
    struct Outage {
        outage_calls: u32,
        calls: AtomicU32,
        sleep: Duration,
    }

    #[async_trait]
    impl Handler for Outage {
        fn stage(&self) -> Stage {
            Stage::Preprocess
        }

        async fn handle_batch(&self, payloads: Vec<Bytes>) -> Vec<Result<Outcome, StageError>> {
            tokio::time::sleep(self.sleep).await;
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            payloads
                .into_iter()
                .map(|payload| {
                    if call < self.outage_calls {
                        return Err(StageError::infrastructure(
                            "object store error",
                            "connection refused",
                        ));
                    }
                    let id = String::from_utf8_lossy(&payload).to_string();
                    Ok(Outcome::Publish { subject: "out".into(), message_id: id, payload })
                })
                .collect()
        }
    }

    /// Publishes "<input>-output" under the input's id; records what it was told.
    #[derive(Default)]
    struct Recording {
        superseded: std::sync::Mutex<Vec<Bytes>>,
        finished: std::sync::Mutex<Vec<Bytes>>,
    }

    #[async_trait]
    impl Handler for Recording {
        fn stage(&self) -> Stage {
            Stage::Preprocess
        }

        async fn handle_batch(&self, payloads: Vec<Bytes>) -> Vec<Result<Outcome, StageError>> {
            payloads
                .into_iter()
                .map(|payload| {
                    let id = String::from_utf8_lossy(&payload).to_string();
                    let output = Bytes::from(format!("{id}-output"));
                    Ok(Outcome::Publish { subject: "out".into(), message_id: id, payload: output })
                })
                .collect()
        }

        async fn finished(&self, payload: &Bytes) {
            self.finished.lock().unwrap().push(payload.clone());
        }

        async fn superseded(&self, output: &Bytes) {
            self.superseded.lock().unwrap().push(output.clone());
        }
    }

    /// A worker killed after publishing "b"'s output, before acking: "b" comes again, its
    /// new output is dropped as a duplicate, and the handler hears of exactly that output.
    #[tokio::test]
    async fn an_output_dropped_as_a_duplicate_is_handed_back_to_the_handler() {
        let queue = MemoryQueue::new();
        let earlier = queue.publish("out", "b", Bytes::from_static(b"b-earlier")).await.unwrap();
        assert_eq!(earlier, Published::New);
        for input in ["a", "b"] {
            queue.publish("in", input, Bytes::from(input)).await.unwrap();
        }
        queue.close("in").await;
        let handler = Arc::new(Recording::default());
        let dyn_queue: Arc<dyn Queue> = Arc::new(queue.clone());
        run_worker(
            dyn_queue,
            "in",
            handler.clone(),
            WorkerConfig::new("c", Stage::Preprocess),
            Arc::new(StageCounters::default()),
            std::future::pending(),
        )
        .await
        .unwrap();
        assert_eq!(*handler.superseded.lock().unwrap(), vec![Bytes::from_static(b"b-output")]);
        let mut finished = handler.finished.lock().unwrap().clone();
        finished.sort();
        assert_eq!(finished, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        queue.close("out").await;
        let mut outputs = queue.subscribe("out", "next").await.unwrap();
        let mut read = Vec::new();
        while let Some(delivery) = outputs.next().await {
            let delivery = delivery.unwrap();
            read.push(delivery.payload.clone());
            delivery.ack().await.unwrap();
        }
        read.sort();
        assert_eq!(read, vec![Bytes::from_static(b"a-output"), Bytes::from_static(b"b-earlier")]);
    }

    /// Publishes "<input>-output" while the input's data is in `data`; otherwise says
    /// it is gone. Releases the data when told the input is finished.
    struct Releasing {
        queue: MemoryQueue,
        data: std::sync::Mutex<std::collections::HashSet<String>>,
        /// Messages of "in" not yet settled, seen each time the handler releases one.
        unsettled_at_release: std::sync::Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl Handler for Releasing {
        fn stage(&self) -> Stage {
            Stage::Infer
        }

        async fn handle_batch(&self, payloads: Vec<Bytes>) -> Vec<Result<Outcome, StageError>> {
            payloads
                .into_iter()
                .map(|payload| {
                    let id = String::from_utf8_lossy(&payload).to_string();
                    if self.data.lock().unwrap().contains(&id) {
                        let output = Bytes::from(format!("{id}-output"));
                        return Ok(Outcome::Publish {
                            subject: subjects::scored("c"),
                            message_id: id,
                            payload: output,
                        });
                    }
                    let record = Envelope::peek(&payload).quarantine_record(
                        "c",
                        Stage::Infer,
                        "its data is gone".into(),
                        String::new(),
                        0,
                    );
                    Ok(Outcome::InputGone { output_id: id, record })
                })
                .collect()
        }

        async fn finished(&self, payload: &Bytes) {
            self.data.lock().unwrap().remove(&*String::from_utf8_lossy(payload));
            self.unsettled_at_release.lock().unwrap().push(self.queue.stats("in").in_flight);
        }
    }

    /// A worker releases an input's data after publishing its output and before acking
    /// it. "b" stands for a worker killed in between: its output is in the queue and its
    /// data gone; redelivered, it is settled without a second output or a quarantine.
    /// "c"'s data was lost with nothing published: it is quarantined, with its attempt.
    #[tokio::test]
    async fn data_released_before_the_ack_settles_a_redelivery_and_quarantines_a_loss() {
        let queue = MemoryQueue::new();
        queue.publish(&subjects::scored("c"), "b", Bytes::from_static(b"b-output")).await.unwrap();
        for input in ["a", "b", "c"] {
            queue.publish("in", input, Bytes::from(input)).await.unwrap();
        }
        queue.close("in").await;
        let handler = Arc::new(Releasing {
            queue: queue.clone(),
            data: std::sync::Mutex::new(["a".to_string()].into()),
            unsettled_at_release: Default::default(),
        });
        let mut config = WorkerConfig::new("c", Stage::Infer);
        config.concurrency = 1;
        let counters = Arc::new(StageCounters::default());
        let dyn_queue: Arc<dyn Queue> = Arc::new(queue.clone());
        run_worker(
            dyn_queue,
            "in",
            handler.clone(),
            config,
            counters.clone(),
            std::future::pending(),
        )
        .await
        .unwrap();
        // "a" and "b" released while still unsettled, "c" after its term.
        assert_eq!(*handler.unsettled_at_release.lock().unwrap(), vec![1, 1, 0]);
        assert_eq!(counters.snapshot(), (2, 1, 0));
        assert_eq!(queue.stats(&subjects::scored("c")).published, 2);
        let subject = subjects::quarantine("c");
        queue.close(&subject).await;
        let mut quarantined = queue.subscribe(&subject, "aggregate").await.unwrap();
        let mut records = Vec::new();
        while let Some(delivery) = quarantined.next().await {
            let delivery = delivery.unwrap();
            records.push(serde_json::from_slice::<QuarantineRecord>(&delivery.payload).unwrap());
            delivery.ack().await.unwrap();
        }
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!((records[0].reason.as_str(), records[0].attempts), ("its data is gone", 1));
    }

    #[tokio::test]
    async fn an_outage_holds_the_work_without_spending_attempts() {
        let queue = MemoryQueue::new();
        for input in ["a", "b"] {
            let payload = format!(r#"{{"context":{{"study_key":"{input}","site_id":"S1"}}}}"#);
            queue.publish("in", input, Bytes::from(payload)).await.unwrap();
        }
        queue.close("in").await;
        let mut config = WorkerConfig::new("c", Stage::Preprocess);
        config.max_deliver = 2;
        config.backoff = vec![Duration::from_millis(5)];
        let readiness = Arc::new(crate::metrics::Readiness::default());
        readiness.set(true);
        config.readiness = Some(readiness.clone());
        let counters = Arc::new(StageCounters::default());
        let handler =
            Arc::new(Outage { outage_calls: 6, calls: AtomicU32::new(0), sleep: Duration::ZERO });
        let dyn_queue: Arc<dyn Queue> = Arc::new(queue.clone());
        let worker = tokio::spawn(run_worker(
            dyn_queue,
            "in",
            handler.clone(),
            config,
            counters.clone(),
            std::future::pending(),
        ));
        // While the outage lasts the service says it is not ready, and why.
        let mut saw_not_ready = false;
        while !worker.is_finished() {
            saw_not_ready |= !readiness.get() && readiness.why_not().contains("work is held");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        worker.await.unwrap().unwrap();
        assert!(saw_not_ready);
        assert!(readiness.get(), "ready again after the outage");
        // Six failed calls against max_deliver 2: both published, none quarantined, and
        // no delivery past the first (nothing was handed back to the queue).
        assert_eq!(queue.stats("out").published, 2);
        assert_eq!(counters.snapshot(), (2, 0, 0));
        assert_eq!(counters.redelivered.load(Ordering::SeqCst), 0);
        assert!(handler.calls.load(Ordering::SeqCst) >= 7);
    }

    #[tokio::test]
    async fn a_shutdown_during_an_outage_hands_the_work_back() {
        let queue = MemoryQueue::new();
        queue
            .publish("in", "a", Bytes::from_static(br#"{"context":{"study_key":"a"}}"#))
            .await
            .unwrap();
        let mut config = WorkerConfig::new("c", Stage::Preprocess);
        config.backoff = vec![Duration::from_millis(20)];
        config.drain_deadline = Duration::from_secs(5);
        let counters = Arc::new(StageCounters::default());
        let handler = Arc::new(Outage {
            outage_calls: u32::MAX,
            calls: AtomicU32::new(0),
            sleep: Duration::ZERO,
        });
        let dyn_queue: Arc<dyn Queue> = Arc::new(queue.clone());
        // An async block, as the services' shutdown is (one that must not be polled again
        // once it has resolved).
        let shutdown = async { tokio::time::sleep(Duration::from_millis(300)).await };
        let started = std::time::Instant::now();
        run_worker(dyn_queue, "in", handler, config, counters.clone(), shutdown).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "stopped without waiting out the drain deadline"
        );
        // Handed back for another worker: not quarantined, not lost.
        assert_eq!(counters.snapshot(), (0, 0, 1));
        assert_eq!(queue.stats(&subjects::quarantine("c")).published, 0);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(queue.stats("in").pending, 1, "back in the queue");
    }

    #[tokio::test]
    async fn a_handler_past_its_limit_is_abandoned_and_retried() {
        let queue = MemoryQueue::new();
        queue
            .publish("in", "slow", Bytes::from_static(br#"{"context":{"study_key":"slow"}}"#))
            .await
            .unwrap();
        queue.close("in").await;
        let mut config = WorkerConfig::new("c", Stage::Preprocess);
        config.max_deliver = 2;
        config.backoff = vec![Duration::from_millis(1)];
        config.handler_timeout = Duration::from_millis(50);
        let counters = Arc::new(StageCounters::default());
        let handler = Arc::new(Outage {
            outage_calls: 0,
            calls: AtomicU32::new(0),
            sleep: Duration::from_secs(5),
        });
        let dyn_queue: Arc<dyn Queue> = Arc::new(queue.clone());
        run_worker(dyn_queue, "in", handler, config, counters.clone(), std::future::pending())
            .await
            .unwrap();
        assert_eq!(counters.timed_out.load(Ordering::SeqCst), 2);
        assert_eq!(counters.snapshot(), (0, 1, 1));
        assert_eq!(counters.wedged(), None, "two abandoned runs are not yet a wedged worker");
        let mut quarantine = queue.subscribe(&subjects::quarantine("c"), "t").await.unwrap();
        queue.close(&subjects::quarantine("c")).await;
        let record: QuarantineRecord =
            serde_json::from_slice(&quarantine.next().await.unwrap().unwrap().payload).unwrap();
        assert_eq!(
            record.reason,
            "gave up after 2 attempts: the stage ran past its limit of 0.05 s"
        );
    }

    /// Three runs past the limit in a row, with no run finishing: wedged, until one finishes.
    #[tokio::test]
    async fn a_worker_whose_handlers_keep_hanging_is_wedged_until_one_finishes() {
        let queue = MemoryQueue::new();
        for id in ["a", "b", "c"] {
            let payload = Bytes::from(format!(r#"{{"context":{{"study_key":"{id}"}}}}"#));
            queue.publish("in", id, payload).await.unwrap();
        }
        queue.close("in").await;
        let mut config = WorkerConfig::new("c", Stage::Preprocess);
        config.max_deliver = 1;
        config.handler_timeout = Duration::from_millis(50);
        let counters = Arc::new(StageCounters::default());
        let handler = Arc::new(Outage {
            outage_calls: 0,
            calls: AtomicU32::new(0),
            sleep: Duration::from_secs(5),
        });
        let dyn_queue: Arc<dyn Queue> = Arc::new(queue.clone());
        run_worker(
            dyn_queue,
            "in",
            handler,
            config.clone(),
            counters.clone(),
            std::future::pending(),
        )
        .await
        .unwrap();
        let why = counters.wedged().expect("wedged after three abandoned runs");
        assert!(why.contains("last 3 handler runs"), "{why}");

        queue
            .publish("in2", "d", Bytes::from_static(br#"{"context":{"study_key":"d"}}"#))
            .await
            .unwrap();
        queue.close("in2").await;
        let quick =
            Arc::new(Outage { outage_calls: 0, calls: AtomicU32::new(0), sleep: Duration::ZERO });
        let dyn_queue: Arc<dyn Queue> = Arc::new(queue.clone());
        run_worker(dyn_queue, "in2", quick, config, counters.clone(), std::future::pending())
            .await
            .unwrap();
        assert_eq!(counters.wedged(), None);
    }

    #[test]
    fn unreadable_messages_get_records_of_their_own() {
        let record = |payload: &[u8]| {
            Envelope::peek(payload).quarantine_record(
                "c",
                Stage::Aggregate,
                "unreadable".into(),
                String::new(),
                1,
            )
        };
        let (a, b) = (record(b"\x00garbage"), record(b"other garbage"));
        assert_ne!(a.message_id(), b.message_id());
        assert!(a.input.starts_with("unreadable message "), "{}", a.input);
        assert_eq!(
            record(b"\x00garbage").message_id(),
            a.message_id(),
            "the same bytes, the same record"
        );
        let study = br#"{"context":{"study_key":"k1","site_id":"S"},"slices":[{"key":"a/1.dcm"},{"key":"a/2.dcm"}]}"#;
        let with_keys = record(study);
        assert_eq!((with_keys.input.as_str(), with_keys.inputs.len()), ("k1", 2));
    }

    #[async_trait]
    impl Handler for Flaky {
        fn stage(&self) -> Stage {
            Stage::Preprocess
        }

        async fn handle_batch(&self, payloads: Vec<Bytes>) -> Vec<Result<Outcome, StageError>> {
            payloads
                .into_iter()
                .map(|payload| {
                    let text = String::from_utf8_lossy(&payload).to_string();
                    if text.contains(self.permanent_for) {
                        return Err(StageError::permanent("bad input", "the test said so"));
                    }
                    let call = self.calls.fetch_add(1, Ordering::SeqCst);
                    if call < self.failures_before_success {
                        return Err(StageError::retryable("store unavailable", "try later"));
                    }
                    Ok(Outcome::Publish {
                        subject: "out".into(),
                        message_id: text.clone(),
                        payload,
                    })
                })
                .collect()
        }
    }

    async fn run(
        handler: Flaky,
        inputs: &[&str],
        max_deliver: u32,
    ) -> (MemoryQueue, Arc<StageCounters>) {
        let queue = MemoryQueue::new();
        for input in inputs {
            let payload = format!(r#"{{"context":{{"study_key":"{input}","site_id":"S1"}}}}"#);
            queue.publish("in", input, Bytes::from(payload)).await.unwrap();
        }
        queue.close("in").await;
        let mut config = WorkerConfig::new("c", Stage::Preprocess);
        config.max_deliver = max_deliver;
        config.backoff = vec![Duration::from_millis(1)];
        let counters = Arc::new(StageCounters::default());
        let dyn_queue: Arc<dyn Queue> = Arc::new(queue.clone());
        run_worker(
            dyn_queue,
            "in",
            Arc::new(handler),
            config,
            counters.clone(),
            std::future::pending(),
        )
        .await
        .unwrap();
        (queue, counters)
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_then_published() {
        let handler =
            Flaky { failures_before_success: 2, calls: AtomicU32::new(0), permanent_for: "never" };
        let (queue, counters) = run(handler, &["a"], 5).await;
        assert_eq!(queue.stats("out").published, 1);
        assert_eq!(counters.snapshot(), (1, 0, 2));
    }

    #[tokio::test]
    async fn exhausted_retries_are_quarantined_with_the_attempt_count() {
        let handler = Flaky {
            failures_before_success: 100,
            calls: AtomicU32::new(0),
            permanent_for: "never",
        };
        let (queue, counters) = run(handler, &["a"], 3).await;
        assert_eq!(queue.stats("out").published, 0);
        assert_eq!(counters.snapshot(), (0, 1, 2));
        let mut quarantine = queue.subscribe(&subjects::quarantine("c"), "t").await.unwrap();
        let delivery = quarantine.next().await.unwrap().unwrap();
        let record: QuarantineRecord = serde_json::from_slice(&delivery.payload).unwrap();
        assert_eq!(record.reason, "gave up after 3 attempts: store unavailable");
        assert_eq!(record.study_key.as_deref(), Some("a"));
        assert_eq!(record.attempts, 3);
    }

    #[tokio::test]
    async fn a_message_delivered_past_the_limit_is_quarantined_unhandled() {
        let queue = MemoryQueue::new();
        let payload = Bytes::from(r#"{"context":{"study_key":"crashy","site_id":"S1"}}"#);
        let settle = Box::new(NoSettle);
        let delivery = Delivery::new(payload, 4, settle);
        let handler =
            Flaky { failures_before_success: 0, calls: AtomicU32::new(0), permanent_for: "never" };
        let mut config = WorkerConfig::new("c", Stage::Preprocess);
        config.max_deliver = 3;
        let counters = StageCounters::default();
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        handle_batch(&queue, &handler, &config, &counters, &Pause::default(), vec![delivery]).await;
        assert_eq!(handler.calls.load(Ordering::SeqCst), 0, "the handler never sees it");
        assert_eq!(counters.snapshot(), (0, 1, 0));
        queue.close(&subjects::quarantine("c")).await;
        let mut quarantine = queue.subscribe(&subjects::quarantine("c"), "t").await.unwrap();
        let record: QuarantineRecord =
            serde_json::from_slice(&quarantine.next().await.unwrap().unwrap().payload).unwrap();
        assert!(
            record.reason.starts_with("gave up after 3 attempts: no worker finished it"),
            "{}",
            record.reason
        );
        assert_eq!(record.study_key.as_deref(), Some("crashy"));
    }

    struct NoSettle;

    #[async_trait]
    impl crate::queue::Settle for NoSettle {
        async fn settle(self: Box<Self>, _: crate::queue::Settlement) -> Result<(), QueueError> {
            Ok(())
        }
        async fn progress(&self) -> Result<(), QueueError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn permanent_errors_are_quarantined_at_once_and_others_go_on() {
        let handler =
            Flaky { failures_before_success: 0, calls: AtomicU32::new(0), permanent_for: "poison" };
        let (queue, counters) = run(handler, &["a", "poison", "b"], 5).await;
        assert_eq!(queue.stats("out").published, 2);
        assert_eq!(counters.snapshot(), (2, 1, 0));
    }
}
