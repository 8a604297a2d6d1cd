//! Distributed mode end to end: the stages as separate `panscreen serve` processes over
//! a real nats-server (JetStream) and a real SeaweedFS (S3), with two preprocess
//! replicas, one of them killed with SIGKILL mid-run and started again.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::StringArray;
use bytes::Bytes;
use panscreen::synth::{synthesize, Size, SynthOptions};
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::Store;
use panscreen_tests::servers::{free_ports, NatsServer, SeaweedFs};
use panscreen_tests::{binary, files_below, workspace_root};

const KEY: &str = "distributed-test-key-0123456789abcdef";
const BUCKET: &str = "panscreen-e2e";

struct Service {
    name: String,
    child: Child,
}

impl Service {
    fn start(name: &str, args: &[&str], environment: &[(String, String)], logs: &Path) -> Service {
        let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
        let child = Command::new(binary())
            .current_dir(workspace_root())
            .args(args)
            .envs(environment.iter().map(|(k, v)| (k.clone(), v.clone())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("panscreen starts");
        Service { name: name.to_string(), child }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
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

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// study key → rows in the results, read from the store.
async fn results(store: &Store) -> BTreeMap<String, usize> {
    let mut rows = BTreeMap::new();
    for object in store.list("campaigns/e2e/out/results").await.unwrap() {
        let bytes = store.get(object.location.as_ref()).await.unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let keys =
                batch.column_by_name("study_key").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
            for key in keys.iter().flatten() {
                *rows.entry(key.to_string()).or_insert(0) += 1;
            }
        }
    }
    rows
}

#[test]
fn services_over_jetstream_and_s3_lose_nothing_when_a_worker_is_killed() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let nats = NatsServer::start();
    let seaweed = SeaweedFs::start();
    seaweed.create_bucket(BUCKET);
    let scratch = tempfile::tempdir().unwrap();
    let options = SynthOptions {
        out: scratch.path().join("cohort"),
        studies: 16,
        seed: 5,
        prevalence: 0.25,
        size: Size::Small,
        sites: SiteRegistry::builtin(),
        threads: 2,
    };
    let truths = synthesize(&options, &|_| {}).unwrap();
    let store = Store::open_s3_with(&format!("s3://{BUCKET}"), &seaweed.s3_options()).unwrap();
    let studies = options.out.join("studies");
    runtime.block_on(async {
        for file in files_below(&studies) {
            let key = format!("incoming/{}", file.strip_prefix(&studies).unwrap().display());
            store.put(&key, Bytes::from(std::fs::read(&file).unwrap())).await.unwrap();
        }
        store.put("incoming/notes.txt", Bytes::from_static(b"not an image")).await.unwrap();
    });

    let mut environment: Vec<(String, String)> =
        seaweed.aws_environment().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    environment.extend([
        ("PANSCREEN_STORE".to_string(), format!("s3://{BUCKET}")),
        ("PANSCREEN_NATS_URL".to_string(), nats.url()),
        ("PANSCREEN_CAMPAIGN".to_string(), "e2e".to_string()),
        ("PANSCREEN_ACK_WAIT_SECONDS".to_string(), "3".to_string()),
        ("PANSCREEN_FLUSH_SECONDS".to_string(), "1".to_string()),
        ("PANSCREEN_DRAIN_SECONDS".to_string(), "10".to_string()),
        ("PANSCREEN_PSEUDONYM_KEY".to_string(), KEY.to_string()),
    ]);
    let logs = scratch.path();
    let ports = free_ports(5);
    let serve = |stage: &'static str, port: u16| -> Vec<String> {
        vec!["serve".into(), stage.into(), "--metrics-addr".into(), format!("127.0.0.1:{port}")]
    };
    let start = |name: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Service::start(name, &args, &environment, logs)
    };
    let aggregate = start("aggregate", serve("aggregate", ports[0]));
    let infer = start("infer", serve("infer", ports[1]));
    let preprocess_a = start("preprocess-a", serve("preprocess", ports[2]));
    let preprocess_b = start("preprocess-b", serve("preprocess", ports[3]));

    let submit = Command::new(binary())
        .current_dir(workspace_root())
        .args(["submit", "--prefix", "incoming"])
        .envs(environment.iter().map(|(k, v)| (k.clone(), v.clone())))
        .output()
        .unwrap();
    let submitted = String::from_utf8_lossy(&submit.stdout).to_string();
    assert!(submit.status.success(), "{submitted}{}", String::from_utf8_lossy(&submit.stderr));
    assert!(submitted.contains("submitted 16 studies; 1 inputs quarantined"), "{submitted}");

    // Kill one replica while the work is under way, then bring a new one up.
    std::thread::sleep(Duration::from_millis(400));
    preprocess_a.signal("-KILL");
    drop(preprocess_a);
    let preprocess_c = start("preprocess-c", serve("preprocess", ports[4]));

    let pseudonymizer = Pseudonymizer::new(KEY.as_bytes().to_vec()).unwrap();
    let expected: Vec<String> = truths.iter().map(|t| pseudonymizer.study(&t.study_instance_uid)).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let rows = loop {
        let rows = runtime.block_on(results(&store));
        if rows.len() >= expected.len() || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    // Let redeliveries of anything the killed worker held play out, then look again.
    std::thread::sleep(Duration::from_secs(5));
    let rows_after = runtime.block_on(results(&store));
    // Health and metrics of a running service.
    assert!(http_get(ports[1], "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(ports[1], "/readyz").starts_with("HTTP/1.1 200"));
    let metrics = http_get(ports[1], "/metrics");
    assert!(metrics.contains(&format!("panscreen_processed_total{{stage=\"infer\"}} {}", expected.len())), "{metrics}");
    assert!(metrics.contains("panscreen_stage_seconds_count{stage=\"infer\"}"), "{metrics}");
    for service in [preprocess_b, preprocess_c, infer, aggregate] {
        let name = service.name.clone();
        assert!(service.terminate(Duration::from_secs(30)), "{name} did not exit 0 on SIGTERM");
    }
    let log = |name: &str| std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
    assert_eq!(
        rows.len(),
        expected.len(),
        "studies in results after 120 s\npreprocess-b:\n{}\ninfer:\n{}\naggregate:\n{}",
        log("preprocess-b"),
        log("infer"),
        log("aggregate")
    );
    assert_eq!(rows, rows_after);
    let redelivered = ["preprocess-b", "preprocess-c"]
        .iter()
        .map(|name| log(name).matches("redelivered message").count())
        .sum::<usize>();
    eprintln!("messages redelivered to the surviving preprocess workers after the kill: {redelivered}");
    for key in &expected {
        assert_eq!(rows.get(key), Some(&1), "study {key} must be in the results exactly once");
    }
    let quarantine = runtime.block_on(store.list("campaigns/e2e/out/quarantine")).unwrap();
    assert_eq!(quarantine.len(), 1, "the non-DICOM input is quarantined");
}
