//! Why infer could not score a study.
//!
//! [`InferError`] is one quarantine reason or a retry per variant ([`InferError::reason`]
//! is the text people read in `quarantine/`); the conversion to [`StageError`] is the
//! one place that decides the class. A model that does not load is a [`ModelError`] and
//! stops the worker before it takes a message.

use panscreen_shared::error::StageError;
use panscreen_shared::store::StoreError;

pub use crate::model::ModelError;
pub use crate::runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("unreadable preprocess message: {0}")]
    BadMessage(String),
    #[error("stored tensor is unreadable: {0}")]
    TensorUnreadable(String),
    #[error("stored tensor has the wrong shape: {stored:?}, the message says {expected:?}")]
    TensorShape { stored: Vec<usize>, expected: Vec<usize> },
    /// A cascade needs the fine grid preprocess stores beside stage 1's tensor.
    #[error(
        "the message has no fine grid for stage 2: it was preprocessed for a one-stage model ({0})"
    )]
    NoFineGrid(String),
    /// The blocking inference task panicked or was cancelled.
    #[error("inference task failed: {0}")]
    TaskFailed(String),
    /// ONNX Runtime returned an error for this batch.
    #[error("inference failed: {0}")]
    InferenceFailed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl InferError {
    /// The quarantine reason, stable across releases.
    pub fn reason(&self) -> &'static str {
        match self {
            InferError::BadMessage(_) => "unreadable preprocess message",
            InferError::TensorUnreadable(_) => "stored tensor is unreadable",
            InferError::TensorShape { .. } => "stored tensor has the wrong shape",
            InferError::NoFineGrid(_) => "preprocessed without a fine grid",
            InferError::TaskFailed(_) => "inference task failed",
            InferError::InferenceFailed(_) => "inference failed",
            InferError::Store(_) => "store error",
        }
    }
}

impl From<InferError> for StageError {
    fn from(error: InferError) -> Self {
        let reason = error.reason();
        match error {
            InferError::Store(error) => error.into(),
            InferError::BadMessage(detail)
            | InferError::TensorUnreadable(detail)
            | InferError::NoFineGrid(detail) => StageError::permanent(reason, detail),
            InferError::TensorShape { stored, expected } => {
                StageError::permanent(reason, format!("{stored:?}, the message says {expected:?}"))
            }
            // A batch that failed may succeed alone or on another worker.
            InferError::TaskFailed(detail) | InferError::InferenceFailed(detail) => {
                StageError::retryable(reason, detail)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use panscreen_shared::error::ErrorClass;

    #[test]
    fn each_error_keeps_its_reason_and_class() {
        let stage: StageError =
            InferError::TensorShape { stored: vec![1, 2], expected: vec![1, 3] }.into();
        assert_eq!(stage.class, ErrorClass::Permanent);
        assert_eq!(
            stage.to_string(),
            "stored tensor has the wrong shape: [1, 2], the message says [1, 3]"
        );
        let stage: StageError = InferError::InferenceFailed("out of memory".into()).into();
        assert_eq!(stage.class, ErrorClass::Retryable);
        assert_eq!(stage.reason, "inference failed");
    }
}
