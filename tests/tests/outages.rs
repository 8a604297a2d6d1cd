//! Outages and slow work against real servers (nats-server with JetStream, SeaweedFS
//! behind a proxy the test cuts): no message is lost, none is written twice, an outage
//! spends none of a message's attempts, and garbage on the queue becomes a row.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use panscreen_aggregate::{AggregateConfig, Aggregator};
use panscreen_shared::contracts::{example_scored, subjects, Stage, StudyScored};
use panscreen_shared::metrics::Readiness;
use panscreen_shared::queue::jetstream::{JetStreamQueue, JetStreamSettings, NatsConfig};
use panscreen_shared::queue::Queue;
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::Store;
use panscreen_shared::worker::{run_worker, StageCounters, WorkerConfig};
use panscreen_tests::servers::{NatsServer, SeaweedFs, TcpProxy};
use panscreen_tests::SlowEcho;

async fn connect(
    server: &NatsServer,
    campaign: &str,
    settings: JetStreamSettings,
) -> JetStreamQueue {
    let nats = NatsConfig { url: server.url(), ..NatsConfig::default() };
    JetStreamQueue::connect(&nats, campaign, settings)
        .await
        .expect("connect to the test nats-server")
}

fn scored(index: usize) -> StudyScored {
    example_scored("cut", &format!("study-{index:03}"), false)
}

