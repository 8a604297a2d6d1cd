//! Distributed mode: one stage as a long-running service over NATS JetStream and an
//! object store (`file://` or `s3://`), and `submit`, which scans input and hands the
//! studies to the services.
//!
//! Store layout under `--store` (one URL per campaign deployment):
//! `<input prefix>/…` DICOM to screen, `campaigns/<campaign>/work/` tensors,
//! `campaigns/<campaign>/out/` the Parquet tables.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use panscreen_aggregate::{AggregateConfig, Aggregator};
use panscreen_infer::{InferHandler, Model};
use panscreen_ingest::IngestConfig;
use panscreen_preprocess::PreprocessHandler;
use panscreen_shared::contracts::{subjects, Stage};
use panscreen_shared::manifest::ModelManifest;
use panscreen_shared::metrics::{self, Readiness};
use panscreen_shared::queue::jetstream::{JetStreamQueue, JetStreamSettings, NatsConfig};
use panscreen_shared::queue::Queue;
use panscreen_shared::store::{OpenMode, Store};
use panscreen_shared::worker::{run_worker, StageCounters, WorkerConfig};
use tracing::info;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceStage {
    Preprocess,
    Infer,
    Aggregate,
}

/// How to reach NATS and the store; shared by `serve` and `submit`.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    #[arg(long, default_value = "default", env = "PANSCREEN_CAMPAIGN")]
    pub campaign: String,
    /// Object store root: s3://bucket/prefix (AWS_* variables) or file:///dir.
    #[arg(long, env = "PANSCREEN_STORE")]
    pub store: String,
    #[arg(long, default_value = "nats://127.0.0.1:4222", env = "PANSCREEN_NATS_URL")]
    pub nats_url: String,
    #[arg(long, env = "PANSCREEN_NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "PANSCREEN_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    #[arg(long, env = "PANSCREEN_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    #[arg(long, env = "PANSCREEN_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    #[arg(long, env = "PANSCREEN_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Stream replicas (3 on a NATS cluster).
    #[arg(long, default_value_t = 1, env = "PANSCREEN_STREAM_REPLICAS")]
    pub stream_replicas: usize,
    /// Seconds before an unacked message is redelivered.
    #[arg(long, default_value_t = 60, env = "PANSCREEN_ACK_WAIT_SECONDS")]
    pub ack_wait_seconds: u64,
}

impl ClusterArgs {
    pub async fn queue(&self) -> anyhow::Result<JetStreamQueue> {
        let nats = NatsConfig {
            url: self.nats_url.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            creds_file: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
        };
        let settings = JetStreamSettings {
            replicas: self.stream_replicas,
            ack_wait: Duration::from_secs(self.ack_wait_seconds.max(1)),
            ..JetStreamSettings::default()
        };
        Ok(JetStreamQueue::connect(&nats, &self.campaign, settings).await?)
    }

    pub fn store(&self) -> anyhow::Result<Store> {
        Store::open(&self.store, OpenMode::Create).with_context(|| format!("store {}", self.store))
    }

