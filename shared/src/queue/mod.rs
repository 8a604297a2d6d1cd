//! The work queue between stages.
//!
//! Semantics follow JetStream work-queue streams, so the same stage code runs on
//! either implementation:
//! - `publish` carries a deterministic message id; a second publish with the same id
//!   is dropped (JetStream's duplicate window), and the publisher is told so.
//! - a subscription is a shared durable consumer: each message goes to one subscriber.
//! - each delivery is acked, nak'd (redelivered after a delay, attempt + 1) or
//!   terminated (never redelivered).
//!
//! [`MemoryQueue`] is the embedded default: in-process, nothing to install. A subject
//! can be closed by its producers; a subscription then ends once nothing is pending
//! or in flight, which is how the embedded pipeline knows a stage is finished.
//! [`jetstream::JetStreamQueue`] is the distributed one. [`conformance`] holds the
//! behaviour both must show, as plain async functions each implementation's tests call.

pub mod conformance;
pub mod jetstream;
pub mod large;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("publish to {subject} was not acknowledged: {detail}")]
    PublishFailed { subject: String, detail: String },
}

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The queue holds the message.
    New,
    /// A message with this id was published before (by an earlier attempt at the same
    /// work); this one was dropped, and the earlier one is what consumers get.
    Duplicate,
}

/// One delivered message and the means to settle it.
pub struct Delivery {
    pub payload: Bytes,
    /// 1 on first delivery.
    pub attempt: u32,
    settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("bytes", &self.payload.len())
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Delivery {
    pub fn new(payload: Bytes, attempt: u32, settle: Box<dyn Settle>) -> Self {
        Delivery { payload, attempt, settle }
    }

    /// The side effect is durable: never deliver again.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.settle.settle(Settlement::Ack).await
    }

    /// Try again after `delay`.
    pub async fn nak(self, delay: Duration) -> Result<(), QueueError> {
        self.settle.settle(Settlement::Nak(delay)).await
    }

    /// Give up on this message for good (it was quarantined).
    pub async fn term(self) -> Result<(), QueueError> {
        self.settle.settle(Settlement::Term).await
    }

    /// Still working: reset the redelivery timer.
    pub async fn progress(&self) -> Result<(), QueueError> {
        self.settle.progress().await
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Settlement {
    Ack,
    Nak(Duration),
    Term,
}

/// How a queue implementation settles one delivery.
#[async_trait]
pub trait Settle: Send + Sync {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), QueueError>;
    async fn progress(&self) -> Result<(), QueueError>;
}

#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; `None` once the subject is closed and drained.
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>>;

    /// Hands back at once what was fetched but not taken (the subscriber is stopping),
    /// instead of letting it wait out the queue's ack wait.
    async fn drain(&mut self) {}
}

#[async_trait]
pub trait Queue: Send + Sync {
    /// Publishes and waits until the queue holds the message. Duplicate ids are dropped
    /// (and said to be), across all the subjects of a campaign (`panscreen.<campaign>.…`,
    /// one JetStream stream): a stage can ask whether an output went out by publishing
    /// something else under its id.
    async fn publish(
        &self,
        subject: &str,
        message_id: &str,
        payload: Bytes,
    ) -> Result<Published, QueueError>;

    /// Joins the shared consumer `consumer` on `subject`.
    async fn subscribe(
        &self,
        subject: &str,
        consumer: &str,
    ) -> Result<Box<dyn Subscription>, QueueError>;

    /// Tells the queue no more messages will be published on `subject` (embedded runs).
    /// Queues that run forever (JetStream) ignore it.
    async fn close(&self, _subject: &str) {}
}

/// In-process queue: the embedded default.
#[derive(Default, Clone)]
pub struct MemoryQueue {
    subjects: Arc<Mutex<HashMap<String, Arc<SubjectState>>>>,
    /// Message ids published, by deduplication scope ([`dedup_scope`]).
    seen_ids: Arc<Mutex<HashSet<(String, String)>>>,
}

/// The subjects that share message ids, as one JetStream stream does: a subject's first
/// two tokens (`panscreen.<campaign>`), or the whole of a shorter subject.
fn dedup_scope(subject: &str) -> &str {
    match subject.match_indices('.').nth(1) {
        Some((end, _)) => &subject[..end],
        None => subject,
    }
}

#[derive(Default)]
struct SubjectState {
    inner: Mutex<SubjectInner>,
    changed: Notify,
}

#[derive(Default)]
struct SubjectInner {
    pending: VecDeque<(Bytes, u32)>,
    in_flight: usize,
    closed: bool,
    published: u64,
}

