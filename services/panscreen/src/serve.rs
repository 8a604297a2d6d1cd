//! Distributed mode: one stage as a long-running service over NATS JetStream and an
//! object store (`file://` or `s3://`), and `submit`, which scans input and hands the
//! studies to the services.
//!
//! Store layout under `--store` (one URL per campaign deployment):
//! `<input prefix>/…` DICOM to screen, `campaigns/<campaign>/work/` tensors,
//! `campaigns/<campaign>/out/` the Parquet tables.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use panscreen_aggregate::{AggregateConfig, Aggregator};
use panscreen_infer::config::InferConfig;
use panscreen_infer::service::load_model;
use panscreen_ingest::config::IngestServiceConfig;
use panscreen_ingest::service::IngestStores;
use panscreen_ingest::submissions;
use panscreen_ingest::watch::Completion;
use panscreen_ingest::IngestConfig;
use panscreen_preprocess::config::PreprocessConfig;
use panscreen_shared::contracts::{subjects, topology, ScanRequest, Stage};
use panscreen_shared::manifest::ModelManifest;
use panscreen_shared::metrics::{self, Readiness};
use panscreen_shared::queue::jetstream::{consumer_name, JetStreamQueue, JetStreamSettings};
use panscreen_shared::queue::large::{self, LargePayloads};
use panscreen_shared::queue::Queue;
use panscreen_shared::status;
use panscreen_shared::store::Store;
use panscreen_shared::worker::{StageCounters, WorkerConfig};

use crate::settings::{load_pseudonymizer, load_sites, ClusterArgs, ModelArgs, CAMPAIGNS};
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceStage {
    Ingest,
    Preprocess,
    Infer,
    Aggregate,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(value_enum)]
    pub stage: ServiceStage,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Messages handled at once by this process.
    #[arg(long, default_value_t = 1, env = "PANSCREEN_CONCURRENCY")]
    pub concurrency: usize,
    /// Seconds work in flight may take to finish after SIGTERM.
    #[arg(long, default_value_t = 30, env = "PANSCREEN_DRAIN_SECONDS")]
    pub drain_seconds: u64,
    /// Infer: keep each study's work tensor after it is scored (by default it is deleted
    /// once the scored message is published and acknowledged).
    #[arg(long, env = "PANSCREEN_KEEP_TENSORS")]
    pub keep_tensors: bool,
    /// Seconds one message (or infer batch) may take before it is abandoned and retried.
    #[arg(long, default_value_t = 600, env = "PANSCREEN_HANDLER_TIMEOUT_SECONDS")]
    pub handler_timeout_seconds: u64,
    #[arg(long, env = "PANSCREEN_SITES")]
    pub sites: Option<PathBuf>,
    /// Aggregate: flush when this many rows wait, or after this many seconds.
    #[arg(long, default_value_t = 500, env = "PANSCREEN_FLUSH_ROWS")]
    pub flush_rows: usize,
    #[arg(long, default_value_t = 5, env = "PANSCREEN_FLUSH_SECONDS")]
    pub flush_seconds: u64,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "0.0.0.0:9464", env = "PANSCREEN_METRICS_ADDR")]
    pub metrics_addr: String,
    /// Seconds before each retry of a failing message, or of work held through an outage
    /// (the last repeats): commas or spaces between them.
    #[arg(long, default_value = "0.5,2,10,30", env = "PANSCREEN_RETRY_BACKOFF")]
    pub retry_backoff: Backoff,
    #[command(flatten)]
    pub ingest: IngestArgs,
}

/// Pauses between retries: `0.5,2,10,30` or `0.5 2 10 30` (seconds).
#[derive(Debug, Clone)]
pub struct Backoff(pub Vec<Duration>);

