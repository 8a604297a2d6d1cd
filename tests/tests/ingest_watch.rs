//! The long-running ingest on a local store: a study waits until it is complete
//! (marker or quiet period), is decided once, is not handled again after a restart,
//! and files that arrive after their study was decided are ignored with a reason; a
//! requeued study is decided again, once, under a new generation.

use std::time::Duration;

use bytes::Bytes;
use panscreen::requeue::{requeue, Selection};
use panscreen_ingest::watch::{Completion, Watcher};
use panscreen_ingest::{header, IngestConfig};
use panscreen_shared::contracts::{subjects, IgnoredInputs};
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::queue::{MemoryQueue, Queue};
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::{OpenMode, Store};
use panscreen_synth::synthesize;
use panscreen_tests::{files_below, small_cohort};

const KEY: &str = "watch-test-key-0123456789abcdef0123";

async fn watcher(root: &Store, quiet: Duration) -> Watcher {
    Watcher::open(
        root.clone(),
        root.sub("campaigns/w/ingest"),
        IngestConfig::new("w"),
        Completion { quiet, marker: "_COMPLETE".to_string() },
        Pseudonymizer::new(KEY.as_bytes().to_vec()).unwrap(),
        SiteRegistry::builtin(),
    )
    .await
    .unwrap()
}