/// Counts for one subject, for progress reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubjectStats {
    pub published: u64,
    pub pending: usize,
    pub in_flight: usize,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn subject(&self, name: &str) -> Arc<SubjectState> {
        let mut subjects = self.subjects.lock().expect("queue lock poisoned");
        subjects.entry(name.to_string()).or_default().clone()
    }

    pub fn stats(&self, subject: &str) -> SubjectStats {
        let state = self.subject(subject);
        let inner = state.inner.lock().expect("queue lock poisoned");
        SubjectStats {
            published: inner.published,
            pending: inner.pending.len(),
            in_flight: inner.in_flight,
        }
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn publish(
        &self,
        subject: &str,
        message_id: &str,
        payload: Bytes,
    ) -> Result<Published, QueueError> {
        let state = self.subject(subject);
        {
            let mut inner = state.inner.lock().expect("queue lock poisoned");
            if inner.closed {
                return Err(QueueError::PublishFailed {
                    subject: subject.to_string(),
                    detail: "subject is closed".to_string(),
                });
            }
            let key = (dedup_scope(subject).to_string(), message_id.to_string());
            if !self.seen_ids.lock().expect("queue lock poisoned").insert(key) {
                return Ok(Published::Duplicate);
            }
            inner.published += 1;
            inner.pending.push_back((payload, 1));
        }
        state.changed.notify_waiters();
        Ok(Published::New)
    }

    async fn subscribe(
        &self,
        subject: &str,
        _consumer: &str,
    ) -> Result<Box<dyn Subscription>, QueueError> {
        Ok(Box::new(MemorySubscription { state: self.subject(subject) }))
    }

    async fn close(&self, subject: &str) {
        let state = self.subject(subject);
        state.inner.lock().expect("queue lock poisoned").closed = true;
        state.changed.notify_waiters();
    }
}

struct MemorySubscription {
    state: Arc<SubjectState>,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut inner = self.state.inner.lock().expect("queue lock poisoned");
                if let Some((payload, attempt)) = inner.pending.pop_front() {
                    inner.in_flight += 1;
                    let settle = MemorySettle {
                        state: self.state.clone(),
                        payload: payload.clone(),
                        attempt,
                    };
                    return Some(Ok(Delivery::new(payload, attempt, Box::new(settle))));
                }
                if inner.closed && inner.in_flight == 0 {
                    return None;
                }
            }
            changed.await;
        }
    }
}

struct MemorySettle {
    state: Arc<SubjectState>,
    payload: Bytes,
    attempt: u32,
}

#[async_trait]
impl Settle for MemorySettle {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        match settlement {
            Settlement::Ack | Settlement::Term => {
                self.state.inner.lock().expect("queue lock poisoned").in_flight -= 1;
                self.state.changed.notify_waiters();
            }
            Settlement::Nak(delay) => {
                // Stays in flight until it is back in the pending queue, so a closed
                // subject does not end while a redelivery is waiting.
                let MemorySettle { state, payload, attempt } = *self;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    {
                        let mut inner = state.inner.lock().expect("queue lock poisoned");
                        inner.pending.push_back((payload, attempt + 1));
                        inner.in_flight -= 1;
                    }
                    state.changed.notify_waiters();
                });
            }
        }
        Ok(())
    }

    async fn progress(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn duplicate_ids_are_dropped() {
        let queue = MemoryQueue::new();
        let first = queue.publish("s", "a", Bytes::from_static(b"1")).await.unwrap();
        let again = queue.publish("s", "a", Bytes::from_static(b"1")).await.unwrap();
        let other = queue.publish("s", "b", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!((first, again, other), (Published::New, Published::Duplicate, Published::New));
        assert_eq!(queue.stats("s").pending, 2);
    }

    #[tokio::test]
    async fn closed_subject_ends_after_drain() {
        let queue = MemoryQueue::new();
        queue.publish("s", "a", Bytes::from_static(b"1")).await.unwrap();
        queue.close("s").await;
        let mut subscription = queue.subscribe("s", "c").await.unwrap();
        let delivery = subscription.next().await.unwrap().unwrap();
        assert_eq!(&delivery.payload[..], b"1");
        delivery.ack().await.unwrap();
        assert!(subscription.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn nak_redelivers_with_a_higher_attempt() {
        let queue = MemoryQueue::new();
        queue.publish("s", "a", Bytes::from_static(b"1")).await.unwrap();
        queue.close("s").await;
        let mut subscription = queue.subscribe("s", "c").await.unwrap();
        let first = subscription.next().await.unwrap().unwrap();
        assert_eq!(first.attempt, 1);
        first.nak(Duration::from_secs(5)).await.unwrap();
        let second = subscription.next().await.unwrap().unwrap();
        assert_eq!(second.attempt, 2);
        second.term().await.unwrap();
        assert!(subscription.next().await.is_none());
    }

    #[tokio::test]
    async fn publish_after_close_fails() {
        let queue = MemoryQueue::new();
        queue.close("s").await;
        assert!(queue.publish("s", "a", Bytes::new()).await.is_err());
    }
}

#[cfg(test)]
mod conformance_tests {
    use super::*;

    #[tokio::test]
    async fn memory_queue_conforms() {
        conformance::all(&MemoryQueue::new(), "panscreen.test").await;
    }
}