impl std::str::FromStr for Backoff {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let seconds: Vec<Duration> = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|part| !part.is_empty())
            .map(|part| match part.parse::<f64>() {
                Ok(value) if value.is_finite() && value >= 0.0 => {
                    Ok(Duration::from_secs_f64(value))
                }
                _ => Err(format!("'{part}' is not a number of seconds (e.g. 0.5,2,10,30)")),
            })
            .collect::<Result<_, _>>()?;
        if seconds.is_empty() {
            return Err("give at least one number of seconds (e.g. 0.5,2,10,30)".to_string());
        }
        Ok(Backoff(seconds))
    }
}

/// Settings of `serve ingest`.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Key prefixes (within --store) rescanned periodically, besides those submitted.
    #[arg(long = "watch", value_delimiter = ',', env = "PANSCREEN_WATCH")]
    pub watch: Vec<String>,
    /// Seconds between rescans.
    #[arg(long, default_value_t = 30, env = "PANSCREEN_RESCAN_SECONDS")]
    pub rescan_seconds: u64,
    /// A study is complete when none of its files was written for this long…
    #[arg(long, default_value_t = 120, env = "PANSCREEN_QUIET_SECONDS")]
    pub quiet_seconds: u64,
    /// …or when an object of this name lies in its folder ("" turns markers off).
    #[arg(long, default_value = "_COMPLETE", env = "PANSCREEN_MARKER")]
    pub marker: String,
    #[arg(long, env = "PANSCREEN_PSEUDONYM_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    #[arg(long, default_value_t = 20, env = "PANSCREEN_MIN_SLICES")]
    pub min_slices: usize,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// What to screen: a key prefix within --store, or a URL inside it
    /// (s3://bucket/prefix/incoming/, file:///root/incoming).
    #[arg(long, default_value = "incoming", env = "PANSCREEN_INPUT_PREFIX")]
    pub prefix: String,
    /// List the prefixes submitted to the campaign instead.
    #[arg(long, conflicts_with = "remove")]
    pub list: bool,
    /// Stop watching this prefix (what was screened stays in the tables).
    #[arg(long, value_name = "PREFIX")]
    pub remove: Option<String>,
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = terminate => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    info!("shutdown requested: draining");
}

