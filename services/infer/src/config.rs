//! The infer stage's settings: plain structs the CLI fills from its flags.

use panscreen_shared::worker::WorkerConfig;

pub use crate::model::Device;

/// What the stage needs besides its queue, store and model.
pub struct InferConfig {
    pub campaign: String,
    /// Studies per inference batch.
    pub batch_size: usize,
    /// Keep each study's tensor in the work store after it is scored.
    pub keep_tensors: bool,
    pub worker: WorkerConfig,
}
