//! Error classes shared by every stage.
//!
//! A stage error knows whether trying again can help, and whose fault it is. The worker
//! loop turns the class into a queue action in one place: infrastructure → the worker
//! pauses and tries the same message again, spending none of its attempts; retryable →
//! nak with backoff (until the delivery limit, then quarantine); permanent → quarantine
//! and terminate.

use std::fmt;

/// Whether an error may go away on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The input may succeed on another attempt (a task that failed, a timeout):
    /// retried, and each try spends one of its attempts.
    Retryable,
    /// The store or the broker is unreachable or failing: nothing is wrong with the
    /// input. The worker pauses and tries again; no attempt is spent.
    Infrastructure,
    /// The input itself is wrong. Trying again gives the same answer.
    Permanent,
}

/// An error from a stage handler: a class, a reason a person understands, and detail.
#[derive(Debug, Clone)]
pub struct StageError {
    pub class: ErrorClass,
    /// Short, stable, human-readable reason, e.g. "series has a missing slice".
    pub reason: String,
    /// Specifics for the operator (never patient data).
    pub detail: String,
}

impl StageError {
    pub fn permanent(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        StageError { class: ErrorClass::Permanent, reason: reason.into(), detail: detail.into() }
    }

    pub fn retryable(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        StageError { class: ErrorClass::Retryable, reason: reason.into(), detail: detail.into() }
    }

    pub fn infrastructure(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        StageError {
            class: ErrorClass::Infrastructure,
            reason: reason.into(),
            detail: detail.into(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }

    pub fn is_infrastructure(&self) -> bool {
        self.class == ErrorClass::Infrastructure
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.reason, self.detail)
        }
    }
}

impl std::error::Error for StageError {}

impl From<crate::store::StoreError> for StageError {
    fn from(error: crate::store::StoreError) -> Self {
        use crate::store::StoreErrorKind;
        match error.kind() {
            StoreErrorKind::NotFound => {
                StageError::permanent("object not found in the store", error.to_string())
            }
            StoreErrorKind::Denied => StageError::permanent(
                "object cannot be read (permission denied)",
                error.to_string(),
            ),
            StoreErrorKind::InvalidKey => {
                StageError::permanent("object key cannot be used with the store", error.to_string())
            }
            StoreErrorKind::Unavailable | StoreErrorKind::Configuration => {
                StageError::infrastructure("object store error", error.to_string())
            }
        }
    }
}