/// Runs one stage until `shutdown` resolves, then drains.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cluster = &args.cluster;
    let root = cluster.store()?;
    let campaign_root = root.sub(&cluster.campaign_prefix());
    let jetstream = Arc::new(cluster.queue().await?);
    // Messages over NATS' payload limit (a study of thousands of slices with long keys)
    // travel by reference through the store.
    let queue: Arc<dyn Queue> = Arc::new(LargePayloads::new(
        jetstream.clone(),
        campaign_root.sub("messages"),
        large::DEFAULT_LIMIT,
    ));
    let stage = match args.stage {
        ServiceStage::Ingest => Stage::Ingest,
        ServiceStage::Preprocess => Stage::Preprocess,
        ServiceStage::Infer => Stage::Infer,
        ServiceStage::Aggregate => Stage::Aggregate,
    };
    let mut config = WorkerConfig::new(&cluster.campaign, stage);
    config.concurrency = args.concurrency.max(1);
    config.drain_deadline = Duration::from_secs(args.drain_seconds);
    config.max_deliver = cluster.max_deliver.max(1);
    config.progress_every = Duration::from_secs(cluster.ack_wait_seconds.max(3)) / 3;
    config.backoff = args.retry_backoff.0.clone();
    config.handler_timeout = Duration::from_secs(args.handler_timeout_seconds.max(1));
    let counters = Arc::new(StageCounters::default());
    let readiness = Arc::new(Readiness::default());
    config.readiness = Some(readiness.clone());
    let probe =
        tokio::spawn(probe_dependencies(jetstream.clone(), root.clone(), readiness.clone()));
    let listener = tokio::net::TcpListener::bind(&args.metrics_addr).await.with_context(|| {
        format!(
            "cannot listen for /healthz, /readyz and /metrics on {}; give each service on one host its own \
             --metrics-addr (PANSCREEN_METRICS_ADDR), e.g. 127.0.0.1:9465",
            args.metrics_addr
        )
    })?;
    let metrics =
        tokio::spawn(metrics::serve(listener, stage, counters.clone(), readiness.clone()));
    // Unique across restarts of the same pod (same hostname, often pid 1).
    let started = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let instance = format!("{}-{}-{started}", hostname(), std::process::id());
    let (stop_reporting, reporting_stopped) = tokio::sync::oneshot::channel::<()>();
    let reporter = tokio::spawn(status::report_until(
        jetstream.stats_bucket().await?,
        stage,
        instance.clone(),
        counters.clone(),
        async { reporting_stopped.await.unwrap_or(()) },
    ));
    let shutdown = {
        let readiness = readiness.clone();
        async move {
            shutdown.await;
            readiness.set(false);
        }
    };
    info!(stage = %stage, campaign = %cluster.campaign, metrics = %args.metrics_addr, "service starting");
    match args.stage {
        ServiceStage::Ingest => {
            let stores = IngestStores {
                input: root.clone(),
                state: campaign_root.sub("ingest"),
                out: campaign_root.sub("out"),
            };
            let config = ingest_config(&args)?;
            panscreen_ingest::service::serve(
                config,
                queue,
                stores,
                counters.clone(),
                readiness.clone(),
                shutdown,
            )
            .await?;
        }
        ServiceStage::Preprocess => {
            let manifest = Arc::new(ModelManifest::load(&args.model.model)?);
            let config =
                PreprocessConfig { campaign: cluster.campaign.clone(), manifest, worker: config };
            let work = campaign_root.sub("work");
            panscreen_preprocess::service::serve(
                config,
                queue,
                root.clone(),
                work,
                counters.clone(),
                shutdown,
            )
            .await?;
        }
        ServiceStage::Infer => {
            let manifest = ModelManifest::load(&args.model.model)?;
            let model = load_model(manifest, args.model.placement()).await?;
            let mut worker = config;
            worker.batch_linger = args.model.batch_max_wait();
            let config = InferConfig {
                campaign: cluster.campaign.clone(),
                batch_size: args.model.batch_size,
                keep_tensors: args.keep_tensors,
                worker,
            };
            let work = campaign_root.sub("work");
            panscreen_infer::service::serve(config, model, queue, work, counters.clone(), shutdown)
                .await?;
        }
        ServiceStage::Aggregate => {
            let sites = load_sites(&args.sites)?;
            let mut aggregate_config = AggregateConfig::new(&cluster.campaign, &instance);
            // JetStream hands a consumer at most max_ack_pending unacked messages; a flush
            // threshold above it would only ever flush on age.
            let max_ack_pending = JetStreamSettings::default().max_ack_pending as usize;
            aggregate_config.flush_rows = args.flush_rows.clamp(1, max_ack_pending * 3 / 4);
            aggregate_config.flush_interval = Duration::from_secs(args.flush_seconds.max(1));
            aggregate_config.write_summary = false;
            aggregate_config.max_deliver = config.max_deliver;
            aggregate_config.progress_every = config.progress_every;
            aggregate_config.retry_backoff = config.backoff.clone();
            let mut aggregator = Aggregator::new(
                aggregate_config,
                campaign_root.sub("out"),
                sites,
                counters.clone(),
            )
            .with_readiness(readiness.clone());
            panscreen_aggregate::service::serve(
                &mut aggregator,
                queue,
                shutdown,
                std::future::pending(),
            )
            .await?;
        }
    }
    metrics.abort();
    probe.abort();
    // The last, final counts (bounded: NATS may be gone).
    let _ = stop_reporting.send(());
    if tokio::time::timeout(Duration::from_secs(5), reporter).await.is_err() {
        warn!("the final counts did not reach the status bucket");
    }
    info!(stage = %stage, "service stopped");
    Ok(())
}

