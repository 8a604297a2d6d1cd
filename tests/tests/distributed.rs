//! Distributed mode end to end: the four stages as separate `panscreen serve` processes
//! over a real nats-server (JetStream) and a real SeaweedFS (S3), with the faults of a
//! real cluster: workers killed with SIGKILL, two replicas of every worker, nats-server
//! restarted mid-run, the object store gone for 10 s. Every study must end in the
//! results exactly once, every other input in quarantine or ignored, and no identifier
//! may appear in any log, table, ledger or status output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::store::Store;
use panscreen_synth::{synthesize, StudyTruth, SynthOptions};
use panscreen_tests::servers::{free_ports, NatsServer, SeaweedFs, TcpProxy};
use panscreen_tests::{binary, files_below, small_cohort, workspace_root};

const KEY: &str = "distributed-test-key-0123456789abcdef";
const BUCKET: &str = "panscreen-e2e";
const CAMPAIGN: &str = "e2e";

struct Service {
    name: String,
    child: Child,
    metrics_port: u16,
}

impl Service {
    fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill {signal} {}", self.name);
    }

    /// SIGTERM, then the exit status within `deadline`.
    fn terminate(mut self, deadline: Duration) -> bool {
        self.signal("-TERM");
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} did not stop within {deadline:?} of SIGTERM", self.name);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Servers, a synthetic cohort uploaded to `incoming/`, and the services' environment.
struct Cluster {
    runtime: tokio::runtime::Runtime,
    nats: NatsServer,
    /// The services reach S3 through this proxy, which the outage test cuts.
    s3_proxy: TcpProxy,
    _seaweed: SeaweedFs,
    store: Store,
    environment: Vec<(String, String)>,
    truths: Vec<StudyTruth>,
    scratch: tempfile::TempDir,
}

