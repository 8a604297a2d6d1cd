//! The preprocess stage's settings: plain structs the CLI fills from its flags.

use std::sync::Arc;

use panscreen_shared::manifest::ModelManifest;
use panscreen_shared::worker::WorkerConfig;

/// Slices read from the store ahead of the one being decoded.
pub const FETCH_AHEAD: usize = 4;

/// What the stage needs besides its queue and stores.
pub struct PreprocessConfig {
    pub campaign: String,
    /// The model whose grid and intensity scheme the tensors are made for.
    pub manifest: Arc<ModelManifest>,
    pub worker: WorkerConfig,
}