/// Rows of every Parquet file under `prefix`.
async fn rows(store: &Store, prefix: &str) -> usize {
    let mut rows = 0;
    for object in store.list(prefix).await.unwrap_or_default() {
        let bytes = store.get(&object.key).await.unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build();
        rows += reader.unwrap().map(|batch| batch.unwrap().num_rows()).sum::<usize>();
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_holds_its_messages_through_a_60_s_store_cut_and_writes_garbage_as_rows() {
    let (nats, seaweed) = (NatsServer::start(), SeaweedFs::start());
    seaweed.create_bucket("cut");
    let mut proxy = TcpProxy::start(seaweed.s3_port);
    let mut options = seaweed.s3_options();
    options[0].1 = format!("http://127.0.0.1:{}", proxy.port);
    let out = Store::open_s3_with("s3://cut/out", &options).unwrap();
    let settings = JetStreamSettings {
        ack_wait: Duration::from_secs(2),
        max_deliver: 7,
        ..Default::default()
    };
    let queue: Arc<dyn Queue> = Arc::new(connect(&nats, "cut", settings).await);

    let mut config = AggregateConfig::new("cut", "writer-a");
    config.flush_rows = 5;
    config.flush_interval = Duration::from_millis(300);
    config.write_summary = false;
    config.progress_every = Duration::from_millis(600);
    config.retry_backoff = vec![Duration::from_millis(300), Duration::from_secs(1)];
    let readiness = Arc::new(Readiness::default());
    readiness.set(true);
    let counters = Arc::new(StageCounters::default());
    let mut aggregator =
        Aggregator::new(config, out.clone(), SiteRegistry::builtin(), counters.clone())
            .with_readiness(readiness.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let result = aggregator.run(queue, async { stopped.await.unwrap_or(()) }).await;
            (result, aggregator.report().clone())
        })
    };

    // The store goes away; meanwhile studies, two unreadable messages and a garbage
    // quarantine record arrive.
    let cut = tokio::task::spawn_blocking(move || {
        proxy.cut(Duration::from_secs(60));
        proxy
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for index in 0..10 {
        let payload = Bytes::from(serde_json::to_vec(&scored(index)).unwrap());
        queue.publish(&subjects::scored("cut"), &format!("s{index}"), payload).await.unwrap();
    }
    queue
        .publish(&subjects::scored("cut"), "g1", Bytes::from_static(b"\x00\xffnot json"))
        .await
        .unwrap();
    queue
        .publish(&subjects::scored("cut"), "g2", Bytes::from_static(b"{\"half\": "))
        .await
        .unwrap();
    queue
        .publish(&subjects::quarantine("cut"), "g3", Bytes::from_static(b"[1, 2, 3]"))
        .await
        .unwrap();
    // A stale quarantine record of a study that is screened (a redelivery after a
    // nats-server crash forgot an ack): the result stays the study's only outcome.
    let stale = panscreen_shared::contracts::QuarantineRecord {
        campaign: "cut".into(),
        stage: Stage::Infer,
        input: "study-005".into(),
        inputs: Vec::new(),
        study_key: Some("study-005".into()),
        site_id: None,
        reason: "object not found in the store".into(),
        detail: "tensors/study-005.npy is not in the store".into(),
        attempts: 2,
        at: time::OffsetDateTime::now_utc(),
        generation: 0,
    };
    queue
        .publish(
            &subjects::quarantine("cut"),
            "stale",
            Bytes::from(serde_json::to_vec(&stale).unwrap()),
        )
        .await
        .unwrap();
    // A copy of a study that is still waiting: held with it, never acked before it.
    let copy = Bytes::from(serde_json::to_vec(&scored(3)).unwrap());
    queue.publish(&subjects::scored("cut"), "s3-again", copy).await.unwrap();

    let mut not_ready_seen = false;
    while !cut.is_finished() {
        not_ready_seen |= !readiness.get();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _proxy = cut.await.unwrap();
    assert!(not_ready_seen, "readiness is false while writing fails");

    let deadline = Instant::now() + Duration::from_secs(60);
    while (rows(&out, "results").await < 10 || rows(&out, "quarantine").await < 3)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.send(()).unwrap();
    let (result, report) = runner.await.unwrap();
    result.expect("aggregate keeps running through the cut and stops cleanly");
    assert!(readiness.get(), "ready again once writing works");
    assert_eq!(rows(&out, "results").await, 10, "every study once");
    assert_eq!(
        rows(&out, "quarantine").await,
        3,
        "each unreadable message has a row of its own, the stale one none"
    );
    // The copy of study 3 was held with the original and settled with it, not written;
    // the stale record of study 5 was dropped.
    assert_eq!((report.results_written, report.quarantine_written), (10, 3), "{report:?}");
    assert_eq!(report.duplicates_dropped, 1, "{report:?}");
    // Nothing was handed back while the store was away: no delivery past the first.
    let jetstream = connect(&nats, "cut", JetStreamSettings::default()).await;
    let backlog = jetstream
        .backlog(&subjects::scored("cut"), &subjects::consumer(Stage::Aggregate))
        .await
        .unwrap();
    assert_eq!((backlog.pending, backlog.in_flight, backlog.redelivered), (0, 0, 0), "{backlog:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_only_what_it_can_start_so_nothing_times_out_waiting() {
    let nats = NatsServer::start();
    // ack_wait 2 s, 1 s per message, 40 messages: a worker that fetched ahead would
    // leave messages waiting past their ack wait, to be redelivered and quarantined.
    let settings = JetStreamSettings {
        ack_wait: Duration::from_secs(2),
        max_deliver: 4,
        ..Default::default()
    };
    let queue: Arc<dyn Queue> = Arc::new(connect(&nats, "slow", settings).await);
    for index in 0..40 {
        queue
            .publish("panscreen.slow.in", &format!("m{index}"), Bytes::from(format!("m{index}")))
            .await
            .unwrap();
    }
    let mut config = WorkerConfig::new("slow", Stage::Preprocess);
    config.concurrency = 4;
    config.max_deliver = 2;
    config.progress_every = Duration::from_millis(600);
    let counters = Arc::new(StageCounters::default());
    let handler = Arc::new(SlowEcho {
        delay: Duration::from_secs(1),
        stage: Stage::Preprocess,
        batches: AtomicU32::new(0),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(run_worker(
        queue.clone(),
        "panscreen.slow.in",
        handler.clone(),
        config,
        counters.clone(),
        async { stopped.await.unwrap_or(()) },
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while counters.processed.load(Ordering::SeqCst) < 40 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(()).unwrap();
    worker.await.unwrap().unwrap();
    assert_eq!(counters.snapshot(), (40, 0, 0), "all published, none quarantined or retried");
    assert_eq!(
        counters.redelivered.load(Ordering::SeqCst),
        0,
        "no message waited past its ack wait"
    );
    assert_eq!(handler.batches.load(Ordering::SeqCst), 40, "each handled once");
}