impl Cluster {
    fn start(studies: usize, seed: u64) -> Cluster {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let nats = NatsServer::start();
        let seaweed = SeaweedFs::start();
        seaweed.create_bucket(BUCKET);
        let scratch = tempfile::tempdir().unwrap();
        let options = SynthOptions {
            prevalence: 0.25,
            ..small_cohort(scratch.path().join("cohort"), studies, seed)
        };
        let truths = synthesize(&options, &|_| {}).unwrap();
        let store = Store::open_s3_with(&format!("s3://{BUCKET}"), &seaweed.s3_options()).unwrap();
        let cohort = options.out.join("studies");
        runtime.block_on(async {
            for file in files_below(&cohort) {
                let key = format!("incoming/{}", file.strip_prefix(&cohort).unwrap().display());
                store.put(&key, Bytes::from(std::fs::read(&file).unwrap())).await.unwrap();
            }
            store.put("incoming/notes.txt", Bytes::from_static(b"not an image")).await.unwrap();
            store.put("incoming/DICOMDIR", Bytes::from_static(b"an index")).await.unwrap();
        });
        let s3_proxy = TcpProxy::start(seaweed.s3_port);
        let mut environment: Vec<(String, String)> = seaweed.aws_environment();
        for (key, value) in environment.iter_mut() {
            if key == "AWS_ENDPOINT_URL" {
                *value = format!("http://127.0.0.1:{}", s3_proxy.port);
            }
        }
        environment.extend(
            [
                ("PANSCREEN_STORE", format!("s3://{BUCKET}")),
                ("PANSCREEN_NATS_URL", nats.url()),
                ("PANSCREEN_CAMPAIGN", CAMPAIGN.to_string()),
                ("PANSCREEN_ACK_WAIT_SECONDS", "3".to_string()),
                ("PANSCREEN_FLUSH_SECONDS", "1".to_string()),
                ("PANSCREEN_DRAIN_SECONDS", "10".to_string()),
                ("PANSCREEN_PSEUDONYM_KEY", KEY.to_string()),
                ("PANSCREEN_QUIET_SECONDS", "2".to_string()),
                ("PANSCREEN_RESCAN_SECONDS", "1".to_string()),
                ("PANSCREEN_RETRY_BACKOFF", "0.5,1,2,4".to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        Cluster { runtime, nats, s3_proxy, _seaweed: seaweed, store, environment, truths, scratch }
    }

    fn logs(&self) -> PathBuf {
        self.scratch.path().to_path_buf()
    }

    fn serve(&self, name: &str, stage: &str) -> Service {
        let metrics_port = free_ports(1)[0];
        let log = std::fs::File::create(self.logs().join(format!("{name}.log"))).unwrap();
        let child = Command::new(binary())
            .current_dir(workspace_root())
            .args(["serve", stage, "--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .envs(self.environment.iter().map(|(k, v)| (k.clone(), v.clone())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("panscreen starts");
        Service { name: name.to_string(), child, metrics_port }
    }

    fn command(&self, args: &[&str]) -> Output {
        let output = Command::new(binary())
            .current_dir(workspace_root())
            .args(args)
            .envs(self.environment.iter().map(|(k, v)| (k.clone(), v.clone())))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "panscreen {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn expected_study_keys(&self) -> Vec<String> {
        let pseudonymizer = Pseudonymizer::new(KEY.as_bytes().to_vec()).unwrap();
        self.truths.iter().map(|t| pseudonymizer.study(&t.study_instance_uid)).collect()
    }

    fn table(&self, table: &str) -> Vec<(String, RecordBatch)> {
        self.runtime.block_on(async {
            let mut batches = Vec::new();
            for object in
                self.store.list(&format!("campaigns/{CAMPAIGN}/out/{table}")).await.unwrap()
            {
                let key = object.key.clone();
                let bytes = self.store.get(&key).await.unwrap();
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                        .unwrap()
                        .build()
                        .unwrap();
                batches.extend(reader.map(|batch| (key.clone(), batch.unwrap())));
            }
            batches
        })
    }

    /// study key → rows in the results.
    fn results(&self) -> BTreeMap<String, usize> {
        let mut rows = BTreeMap::new();
        for (_, batch) in self.table("results") {
            for key in strings(&batch, "study_key") {
                *rows.entry(key).or_insert(0) += 1;
            }
        }
        rows
    }

    /// Runs the cohort through the embedded pipeline with `model` (the default when
    /// `None`) and asserts that every study's probability there is the one the services
    /// wrote, within 1e-6.
    fn assert_embedded_gives_the_same_probabilities(&self, model: Option<&Path>) {
        let out = self.scratch.path().join("embedded");
        let cohort = self.scratch.path().join("cohort/studies");
        let key_file = self.scratch.path().join("key");
        panscreen_tests::run_embedded_with(&cohort, &out, &key_file, KEY, model);
        let embedded = probabilities(
            panscreen_tests::parquet_files(&out.join("results"))
                .unwrap()
                .iter()
                .flat_map(|file| panscreen_tests::read_batches(file).unwrap()),
        );
        let distributed = probabilities(self.table("results").into_iter().map(|(_, batch)| batch));
        assert_eq!(embedded.keys().collect::<Vec<_>>(), distributed.keys().collect::<Vec<_>>());
        for (key, probability) in &embedded {
            let same = match (probability, distributed[key]) {
                (Some(a), Some(b)) => (a - b).abs() < 1e-6,
                (a, b) => *a == b,
            };
            assert!(
                same,
                "study {key}: {probability:?} embedded, {:?} distributed",
                distributed[key]
            );
        }
    }

    /// Waits until every expected study is in the results (or `limit` passes), then a
    /// little longer for stray redeliveries, and returns what is there.
    fn wait_for_results(&self, limit: Duration, services: &[&Service]) -> BTreeMap<String, usize> {
        let expected = self.truths.len();
        let deadline = Instant::now() + limit;
        while self.results().len() < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_secs(6));
        let rows = self.results();
        assert_eq!(
            rows.len(),
            expected,
            "studies in the results after {limit:?}\n{}",
            self.log_tail(services)
        );
        rows
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn log_tail(&self, services: &[&Service]) -> String {
        let mut text = String::new();
        for service in services {
            let log = self.log(&service.name);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            text.push_str(&format!(
                "--- {}\n{}\n",
                service.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        text
    }

    /// Every identifier of the cohort, which must appear nowhere.
    fn identifiers(&self) -> Vec<String> {
        self.truths
            .iter()
            .flat_map(|t| {
                [
                    t.patient_name.clone(),
                    t.patient_id.clone(),
                    t.patient_birth_date.clone(),
                    t.accession_number.clone(),
                ]
            })
            .filter(|identifier| identifier.len() >= 4)
            .collect()
    }

    /// Asserts no identifier is in `text`.
    fn assert_no_identifiers(&self, what: &str, text: &[u8]) {
        let text = String::from_utf8_lossy(text);
        for identifier in self.identifiers() {
            assert!(!text.contains(&identifier), "identifier {identifier:?} leaked into {what}");
        }
    }

    /// Every object panscreen wrote (tables, commits, ledger, tensors) and every log.
    fn assert_nothing_leaked(&self) {
        let written =
            self.runtime.block_on(self.store.list(&format!("campaigns/{CAMPAIGN}"))).unwrap();
        assert!(written.len() > 20, "the services wrote their tables, commits and ledger");
        for object in written {
            let key = object.key.clone();
            let bytes = self.runtime.block_on(self.store.get(&key)).unwrap();
            self.assert_no_identifiers(&key, &bytes);
        }
        for entry in std::fs::read_dir(self.logs()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                self.assert_no_identifiers(
                    &entry.path().display().to_string(),
                    &std::fs::read(entry.path()).unwrap(),
                );
            }
        }
    }
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<String> {
    let array =
        batch.column_by_name(column).unwrap().as_any().downcast_ref::<StringArray>().unwrap();
    array.iter().map(|v| v.unwrap_or_default().to_string()).collect()
}

/// study key → `lesion_probability` (none for a study that was not assessable).
fn probabilities(batches: impl IntoIterator<Item = RecordBatch>) -> BTreeMap<String, Option<f64>> {
    let mut found = BTreeMap::new();
    for batch in batches {
        let values = batch.column_by_name("lesion_probability").unwrap();
        let values = values.as_any().downcast_ref::<arrow::array::Float64Array>().unwrap();
        for (key, value) in strings(&batch, "study_key").into_iter().zip(values.iter()) {
            found.insert(key, value);
        }
    }
    found
}

/// The response, or "" while nothing listens on `port`.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn stop_all(services: Vec<Service>) {
    for service in services {
        let name = service.name.clone();
        assert!(service.terminate(Duration::from_secs(30)), "{name} did not exit 0 on SIGTERM");
    }
}

fn assert_exactly_once(rows: &BTreeMap<String, usize>, expected: &[String]) {
    for key in expected {
        assert_eq!(rows.get(key), Some(&1), "study {key} must be in the results exactly once");
    }
}

#[test]
fn two_replicas_of_every_worker_lose_nothing_when_workers_are_killed() {
    let cluster = Cluster::start(16, 5);
    let ingest = cluster.serve("ingest", "ingest");
    let aggregate_a = cluster.serve("aggregate-a", "aggregate");
    let aggregate_b = cluster.serve("aggregate-b", "aggregate");
    let infer_a = cluster.serve("infer-a", "infer");
    let infer_b = cluster.serve("infer-b", "infer");
    let preprocess_a = cluster.serve("preprocess-a", "preprocess");
    let preprocess_b = cluster.serve("preprocess-b", "preprocess");

    let submitted = cluster.command(&["submit", "--prefix", &format!("s3://{BUCKET}/incoming/")]);
    assert!(String::from_utf8_lossy(&submitted.stdout).contains("submitted prefix 'incoming'"));

    // Kill a preprocess and an infer worker once the work is under way; start new ones.
    let processed = |service: &Service| {
        let metrics = http_get(service.metrics_port, "/metrics");
        let line = metrics
            .lines()
            .find(|l| l.starts_with("panscreen_processed_total"))
            .unwrap_or_default()
            .to_string();
        line.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while processed(&preprocess_a) + processed(&preprocess_b) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before_kill = processed(&preprocess_a) + processed(&preprocess_b);
    // What the services said, in case the run never got under way.
    let started = cluster.log_tail(&[&ingest, &preprocess_a, &preprocess_b]);
    preprocess_a.signal("-KILL");
    infer_a.signal("-KILL");
    assert!(
        (1..16).contains(&before_kill),
        "the kills must land mid-run ({before_kill} of 16 preprocessed)\n{started}"
    );
    drop((preprocess_a, infer_a));
    let preprocess_c = cluster.serve("preprocess-c", "preprocess");
    let infer_c = cluster.serve("infer-c", "infer");

    let services =
        vec![ingest, preprocess_b, preprocess_c, infer_b, infer_c, aggregate_a, aggregate_b];
    let rows =
        cluster.wait_for_results(Duration::from_secs(150), &services.iter().collect::<Vec<_>>());
    let expected = cluster.expected_study_keys();
    assert_exactly_once(&rows, &expected);
    // The same studies through the embedded pipeline get the same probabilities: the
    // services, their kills and redeliveries change nothing the model sees.
    cluster.assert_embedded_gives_the_same_probabilities(None);
    // Each study's tensor is deleted once it is scored: the work store empties.
    let work = format!("campaigns/{CAMPAIGN}/work");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut left = vec![String::new()];
    while !left.is_empty() && Instant::now() < deadline {
        let objects = cluster.runtime.block_on(cluster.store.list(&work)).unwrap();
        left = objects.into_iter().map(|object| object.key).collect();
        std::thread::sleep(Duration::from_millis(200));
    }
    // What the workers said of each study left behind (pseudonyms only), to tell a kill
    // mid-cleanup from a late write.
    let studies: Vec<&str> = left.iter().filter_map(|key| key.split('/').nth(4)).collect();
    for name in ["preprocess-a", "preprocess-b", "preprocess-c", "infer-a", "infer-b", "infer-c"] {
        for line in cluster.log(name).lines() {
            if studies.iter().any(|study| line.contains(study)) {
                eprintln!("{name}: {line}");
            }
        }
    }
    assert!(left.is_empty(), "objects left in {work} after every study was scored: {left:?}");
    // Every pass of ingest wrote its accounting beside the tables.
    let accounted: i64 = cluster
        .table("accounting")
        .iter()
        .map(|(_, batch)| {
            let objects = batch.column_by_name("objects").unwrap();
            objects
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap()
                .iter()
                .flatten()
                .sum::<i64>()
        })
        .sum();
    let uploaded = cluster.runtime.block_on(cluster.store.list("incoming")).unwrap().len();
    assert_eq!(
        accounted as usize, uploaded,
        "the passes' accounting adds up to every object uploaded"
    );
    let redelivered: usize = ["preprocess-b", "preprocess-c", "infer-b", "infer-c"]
        .iter()
        .map(|name| cluster.log(name).matches("redelivered message").count())
        .sum();
    eprintln!("messages redelivered after the kills: {redelivered}");

    // Every input is accounted for: the non-DICOM file quarantined, the DICOMDIR ignored.
    let quarantine: Vec<String> =
        cluster.table("quarantine").iter().flat_map(|(_, b)| strings(b, "input")).collect();
    assert_eq!(quarantine, ["incoming/notes.txt"]);
    let ignored: Vec<String> =
        cluster.table("ignored").iter().flat_map(|(_, b)| strings(b, "input")).collect();
    assert_eq!(ignored, ["incoming/DICOMDIR"]);

    // Health, metrics and status while the services run.
    let infer_b = &services[3];
    assert!(http_get(infer_b.metrics_port, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(infer_b.metrics_port, "/readyz").starts_with("HTTP/1.1 200"));
    let metrics = http_get(infer_b.metrics_port, "/metrics");
    assert!(metrics.contains("panscreen_stage_seconds_count{stage=\"infer\"}"), "{metrics}");
    let status = cluster.command(&["status", "--json"]);
    cluster.assert_no_identifiers("status", &status.stdout);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let stage = |name: &str| {
        status["stages"].as_array().unwrap().iter().find(|s| s["stage"] == name).unwrap().clone()
    };
    assert_eq!(stage("ingest")["processed"], 16, "{status:#}");
    assert_eq!(stage("aggregate")["processed"], 16, "{status:#}");
    assert_eq!(stage("aggregate")["quarantined"], 1, "{status:#}");
    assert_eq!(stage("aggregate")["instances"], 2, "{status:#}");
    for name in ["ingest", "preprocess", "infer", "aggregate"] {
        assert_eq!(
            (stage(name)["pending"].as_u64(), stage(name)["in_flight"].as_u64()),
            (Some(0), Some(0)),
            "{status:#}"
        );
        assert_eq!(stage(name)["progress"], "done", "{status:#}");
    }
    let table = cluster.command(&["status"]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("preprocess"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );

    stop_all(services);

    // Compaction merges the many small files and writes the summary and worklist.
    let files_before = cluster.table("results").len();
    let compacted =
        cluster.command(&["compact", "--store", &format!("s3://{BUCKET}"), "--campaign", CAMPAIGN]);
    eprintln!("{}", String::from_utf8_lossy(&compacted.stdout));
    let results = cluster.table("results");
    let partitions: std::collections::BTreeSet<&str> =
        results.iter().map(|(key, _)| key.rsplit_once('/').unwrap().0).collect();
    assert_eq!(
        partitions.len(),
        results.len(),
        "one file per partition after compaction (was {files_before})"
    );
    assert_exactly_once(&cluster.results(), &expected);
    let summary = cluster.table("summary");
    let total = |column: &str| -> i64 {
        summary
            .iter()
            .map(|(_, b)| {
                b.column_by_name(column)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .iter()
                    .flatten()
                    .sum::<i64>()
            })
            .sum()
    };
    assert_eq!((total("screened"), total("quarantined")), (16, 1));
    let flagged_in_results: usize = results
        .iter()
        .map(|(_, b)| {
            let flagged = b
                .column_by_name("flagged")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::BooleanArray>()
                .unwrap();
            flagged.iter().filter(|f| *f == Some(true)).count()
        })
        .sum();
    let worklist_rows: usize = cluster.table("worklist").iter().map(|(_, b)| b.num_rows()).sum();
    assert_eq!(worklist_rows, flagged_in_results);
    assert_eq!(total("flagged") as usize, flagged_in_results);

    cluster.assert_nothing_leaked();
}

#[test]
fn a_nats_restart_and_a_store_outage_mid_run_lose_nothing() {
    let mut cluster = Cluster::start(40, 11);
    // The learned model here (the default in the test above): its stage 2 takes each
    // crop's reference from the pancreas stage 1 found, in the services as embedded.
    let model = workspace_root().join("models/learned-cascade");
    cluster.environment.push(("PANSCREEN_MODEL".to_string(), model.display().to_string()));
    let services = vec![
        cluster.serve("ingest", "ingest"),
        cluster.serve("preprocess", "preprocess"),
        cluster.serve("infer", "infer"),
        cluster.serve("aggregate", "aggregate"),
    ];
    cluster.command(&["submit", "--prefix", "incoming"]);
    // Wait for the first results: the run is under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.results().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let before_restart = cluster.results().len();
    assert!(before_restart < 40, "the faults must come mid-run (already {before_restart} of 40)");
    cluster.nats.restart(Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(2));
    let before_outage = cluster.results().len();
    cluster.s3_proxy.cut(Duration::from_secs(10));
    eprintln!("results before the nats restart: {before_restart}; before the store outage: {before_outage}");

    let rows =
        cluster.wait_for_results(Duration::from_secs(180), &services.iter().collect::<Vec<_>>());
    assert_exactly_once(&rows, &cluster.expected_study_keys());
    let quarantine: Vec<String> =
        cluster.table("quarantine").iter().flat_map(|(_, b)| strings(b, "input")).collect();
    assert_eq!(quarantine, ["incoming/notes.txt"]);
    let retried: usize = ["ingest", "preprocess", "infer", "aggregate"]
        .iter()
        .map(|name| {
            cluster.log(name).matches("will retry").count()
                + cluster.log(name).matches("retries").count()
        })
        .sum();
    eprintln!("retry log lines across services: {retried}");
    stop_all(services);
    let models: Vec<String> =
        cluster.table("results").iter().flat_map(|(_, b)| strings(b, "model_name")).collect();
    assert!(models.iter().all(|name| name == "learned-cascade"), "{models:?}");
    cluster.assert_embedded_gives_the_same_probabilities(Some(&model));
    cluster.assert_nothing_leaked();
}
