//! Messages too large for the broker travel by reference ("claim check").
//!
//! NATS refuses a message over its `max_payload` (1 MiB by default); a study of 2,000
//! slices with long object keys, or the quarantine record of such a study listing every
//! key, can be larger. [`LargePayloads`] wraps a queue: a payload over `limit` bytes is
//! written to the store under its message id and digest and a small reference is
//! published in its place; a subscriber gets the original bytes back, and the stored copy
//! is deleted once the message is acked or terminated. Every publish stores its own copy,
//! so a repeat whose reference the queue drops as a duplicate (a retry, or a scan made
//! again within the duplicate window, byte for byte the same) deletes that copy and never
//! the one the queued reference names. Stages never see the difference.
//!
//! A publish that fails after its copy is stored leaves the copy: the broker may have
//! taken the reference and lost only its acknowledgement, and a reference without its
//! copy would quarantine a study. The warning names the copy's key.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::{Delivery, Published, Queue, QueueError, Settle, Settlement, Subscription};
use crate::store::{unique_suffix, Store, StoreErrorKind};

/// What is published in place of a large payload.
#[derive(Debug, Serialize, Deserialize)]
struct PayloadRef {
    /// Key of the payload in the store.
    panscreen_payload_ref: String,
    bytes: usize,
    sha256: String,
}

/// A queue whose large messages go through `store`.
pub struct LargePayloads {
    inner: Arc<dyn Queue>,
    store: Store,
    limit: usize,
}

/// NATS' default `max_payload` is 1 MiB; half of it leaves room for headers and for a
/// server configured lower.
pub const DEFAULT_LIMIT: usize = 512 * 1024;

impl LargePayloads {
    pub fn new(inner: Arc<dyn Queue>, store: Store, limit: usize) -> LargePayloads {
        LargePayloads { inner, store, limit }
    }
}

/// The key of one publish's copy: the message id's digest (no patient data) and a part of
/// its own, so that no two publishes share a copy, whatever their bytes.
fn reference_key(message_id: &str) -> String {
    format!("{}.{}.msg", hex::encode(Sha256::digest(message_id.as_bytes())), unique_suffix())
}

#[async_trait]
impl Queue for LargePayloads {
    async fn publish(
        &self,
        subject: &str,
        message_id: &str,
        payload: Bytes,
    ) -> Result<Published, QueueError> {
        if payload.len() <= self.limit {
            return self.inner.publish(subject, message_id, payload).await;
        }
        let sha256 = hex::encode(Sha256::digest(&payload));
        let key = reference_key(message_id);
        let reference =
            PayloadRef { panscreen_payload_ref: key.clone(), bytes: payload.len(), sha256 };
        self.store.put(&key, payload).await.map_err(|error| QueueError::PublishFailed {
            subject: subject.to_string(),
            detail: format!("storing a large message by reference: {error}"),
        })?;
        let body = Bytes::from(serde_json::to_vec(&reference).expect("a reference serializes"));
        let published = match self.inner.publish(subject, message_id, body).await {
            Ok(published) => published,
            Err(error) => {
                warn!(%key, "a large message's publish failed; its stored copy is kept");
                return Err(error);
            }
        };
        if published == Published::Duplicate {
            if let Err(error) = self.store.delete_if_present(&key).await {
                warn!(%error, "a duplicate large message's stored copy was not deleted");
            }
        }
        Ok(published)
    }

    async fn subscribe(
        &self,
        subject: &str,
        consumer: &str,
    ) -> Result<Box<dyn Subscription>, QueueError> {
        let inner = self.inner.subscribe(subject, consumer).await?;
        Ok(Box::new(LargeSubscription { inner, store: self.store.clone() }))
    }

    async fn close(&self, subject: &str) {
        self.inner.close(subject).await
    }
}

struct LargeSubscription {
    inner: Box<dyn Subscription>,
    store: Store,
}

/// The reference in `payload`, if it is one (references are small JSON objects).
fn reference(payload: &[u8]) -> Option<PayloadRef> {
    if payload.len() > 1024 || !payload.starts_with(b"{\"panscreen_payload_ref\"") {
        return None;
    }
    serde_json::from_slice(payload).ok()
}

#[async_trait]
impl Subscription for LargeSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let delivery = match self.inner.next().await? {
            Ok(delivery) => delivery,
            Err(error) => return Some(Err(error)),
        };
        let Some(reference) = reference(&delivery.payload) else {
            return Some(Ok(delivery));
        };
        // The store may be down for a while: keep the message ours (in-progress acks)
        // and try again, so that an outage spends none of its delivery attempts.
        let mut pause = Duration::from_millis(250);
        let payload = loop {
            match self.store.get(&reference.panscreen_payload_ref).await {
                Ok(bytes) if hex::encode(Sha256::digest(&bytes)) == reference.sha256 => {
                    break Some(bytes)
                }
                Ok(_) => {
                    warn!(key = %reference.panscreen_payload_ref, "a stored message does not match its reference");
                    break None;
                }
                Err(error) if error.kind() == StoreErrorKind::Unavailable => {
                    warn!(%error, "fetching a large message failed; trying again");
                    let _ = delivery.progress().await;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
                Err(error) => {
                    warn!(%error, "a large message's stored payload cannot be read");
                    break None;
                }
            }
        };
        let Delivery { payload: pointer, attempt, settle } = delivery;
        // A payload that cannot be had stays the reference: the stage cannot read it and
        // quarantines it as an unreadable message, with the reference in the record.
        let payload = payload.unwrap_or(pointer);
        let settle = Box::new(LargeSettle {
            inner: settle,
            store: self.store.clone(),
            key: reference.panscreen_payload_ref,
        });
        Some(Ok(Delivery::new(payload, attempt, settle)))
    }

    async fn drain(&mut self) {
        self.inner.drain().await
    }
}

