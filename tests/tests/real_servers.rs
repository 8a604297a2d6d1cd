//! The queue and the store against real servers: a `nats-server` with JetStream and a
//! SeaweedFS S3 endpoint, each started by the test on free loopback ports.

use std::time::Duration;

use bytes::Bytes;
use panscreen_shared::queue::jetstream::{JetStreamQueue, JetStreamSettings, NatsConfig};
use panscreen_shared::queue::{conformance, Queue};
use panscreen_shared::store::{self, Store};
use panscreen_tests::servers::{NatsServer, SeaweedFs};

async fn connect(server: &NatsServer, campaign: &str, settings: JetStreamSettings) -> JetStreamQueue {
    let nats = NatsConfig { url: server.url(), ..NatsConfig::default() };
    JetStreamQueue::connect(&nats, campaign, settings).await.expect("connect to the test nats-server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_conforms() {
    let server = NatsServer::start();
    let queue = connect(&server, "conformance", JetStreamSettings::default()).await;
    conformance::all(&queue, "panscreen.conformance").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_message_comes_back_after_ack_wait() {
    let server = NatsServer::start();
    let settings = JetStreamSettings { ack_wait: Duration::from_secs(1), ..JetStreamSettings::default() };
    let queue = connect(&server, "ackwait", settings).await;
    let subject = "panscreen.ackwait.work";
    let mut subscription = queue.subscribe(subject, "worker").await.unwrap();
    queue.publish(subject, "m1", Bytes::from_static(b"study")).await.unwrap();
    let first = subscription.next().await.unwrap().unwrap();
    assert_eq!(first.attempt, 1);
    drop(first); // the worker died without settling it
    let second = tokio::time::timeout(Duration::from_secs(10), subscription.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.attempt, 2);
    assert_eq!(&second.payload[..], b"study");
    second.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_a_server_restart() {
    let mut server = NatsServer::start();
    let queue = connect(&server, "restart", JetStreamSettings::default()).await;
    let subject = "panscreen.restart.work";
    for index in 0..5 {
        queue.publish(subject, &format!("r{index}"), Bytes::from(index.to_string())).await.unwrap();
    }
    let server = tokio::task::spawn_blocking(move || {
        server.restart(Duration::from_secs(1));
        server
    })
    .await
    .unwrap();
    // Publishing goes on once the client has reconnected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match queue.publish(subject, "r5", Bytes::from_static(b"5")).await {
            Ok(()) => break,
            Err(error) if tokio::time::Instant::now() < deadline => {
                eprintln!("waiting for the reconnect: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("no publish after the restart: {error}"),
        }
    }
    let mut subscription = queue.subscribe(subject, "worker").await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 6 {
        let delivery =
            tokio::time::timeout(Duration::from_secs(10), subscription.next()).await.unwrap().unwrap().unwrap();
        seen.insert(String::from_utf8_lossy(&delivery.payload).to_string());
        delivery.ack().await.unwrap();
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms() {
    let seaweed = SeaweedFs::start();
    seaweed.create_bucket("panscreen-test");
    let options = seaweed.s3_options();
    let store = Store::open_s3_with("s3://panscreen-test/campaign-a", &options).unwrap();
    store::conformance::round_trip(&store, "conformance").await;
    // The prefix scopes the store: another prefix in the same bucket sees nothing of it.
    let other = Store::open_s3_with("s3://panscreen-test/campaign-b", &options).unwrap();
    assert!(other.list("").await.unwrap().is_empty());
}
