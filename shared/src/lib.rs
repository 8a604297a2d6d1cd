//! Everything the four panscreen services share.
//!
//! - [`contracts`]: the messages that cross a service boundary, the subjects they are
//!   published on, which stage consumes and publishes which ([`contracts::topology`]),
//!   and the quarantine record. Pure serde types, no I/O.
//! - [`queue`]: the work-queue abstraction (publish with a deterministic message id,
//!   pull, ack / nak / term) and its in-process implementation, the embedded default.
//! - [`worker`]: the loop that pulls a message, runs a stage handler, publishes the
//!   outcome and only then acks; errors are classified once, in [`error`].
//! - [`store`]: object storage (`file://`, a local path or `s3://`) with typed errors;
//!   the only place that uses `object_store`.
//! - [`pseudonym`]: keyed HMAC-SHA256 pseudonyms; the only identifiers that leave ingest.
//! - [`manifest`]: the model manifest (`models/<name>/manifest.toml`).
//! - [`install`]: where the binary finds the model and ONNX Runtime it ships with.
//! - [`npy`]: the model-ready tensor format (NumPy `.npy`, little-endian f32).
//! - [`sites`]: the site registry (site id → region, province).
//! - [`telemetry`]: logging set-up.
//! - [`metrics`]: /healthz, /readyz and Prometheus /metrics for a service.
//! - [`counters`]: a stage's live counters and latency histogram (read by metrics,
//!   status and progress bars; counted by the worker).
//! - [`status`]: the counters each service reports for `panscreen status`.
//! - [`retry`]: start-up steps that wait for the store or NATS.
//!
//! Bulky data (DICOM, volumes, masks) stays in the object store; messages carry keys.

pub mod contracts;
pub mod counters;
pub mod error;
pub mod install;
pub mod manifest;
pub mod metrics;
pub mod npy;
pub mod pseudonym;
pub mod queue;
pub mod retry;
pub mod sites;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod worker;

/// The software version written next to every result.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