/// Every few seconds: is NATS connected, does the store answer? Each failure is a
/// readiness blocker of its own (/readyz says which), so a load balancer and an operator
/// see a service that cannot work as not ready.
async fn probe_dependencies(
    jetstream: Arc<JetStreamQueue>,
    store: Store,
    readiness: Arc<Readiness>,
) {
    const NATS: &str = "NATS is not connected";
    const STORE: &str = "the store does not answer";
    let client = jetstream.context().client();
    loop {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        readiness.block(NATS, !connected);
        let answered = tokio::time::timeout(Duration::from_secs(5), store.has_objects(CAMPAIGNS))
            .await
            .is_ok_and(|r| r.is_ok());
        readiness.block(STORE, !answered);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".to_string())
}

/// The ingest service's settings from the command line.
fn ingest_config(args: &ServeArgs) -> anyhow::Result<IngestServiceConfig> {
    let (pseudonymizer, ephemeral) = load_pseudonymizer(&args.ingest.key_file)?;
    anyhow::ensure!(
        !ephemeral,
        "ingest needs the campaign's pseudonym key (--key-file or PANSCREEN_PSEUDONYM_KEY)"
    );
    let watch = args
        .ingest
        .watch
        .iter()
        .map(|prefix| prefix_within(&args.cluster.store, prefix))
        .collect::<anyhow::Result<_>>()
        .context("--watch")?;
    let mut ingest = IngestConfig::new(&args.cluster.campaign);
    ingest.rules.min_slices = args.ingest.min_slices;
    Ok(IngestServiceConfig {
        ingest,
        watch,
        completion: Completion {
            quiet: Duration::from_secs(args.ingest.quiet_seconds),
            marker: args.ingest.marker.clone(),
        },
        rescan: Duration::from_secs(args.ingest.rescan_seconds),
        pseudonymizer,
        sites: load_sites(&args.sites)?,
    })
}

/// The key prefix `--prefix` names within the store: a bare prefix, or a URL that
/// starts with the store's own. The store's root and panscreen's own outputs are refused:
/// ingest would read its own tables and tensors as input.
pub fn prefix_within(store: &str, prefix: &str) -> anyhow::Result<String> {
    let key = if prefix.contains("://") {
        let store = store.trim_end_matches('/');
        match prefix.strip_prefix(store) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                rest.trim_matches('/').to_string()
            }
            _ => anyhow::bail!("{prefix} is not inside the store {store}"),
        }
    } else {
        prefix.trim_matches('/').to_string()
    };
    anyhow::ensure!(
        !key.is_empty(),
        "{prefix} is the root of the store, which holds panscreen's own outputs under {CAMPAIGNS}/; \
         submit the prefix the DICOM files are under (e.g. incoming/)"
    );
    anyhow::ensure!(
        key != CAMPAIGNS && !key.starts_with(&format!("{CAMPAIGNS}/")),
        "{prefix} is panscreen's own output ({CAMPAIGNS}/ holds every campaign's tables and tensors), not input"
    );
    Ok(key)
}

/// What `submit` did.
#[derive(Debug)]
pub struct Submitted {
    pub prefix: String,
    /// Whether the prefix holds any object now (files may still be on their way).
    pub empty: bool,
    /// Whether the ingest service was woken at once (else it finds the prefix at its
    /// next rescan).
    pub notified: bool,
}

/// Registers `--prefix` with the campaign: records it in the store (the ingest service
/// watches every recorded prefix from its next pass on), then wakes the service.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<Submitted> {
    let cluster = &args.cluster;
    let prefix = prefix_within(&cluster.store, &args.prefix)?;
    let root = cluster.store()?;
    let empty = !root.has_objects(&prefix).await.with_context(|| format!("listing {prefix}"))?;
    let request = ScanRequest {
        campaign: cluster.campaign.clone(),
        prefix: prefix.clone(),
        requested_at: time::OffsetDateTime::now_utc(),
    };
    let state = root.sub(&cluster.campaign_prefix()).sub("ingest");
    submissions::record(&state, &request)
        .await
        .with_context(|| format!("recording the submission of {prefix} in {}", cluster.store))?;
    let body = Bytes::from(serde_json::to_vec(&request)?);
    let id = format!("submit:{prefix}:{}", request.requested_at.unix_timestamp_nanos());
    let notified = match cluster.queue().await {
        Ok(queue) => {
            queue.publish(&subjects::submitted(&cluster.campaign), &id, body).await.is_ok()
        }
        Err(error) => {
            warn!(error = %format!("{error:#}"), "cannot reach NATS; ingest finds the prefix at its next rescan");
            false
        }
    };
    Ok(Submitted { prefix, empty, notified })
}

