//! What several subcommands share: how to reach the cluster, the model and where it
//! runs, and how the site registry and the pseudonym key are loaded.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use panscreen_infer::config::{Placement, TensorRtOptions};
use panscreen_infer::Device;
use panscreen_shared::pseudonym::{Pseudonymizer, KEY_ENV};
use panscreen_shared::queue::jetstream::{JetStreamQueue, JetStreamSettings, NatsConfig};
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::{OpenMode, Store};

/// Where every campaign's work and tables live in the store; never input.
pub const CAMPAIGNS: &str = "campaigns";

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
    /// Attempts before a message that keeps failing is quarantined.
    #[arg(long, default_value_t = 5, env = "PANSCREEN_MAX_DELIVER")]
    pub max_deliver: u32,
}

impl ClusterArgs {
    /// The campaign's queue, created where missing.
    pub async fn queue(&self) -> anyhow::Result<JetStreamQueue> {
        let queue = self.existing_queue().await?;
        queue.ensure_topology().await?;
        Ok(queue)
    }

    /// The campaign's queue, creating nothing (read-only commands).
    pub async fn existing_queue(&self) -> anyhow::Result<JetStreamQueue> {
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
            // Above the workers' own limit, so that the delivery after a crash on the
            // last attempt still reaches a worker, which quarantines it.
            max_deliver: i64::from(self.max_deliver) + 2,
            ..JetStreamSettings::default()
        };
        Ok(JetStreamQueue::connect_existing(&nats, &self.campaign, settings).await?)
    }

    pub fn store(&self) -> anyhow::Result<Store> {
        Store::open(&self.store, OpenMode::Create).with_context(|| format!("store {}", self.store))
    }

    pub fn campaign_prefix(&self) -> String {
        format!("{CAMPAIGNS}/{}", self.campaign)
    }

    /// Ingest's state in the store (ledger, submission records, requeue requests).
    pub fn ingest_state(&self) -> anyhow::Result<Store> {
        Ok(self.store()?.sub(&self.campaign_prefix()).sub("ingest"))
    }
}

/// The model and where it runs; shared by `run` and `serve`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model directory holding manifest.toml.
    #[arg(long, default_value = "models/learned-cascade", env = "PANSCREEN_MODEL")]
    pub model: PathBuf,
    /// Where the model runs: cpu, cuda[:N], tensorrt[:N].
    #[arg(long, default_value = "cpu", env = "PANSCREEN_DEVICE")]
    pub device: Device,
    /// Studies per inference batch (1 is fastest on CPU; raise it on GPUs).
    #[arg(long, default_value_t = 1, env = "PANSCREEN_BATCH_SIZE")]
    pub batch_size: usize,
    /// ONNX Runtime threads.
    #[arg(long, default_value_t = 2, env = "PANSCREEN_INFER_THREADS")]
    pub infer_threads: usize,
    /// How long a batch waits to fill before it runs with fewer studies, in ms.
    #[arg(long, default_value_t = 50, env = "PANSCREEN_BATCH_MAX_WAIT_MS")]
    pub batch_max_wait_ms: u64,
    /// TensorRT (--device tensorrt[:N]): build engines in half precision.
    #[arg(long, env = "PANSCREEN_TRT_FP16")]
    pub trt_fp16: bool,
    /// TensorRT (--device tensorrt[:N]): keep built engines (and timing caches) in this
    /// directory and reuse them at the next start.
    #[arg(long, env = "PANSCREEN_TRT_ENGINE_CACHE")]
    pub trt_engine_cache: Option<PathBuf>,
}

impl ModelArgs {
    /// Where and how the model runs.
    pub fn placement(&self) -> Placement {
        Placement {
            device: self.device,
            threads: self.infer_threads,
            tensorrt: TensorRtOptions {
                fp16: self.trt_fp16,
                engine_cache: self.trt_engine_cache.clone(),
            },
        }
    }

    pub fn batch_max_wait(&self) -> Duration {
        Duration::from_millis(self.batch_max_wait_ms)
    }
}

/// The site registry from `path`, or the built-in one.
pub fn load_sites(path: &Option<PathBuf>) -> anyhow::Result<SiteRegistry> {
    Ok(match path {
        Some(path) => SiteRegistry::load(path)?,
        None => SiteRegistry::builtin(),
    })
}

/// The pseudonym key: file, then environment, else a throwaway key (said aloud).
pub fn load_pseudonymizer(key_file: &Option<PathBuf>) -> anyhow::Result<(Pseudonymizer, bool)> {
    if let Some(path) = key_file {
        return Ok((Pseudonymizer::from_file(path)?, false));
    }
    if let Ok(key) = std::env::var(KEY_ENV) {
        return Ok((
            Pseudonymizer::new(key.into_bytes())
                .with_context(|| format!("{KEY_ENV} is not usable"))?,
            false,
        ));
    }
    Ok((Pseudonymizer::ephemeral(), true))
}
