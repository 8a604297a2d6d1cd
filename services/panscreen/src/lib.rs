//! The panscreen command line and the embedded pipeline.
//!
//! - [`cli`]: the subcommands (`synth`, `run`, `inspect`, `evaluate`, `serve`, `submit`,
//!   `setup`, `status`, `compact`, `requeue`) and their flags; every flag has a
//!   `PANSCREEN_…` environment twin.
//! - [`pipeline`]: the four stages in one process over the in-memory queue and the
//!   local filesystem, with nothing to install: the embedded default.
//! - [`serve`]: distributed mode: a stage as a service over NATS JetStream and S3;
//!   `submit`, which registers input with the ingest service; `setup`.
//! - [`settings`]: what several subcommands share: the cluster, the model, sites, key.
//! - [`status`]: backlog, throughput and time left per stage of a running campaign.
//! - [`requeue`]: quarantined inputs through the pipeline again, once the cause is fixed.

pub mod cli;
pub mod dataset;
pub mod pipeline;
pub mod requeue;
pub mod serve;
pub mod settings;
pub mod status;