    pub fn campaign_prefix(&self) -> String {
        format!("campaigns/{}", self.campaign)
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(value_enum)]
    pub stage: ServiceStage,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub model: crate::cli::ModelArgs,
    /// Messages handled at once by this process.
    #[arg(long, default_value_t = 1, env = "PANSCREEN_CONCURRENCY")]
    pub concurrency: usize,
    /// Seconds work in flight may take to finish after SIGTERM.
    #[arg(long, default_value_t = 30, env = "PANSCREEN_DRAIN_SECONDS")]
    pub drain_seconds: u64,
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
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Key prefix of the DICOM to screen, within --store.
    #[arg(long, default_value = "incoming", env = "PANSCREEN_INPUT_PREFIX")]
    pub prefix: String,
    #[arg(long, env = "PANSCREEN_PSEUDONYM_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    #[arg(long, env = "PANSCREEN_SITES")]
    pub sites: Option<PathBuf>,
    #[arg(long, default_value_t = 20, env = "PANSCREEN_MIN_SLICES")]
    pub min_slices: usize,
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
pub async fn serve(args: ServeArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let cluster = &args.cluster;
    let root = cluster.store()?;
    let campaign_root = root.sub(&cluster.campaign_prefix());
    let queue: Arc<dyn Queue> = Arc::new(cluster.queue().await?);
    let stage = match args.stage {
        ServiceStage::Preprocess => Stage::Preprocess,
        ServiceStage::Infer => Stage::Infer,
        ServiceStage::Aggregate => Stage::Aggregate,
    };
    let mut config = WorkerConfig::new(&cluster.campaign, stage);
    config.concurrency = args.concurrency.max(1);
    config.drain_deadline = Duration::from_secs(args.drain_seconds);
    let counters = Arc::new(StageCounters::default());
    let readiness = Arc::new(Readiness::default());
    let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {}", args.metrics_addr))?;
    let metrics = tokio::spawn(metrics::serve(listener, stage, counters.clone(), readiness.clone()));
    let shutdown = {
        let readiness = readiness.clone();
        async move {
            shutdown.await;
            readiness.set(false);
        }
    };
    info!(stage = %stage, campaign = %cluster.campaign, metrics = %args.metrics_addr, "service starting");
    match args.stage {
        ServiceStage::Preprocess => {
            let handler = Arc::new(PreprocessHandler {
                campaign: cluster.campaign.clone(),
                input: root.clone(),
                work: campaign_root.sub("work"),
                manifest: Arc::new(ModelManifest::load(&args.model.model)?),
                fetch_ahead: 4,
            });
            readiness.set(true);
            run_worker(queue, &subjects::ingested(&cluster.campaign), handler, config, counters, shutdown).await?;
        }
        ServiceStage::Infer => {
            let manifest = ModelManifest::load(&args.model.model)?;
            let (device, threads) = (args.model.device, args.model.infer_threads);
            let model = tokio::task::spawn_blocking(move || Model::load(&manifest, device, threads)).await??;
            let handler = Arc::new(InferHandler {
                campaign: cluster.campaign.clone(),
                work: campaign_root.sub("work"),
                model: Arc::new(Mutex::new(model)),
                batch_size: args.model.batch_size,
            });
            readiness.set(true);
            run_worker(queue, &subjects::preprocessed(&cluster.campaign), handler, config, counters, shutdown).await?;
        }
        ServiceStage::Aggregate => {
            let sites = crate::cli::load_sites(&args.sites)?;
            let writer_id = format!("{}-{}", hostname(), std::process::id());
            let mut aggregate_config = AggregateConfig::new(&cluster.campaign, &writer_id);
            aggregate_config.flush_rows = args.flush_rows;
            aggregate_config.flush_interval = Duration::from_secs(args.flush_seconds.max(1));
            aggregate_config.write_summary = false;
            let mut aggregator = Aggregator::new(aggregate_config, campaign_root.sub("out"), sites, counters);
            let existing = aggregator.load_existing().await?;
            info!(existing, "studies already in the results");
            readiness.set(true);
            aggregator.run(queue, shutdown).await?;
        }
    }
    metrics.abort();
    info!(stage = %stage, "service stopped");
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".to_string())
}

/// Scans `--prefix` once and publishes every study and quarantine record.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<panscreen_ingest::IngestReport> {
    let cluster = &args.cluster;
    let root = cluster.store()?;
    let queue = cluster.queue().await?;
    let (pseudonymizer, ephemeral) = crate::cli::load_pseudonymizer(&args.key_file)?;
    anyhow::ensure!(!ephemeral, "submit needs the campaign's pseudonym key (--key-file or PANSCREEN_PSEUDONYM_KEY)");
    let sites = crate::cli::load_sites(&args.sites)?;
    let mut config = IngestConfig::new(&cluster.campaign);
    config.prefix = args.prefix.trim_matches('/').to_string();
    config.rules.min_slices = args.min_slices;
    let report = panscreen_ingest::scan(&root, &config, &pseudonymizer, &sites).await?;
    panscreen_ingest::publish(&queue, &cluster.campaign, &report).await?;
    Ok(report)
}