/// Aggregate writes what `queue` holds for it to campaign w's tables, and ends.
async fn write_tables(queue: MemoryQueue, root: &Store) {
    for subject in [subjects::scored("w"), subjects::quarantine("w"), subjects::ignored("w")] {
        queue.close(&subject).await;
    }
    let mut config = panscreen_aggregate::AggregateConfig::new("w", "test");
    config.write_summary = false;
    let counters = std::sync::Arc::new(panscreen_shared::worker::StageCounters::default());
    let out = root.sub("campaigns/w/out");
    let mut aggregator =
        panscreen_aggregate::Aggregator::new(config, out, SiteRegistry::builtin(), counters);
    aggregator.run(std::sync::Arc::new(queue), std::future::pending()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studies_wait_for_completion_and_are_handled_once_across_restarts() {
    let scratch = tempfile::tempdir().unwrap();
    let options = small_cohort(scratch.path().join("cohort"), 2, 3);
    let truths = synthesize(&options, &|_| {}).unwrap();
    let root =
        Store::open(scratch.path().join("store").to_str().unwrap(), OpenMode::Create).unwrap();
    let studies = options.out.join("studies");
    // The last file of the first study (an edge slice, so no gap) arrives late.
    let z = |path: &std::path::PathBuf| {
        let bytes = std::fs::read(path).unwrap();
        header::parse("x", bytes.len() as u64, &bytes).unwrap().image_position.unwrap()[2]
    };
    let late = files_below(&studies.join(&truths[0].directory))
        .into_iter()
        .max_by(|a, b| z(a).total_cmp(&z(b)))
        .unwrap();
    let mut late_file = None;
    for file in files_below(&studies) {
        let key = format!("incoming/{}", file.strip_prefix(&studies).unwrap().display());
        if file == late {
            late_file = Some((key, std::fs::read(&file).unwrap()));
            continue;
        }
        root.put(&key, Bytes::from(std::fs::read(&file).unwrap())).await.unwrap();
    }
    let queue = MemoryQueue::new();
    let prefixes = vec!["incoming".to_string()];

    // Nothing is complete yet: the quiet period is long and there is no marker.
    let mut first = watcher(&root, Duration::from_secs(3600)).await;
    let pass = first.pass(&queue, &prefixes).await.unwrap();
    assert_eq!((pass.decided.studies.len(), pass.waiting_studies), (0, 2));
    assert_eq!(queue.stats(&subjects::ingested("w")).published, 0);

    // A marker completes the second study only.
    let folder = &truths[1].directory;
    root.put(&format!("incoming/{folder}/_COMPLETE"), Bytes::new()).await.unwrap();
    let pass = first.pass(&queue, &prefixes).await.unwrap();
    assert_eq!((pass.decided.studies.len(), pass.waiting_studies), (1, 1));
    assert!(pass.decided.balanced(), "{:?}", pass.decided);
    assert_eq!(pass.decided.ignored.len(), 1, "the marker is accounted for as ignored");

    // A restarted ingest with a short quiet period decides the first study, and does
    // not hand the second one over again.
    let mut second = watcher(&root, Duration::ZERO).await;
    let pass = second.pass(&queue, &prefixes).await.unwrap();
    assert_eq!((pass.decided.studies.len(), pass.waiting_studies), (1, 0));
    assert_eq!(queue.stats(&subjects::ingested("w")).published, 2);
    let pass = second.pass(&queue, &prefixes).await.unwrap();
    assert_eq!(pass.decided.objects_listed, 0, "nothing is handled twice");

    // A file of the first study arriving now is ignored, with the reason.
    let (key, bytes) = late_file.unwrap();
    root.put(&key, Bytes::from(bytes)).await.unwrap();
    let pass = watcher(&root, Duration::ZERO).await.pass(&queue, &prefixes).await.unwrap();
    assert_eq!(pass.decided.studies.len(), 0);
    assert_eq!(pass.decided.ignored.len(), 1);
    assert!(pass.decided.ignored[0].reason.starts_with("arrived after its study was decided"));
    assert_eq!(pass.decided.ignored[0].input, key);
    queue.close(&subjects::ignored("w")).await;
    let mut ignored = queue.subscribe(&subjects::ignored("w"), "t").await.unwrap();
    let mut inputs = Vec::new();
    while let Some(delivery) = ignored.next().await {
        let delivery = delivery.unwrap();
        let chunk: IgnoredInputs = serde_json::from_slice(&delivery.payload).unwrap();
        inputs.extend(chunk.inputs.into_iter().map(|i| i.input));
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        inputs.len(),
        2,
        "the marker and the late file were published as ignored: {inputs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_study_is_decided_again_under_a_new_generation() {
    let scratch = tempfile::tempdir().unwrap();
    let options = small_cohort(scratch.path().join("cohort"), 1, 4);
    synthesize(&options, &|_| {}).unwrap();
    let root =
        Store::open(scratch.path().join("store").to_str().unwrap(), OpenMode::Create).unwrap();
    let studies = options.out.join("studies");
    let z = |path: &std::path::PathBuf| {
        let bytes = std::fs::read(path).unwrap();
        header::parse("x", bytes.len() as u64, &bytes).unwrap().image_position.unwrap()[2]
    };
    let mut files = files_below(&studies);
    files.sort_by(|a, b| z(a).total_cmp(&z(b)));
    // A slice from the middle is missing at first: the series has a gap.
    let missing = files.remove(files.len() / 2);
    let key_of = |file: &std::path::PathBuf| {
        format!("incoming/{}", file.strip_prefix(&studies).unwrap().display())
    };
    for file in &files {
        root.put(&key_of(file), Bytes::from(std::fs::read(file).unwrap())).await.unwrap();
    }
    let prefixes = vec!["incoming".to_string()];
    let first = MemoryQueue::new();
    let pass = watcher(&root, Duration::ZERO).await.pass(&first, &prefixes).await.unwrap();
    assert_eq!(pass.decided.quarantined.len(), 1);
    assert_eq!(pass.decided.quarantined[0].reason, "series has missing slices");

    // Aggregate writes the quarantine row.
    write_tables(first, &root).await;

    // The missing slice turns up; the study is requeued by its quarantine reason.
    root.put(&key_of(&missing), Bytes::from(std::fs::read(&missing).unwrap())).await.unwrap();
    let campaign = root.sub("campaigns/w");
    let other = Selection { reason: Some("not a DICOM".into()), stage: None };
    assert_eq!(requeue(&campaign, &other, true).await.unwrap().rows_requeued, 0);
    let selection =
        Selection { reason: Some("missing slices".into()), stage: Some("ingest".into()) };
    let dry = requeue(&campaign, &selection, true).await.unwrap();
    assert_eq!((dry.rows_requeued, dry.objects_requeued), (1, files.len()));
    assert!(
        root.list("campaigns/w/ingest/requeue").await.unwrap().is_empty(),
        "a dry run changes nothing"
    );
    let done = requeue(&campaign, &selection, false).await.unwrap();
    assert_eq!(done.rows_requeued, 1);

    // A restarted ingest takes the request: the study is decided again, whole, under
    // generation 1 (its message id differs from the first pass's).
    let second = MemoryQueue::new();
    let mut restarted = watcher(&root, Duration::ZERO).await;
    let pass = restarted.pass(&second, &prefixes).await.unwrap();
    assert_eq!(pass.decided.studies.len(), 1, "{:?}", pass.decided.quarantined);
    let study = &pass.decided.studies[0];
    assert_eq!(study.context.generation, 1);
    assert_eq!(study.slices.len(), files.len() + 1);
    assert!(study.context.message_id(panscreen_shared::contracts::Stage::Ingest).ends_with(":r1"));
    assert!(
        root.list("campaigns/w/ingest/requeue").await.unwrap().is_empty(),
        "the request was taken"
    );
    // And a further restart does not decide it a third time.
    let pass = watcher(&root, Duration::ZERO).await.pass(&second, &prefixes).await.unwrap();
    assert_eq!(pass.decided.objects_listed, 0);
}

/// A row written by infer names its study only by pseudonym; ingest's ledger knows the
/// study's objects, so `requeue --stage infer` brings the whole study back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_quarantined_after_ingest_is_requeued_by_its_pseudonym() {
    let scratch = tempfile::tempdir().unwrap();
    let options = small_cohort(scratch.path().join("cohort"), 1, 5);
    synthesize(&options, &|_| {}).unwrap();
    let root =
        Store::open(scratch.path().join("store").to_str().unwrap(), OpenMode::Create).unwrap();
    let studies = options.out.join("studies");
    let files = files_below(&studies);
    for file in &files {
        let key = format!("incoming/{}", file.strip_prefix(&studies).unwrap().display());
        root.put(&key, Bytes::from(std::fs::read(file).unwrap())).await.unwrap();
    }
    let prefixes = vec!["incoming".to_string()];
    let first = MemoryQueue::new();
    let pass = watcher(&root, Duration::ZERO).await.pass(&first, &prefixes).await.unwrap();
    assert_eq!(pass.decided.studies.len(), 1);
    let study_key = pass.decided.studies[0].context.study_key.clone();

    // Inference gave up on it (say its model file was corrupt): a row with no keys.
    let row = panscreen_shared::contracts::QuarantineRecord {
        campaign: "w".into(),
        stage: panscreen_shared::contracts::Stage::Infer,
        input: study_key.clone(),
        inputs: Vec::new(),
        study_key: Some(study_key.clone()),
        site_id: None,
        reason: "model failed on this study".into(),
        detail: "the model file is corrupt".into(),
        attempts: 5,
        at: time::OffsetDateTime::now_utc(),
        generation: 0,
    };
    first
        .publish(
            &subjects::quarantine("w"),
            &row.message_id(),
            Bytes::from(serde_json::to_vec(&row).unwrap()),
        )
        .await
        .unwrap();
    write_tables(first, &root).await;

    let campaign = root.sub("campaigns/w");
    let selection = Selection { reason: None, stage: Some("infer".into()) };
    let done = requeue(&campaign, &selection, false).await.unwrap();
    assert_eq!(
        (done.rows_requeued, done.objects_requeued),
        (1, files.len()),
        "{}",
        done.render(false)
    );
    assert!(done.not_requeueable.is_empty());

    let second = MemoryQueue::new();
    let pass = watcher(&root, Duration::ZERO).await.pass(&second, &prefixes).await.unwrap();
    assert_eq!(pass.decided.studies.len(), 1);
    assert_eq!(pass.decided.studies[0].context.study_key, study_key);
    assert_eq!(pass.decided.studies[0].context.generation, 1);
    assert_eq!(pass.decided.objects_listed, files.len());
}