/// Wakes the ingest service for a pass now (a requeue request is waiting).
pub async fn wake_ingest(cluster: &ClusterArgs) -> anyhow::Result<()> {
    let queue = cluster.existing_queue().await?;
    let now = time::OffsetDateTime::now_utc();
    let wake = ScanRequest {
        campaign: cluster.campaign.clone(),
        prefix: String::new(),
        requested_at: now,
    };
    let id = format!("wake:{}", now.unix_timestamp_nanos());
    queue
        .publish(
            &subjects::submitted(&cluster.campaign),
            &id,
            Bytes::from(serde_json::to_vec(&wake)?),
        )
        .await?;
    Ok(())
}

/// The prefixes submitted to the campaign.
pub async fn submitted(cluster: &ClusterArgs) -> anyhow::Result<Vec<ScanRequest>> {
    Ok(submissions::submitted(&cluster.store()?.sub(&cluster.campaign_prefix()).sub("ingest"))
        .await?)
}

/// Stops watching `prefix` (what was screened stays screened). Returns whether it was
/// submitted.
pub async fn withdraw(cluster: &ClusterArgs, prefix: &str) -> anyhow::Result<bool> {
    let prefix = prefix_within(&cluster.store, prefix)?;
    let state = cluster.store()?.sub(&cluster.campaign_prefix()).sub("ingest");
    Ok(submissions::remove(&state, &prefix).await?)
}

/// Creates the campaign's stream, every durable consumer and the status bucket.
pub async fn setup(cluster: &ClusterArgs) -> anyhow::Result<Vec<String>> {
    let queue = cluster.queue().await?;
    let mut created = Vec::new();
    for (subject, stage) in topology::consumers(&cluster.campaign) {
        queue.ensure_consumer(&subject, &topology::consumer(stage)).await?;
        created.push(consumer_name(&topology::consumer(stage), &subject));
    }
    queue.stats_bucket().await?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_backoff_parses_in_both_forms() {
        let seconds = |text: &str| {
            text.parse::<Backoff>().map(|b| b.0.iter().map(Duration::as_secs_f64).collect())
        };
        assert_eq!(seconds("0.5,2,10,30"), Ok(vec![0.5, 2.0, 10.0, 30.0]));
        assert_eq!(seconds("0.5 2 10 30"), Ok(vec![0.5, 2.0, 10.0, 30.0]));
        assert!(seconds("1,x").unwrap_err().contains("'x'"));
        assert!(seconds("-1").is_err() && seconds("").is_err());
    }

    #[test]
    fn submitted_prefixes_are_keys_within_the_store() {
        assert_eq!(prefix_within("s3://bucket", "incoming/").unwrap(), "incoming");
        assert_eq!(
            prefix_within("s3://bucket/root", "s3://bucket/root/incoming/a/").unwrap(),
            "incoming/a"
        );
        assert_eq!(prefix_within("file:///data", "file:///data/x").unwrap(), "x");
        assert!(prefix_within("s3://bucket/root", "s3://other/incoming").is_err());
        assert!(prefix_within("s3://bucket/root", "s3://bucket/rootless").is_err());
        for own in [
            "",
            "/",
            "s3://bucket/root",
            "s3://bucket/root/",
            "campaigns",
            "campaigns/c1/out",
            "/campaigns/",
        ] {
            let error = prefix_within("s3://bucket/root", own).unwrap_err().to_string();
            assert!(
                error.contains("root of the store") || error.contains("own output"),
                "{own}: {error}"
            );
        }
        assert_eq!(prefix_within("s3://bucket", "campaigns-2026/a").unwrap(), "campaigns-2026/a");
    }
}
