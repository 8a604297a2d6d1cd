//! What every [`Queue`] must do, as plain async functions. Each implementation's tests
//! call all of them (`MemoryQueue` in this crate, JetStream against a real nats-server
//! in `tests/`). Each function takes a subject prefix of its own, so they can share a
//! queue; a failure panics with what went wrong.

#![allow(clippy::unwrap_used)] // test support: a failed step is a failed test

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;

use super::{Delivery, Published, Queue, Subscription};

const WAIT: Duration = Duration::from_secs(10);

async fn next(subscription: &mut Box<dyn Subscription>) -> Delivery {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the subscription is open")
        .expect("the delivery is readable")
}

async fn nothing_within(subscription: &mut Box<dyn Subscription>, quiet: Duration) {
    if let Ok(Some(delivery)) = tokio::time::timeout(quiet, subscription.next()).await {
        panic!(
            "unexpected delivery: {:?}",
            delivery.map(|d| String::from_utf8_lossy(&d.payload).to_string())
        );
    }
}

/// Published messages arrive once each, first attempt 1, and an acked one is gone.
pub async fn publish_receive_ack(queue: &dyn Queue, prefix: &str) {
    let subject = format!("{prefix}.basic");
    let mut subscription = queue.subscribe(&subject, "conformance-basic").await.unwrap();
    for index in 0..3 {
        queue
            .publish(&subject, &format!("basic-{index}"), Bytes::from(format!("payload {index}")))
            .await
            .unwrap();
    }
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.attempt, 1);
        seen.insert(String::from_utf8_lossy(&delivery.payload).to_string());
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        seen,
        BTreeSet::from(["payload 0".to_string(), "payload 1".to_string(), "payload 2".to_string()])
    );
    nothing_within(&mut subscription, Duration::from_millis(500)).await;
}

/// A second publish with the same message id is dropped, and the publisher is told so.
pub async fn duplicate_ids_are_dropped(queue: &dyn Queue, prefix: &str) {
    let subject = format!("{prefix}.duplicates");
    let mut subscription = queue.subscribe(&subject, "conformance-duplicates").await.unwrap();
    let first = queue.publish(&subject, "same-id", Bytes::from_static(b"first")).await.unwrap();
    let second = queue.publish(&subject, "same-id", Bytes::from_static(b"second")).await.unwrap();
    assert_eq!((first, second), (Published::New, Published::Duplicate));
    let delivery = next(&mut subscription).await;
    assert_eq!(&delivery.payload[..], b"first");
    delivery.ack().await.unwrap();
    nothing_within(&mut subscription, Duration::from_millis(500)).await;
}

/// Message ids are shared by all the subjects under `prefix` (one campaign's).
pub async fn ids_are_shared_across_a_campaigns_subjects(queue: &dyn Queue, prefix: &str) {
    let (one, other) = (format!("{prefix}.shared-ids-one"), format!("{prefix}.shared-ids-other"));
    let first = queue.publish(&one, "shared-id", Bytes::from_static(b"first")).await.unwrap();
    let second = queue.publish(&other, "shared-id", Bytes::from_static(b"second")).await.unwrap();
    assert_eq!((first, second), (Published::New, Published::Duplicate));
    let mut subscription = queue.subscribe(&other, "conformance-shared-ids").await.unwrap();
    nothing_within(&mut subscription, Duration::from_millis(500)).await;
}

/// A nak'd message comes back after its delay with the attempt counted up.
pub async fn nak_redelivers_with_the_next_attempt(queue: &dyn Queue, prefix: &str) {
    let subject = format!("{prefix}.nak");
    let mut subscription = queue.subscribe(&subject, "conformance-nak").await.unwrap();
    queue.publish(&subject, "nak-1", Bytes::from_static(b"again")).await.unwrap();
    let first = next(&mut subscription).await;
    assert_eq!(first.attempt, 1);
    first.nak(Duration::from_millis(200)).await.unwrap();
    let second = next(&mut subscription).await;
    assert_eq!(second.attempt, 2);
    assert_eq!(&second.payload[..], b"again");
    second.ack().await.unwrap();
    nothing_within(&mut subscription, Duration::from_millis(500)).await;
}

/// A terminated message never comes back.
pub async fn term_is_final(queue: &dyn Queue, prefix: &str) {
    let subject = format!("{prefix}.term");
    let mut subscription = queue.subscribe(&subject, "conformance-term").await.unwrap();
    queue.publish(&subject, "term-1", Bytes::from_static(b"poison")).await.unwrap();
    next(&mut subscription).await.term().await.unwrap();
    nothing_within(&mut subscription, Duration::from_millis(1500)).await;
}

/// Two subscribers of one consumer share the work: every message is handled once.
pub async fn a_shared_consumer_splits_the_work(queue: &dyn Queue, prefix: &str) {
    let subject = format!("{prefix}.shared");
    let mut first = queue.subscribe(&subject, "conformance-shared").await.unwrap();
    let mut second = queue.subscribe(&subject, "conformance-shared").await.unwrap();
    for index in 0..20 {
        queue
            .publish(&subject, &format!("shared-{index}"), Bytes::from(index.to_string()))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let delivery = tokio::select! {
            delivery = next(&mut first) => delivery,
            delivery = next(&mut second) => delivery,
        };
        seen.push(String::from_utf8_lossy(&delivery.payload).to_string());
        delivery.ack().await.unwrap();
    }
    let distinct: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(distinct.len(), 20, "each message exactly once: {seen:?}");
    nothing_within(&mut first, Duration::from_millis(300)).await;
    nothing_within(&mut second, Duration::from_millis(300)).await;
}

/// Every check, in order.
pub async fn all(queue: &dyn Queue, prefix: &str) {
    publish_receive_ack(queue, prefix).await;
    duplicate_ids_are_dropped(queue, prefix).await;
    ids_are_shared_across_a_campaigns_subjects(queue, prefix).await;
    nak_redelivers_with_the_next_attempt(queue, prefix).await;
    term_is_final(queue, prefix).await;
    a_shared_consumer_splits_the_work(queue, prefix).await;
}