struct LargeSettle {
    inner: Box<dyn Settle>,
    store: Store,
    key: String,
}

#[async_trait]
impl Settle for LargeSettle {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        let LargeSettle { inner, store, key } = *self;
        inner.settle(settlement).await?;
        if matches!(settlement, Settlement::Ack | Settlement::Term) {
            if let Err(error) = store.delete_if_present(&key).await {
                warn!(%error, "a settled large message's stored copy was not deleted");
            }
        }
        Ok(())
    }

    async fn progress(&self) -> Result<(), QueueError> {
        self.inner.progress().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::MemoryQueue;
    use crate::store::OpenMode;

    #[tokio::test]
    async fn large_payloads_travel_by_reference_and_are_deleted_when_acked() {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        let memory = MemoryQueue::new();
        let queue = LargePayloads::new(Arc::new(memory.clone()), store.clone(), 1000);
        let big = Bytes::from(vec![b'x'; 5000]);
        queue.publish("s", "big", big.clone()).await.unwrap();
        queue.publish("s", "small", Bytes::from_static(b"tiny")).await.unwrap();
        queue.close("s").await;
        assert_eq!(store.list("").await.unwrap().len(), 1, "the large one is stored");
        let mut subscription = queue.subscribe("s", "c").await.unwrap();
        let first = subscription.next().await.unwrap().unwrap();
        assert_eq!(first.payload, big);
        first.ack().await.unwrap();
        assert!(store.list("").await.unwrap().is_empty(), "deleted once acked");
        let second = subscription.next().await.unwrap().unwrap();
        assert_eq!(&second.payload[..], b"tiny");
        second.ack().await.unwrap();
        assert!(subscription.next().await.is_none());
    }

    #[tokio::test]
    async fn a_nak_keeps_the_stored_payload_for_the_next_delivery() {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        let queue = LargePayloads::new(Arc::new(MemoryQueue::new()), store.clone(), 10);
        let big = Bytes::from(vec![b'y'; 100]);
        queue.publish("s", "big", big.clone()).await.unwrap();
        queue.close("s").await;
        let mut subscription = queue.subscribe("s", "c").await.unwrap();
        subscription.next().await.unwrap().unwrap().nak(Duration::from_millis(1)).await.unwrap();
        let again = subscription.next().await.unwrap().unwrap();
        assert_eq!((again.payload.clone(), again.attempt), (big, 2));
        again.term().await.unwrap();
        assert!(store.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_retry_with_other_bytes_leaves_the_first_copy_whole() {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        let queue = LargePayloads::new(Arc::new(MemoryQueue::new()), store.clone(), 10);
        let first = Bytes::from(vec![b'a'; 100]);
        let retry = Bytes::from(vec![b'b'; 100]);
        assert_eq!(queue.publish("s", "same", first.clone()).await.unwrap(), Published::New);
        assert_eq!(queue.publish("s", "same", retry).await.unwrap(), Published::Duplicate);
        queue.close("s").await;
        assert_eq!(store.list("").await.unwrap().len(), 1, "the retry's copy is deleted");
        let mut subscription = queue.subscribe("s", "c").await.unwrap();
        let delivery = subscription.next().await.unwrap().unwrap();
        assert_eq!(delivery.payload, first, "the queued reference still finds its bytes");
        delivery.ack().await.unwrap();
        assert!(store.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_repeat_with_the_same_bytes_leaves_the_first_copy_whole() {
        // An ingest that scans again within the duplicate window publishes the same
        // study message, byte for byte, under the same id.
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        let queue = LargePayloads::new(Arc::new(MemoryQueue::new()), store.clone(), 10);
        let message = Bytes::from(vec![b'c'; 100]);
        assert_eq!(queue.publish("s", "same", message.clone()).await.unwrap(), Published::New);
        assert_eq!(
            queue.publish("s", "same", message.clone()).await.unwrap(),
            Published::Duplicate
        );
        queue.close("s").await;
        assert_eq!(store.list("").await.unwrap().len(), 1, "one copy, the queued one's");
        let mut subscription = queue.subscribe("s", "c").await.unwrap();
        let delivery = subscription.next().await.unwrap().unwrap();
        assert_eq!(delivery.payload, message, "the queued reference still finds its bytes");
        delivery.ack().await.unwrap();
        assert!(store.list("").await.unwrap().is_empty());
    }
}
