//! Why preprocess could not make a study's grid.
//!
//! Each variant is one quarantine reason, the short text people read in `quarantine/`
//! and in `docs/operations.md`, or a retry; [`PreprocessError::reason`] is that text and
//! the conversion to [`StageError`] is the one place that decides the class.

use panscreen_shared::error::StageError;
use panscreen_shared::store::StoreError;

pub use crate::gdcm_helper::HelperError;
pub use crate::hu::HuError;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The object is not DICOM, its data set is corrupt, or a frame cannot be decoded.
    #[error("cannot decode a slice: {key}: {detail}")]
    Undecodable { key: String, detail: String },
    /// A decoder panicked or its helper process crashed on this file.
    #[error("the decoder failed on this file: {key}: {detail}")]
    DecoderFailed { key: String, detail: String },
    /// Inflating or decoding would pass [`crate::decode::DecodeLimits`].
    #[error("object expands beyond the decompressed size limit: {key}: {detail}")]
    TooLarge { key: String, detail: String },
    /// The object's transfer syntax is decoded by GDCM, which this build leaves out.
    #[error("transfer syntax needs a codec this build leaves out: {key}: {syntax}")]
    CodecLeftOut { key: String, syntax: String },
    /// The GDCM helper process cannot be started (not the file's fault).
    #[error("the GDCM helper process cannot run: {0}")]
    HelperUnavailable(String),
    #[error("study has no slices")]
    NoSlices,
    #[error("slices are not sorted along the slice normal")]
    Unsorted,
    #[error("slice size differs from its series: {key}: {rows}×{columns} where the series is {series_rows}×{series_columns}")]
    SliceSize {
        key: String,
        rows: usize,
        columns: usize,
        series_rows: usize,
        series_columns: usize,
    },
    #[error("slice position changed since ingest: {key}")]
    PositionChanged { key: String },
    /// The blocking decoder task panicked or was cancelled.
    #[error("decoder task failed: {0}")]
    TaskFailed(String),
    #[error("unreadable ingest message: {0}")]
    BadMessage(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PreprocessError {
    pub(crate) fn undecodable(key: &str, detail: impl std::fmt::Display) -> Self {
        PreprocessError::Undecodable { key: key.to_string(), detail: detail.to_string() }
    }

    /// The quarantine reason, stable across releases (tests and dashboards match on it).
    pub fn reason(&self) -> &'static str {
        match self {
            PreprocessError::Undecodable { .. } => "cannot decode a slice",
            PreprocessError::DecoderFailed { .. } => "the decoder failed on this file",
            PreprocessError::TooLarge { .. } => "object expands beyond the decompressed size limit",
            PreprocessError::CodecLeftOut { .. } => {
                "transfer syntax needs a codec this build leaves out"
            }
            PreprocessError::HelperUnavailable(_) => "the GDCM helper process cannot run",
            PreprocessError::NoSlices => "study has no slices",
            PreprocessError::Unsorted => "slices are not sorted along the slice normal",
            PreprocessError::SliceSize { .. } => "slice size differs from its series",
            PreprocessError::PositionChanged { .. } => "slice position changed since ingest",
            PreprocessError::TaskFailed(_) => "decoder task failed",
            PreprocessError::BadMessage(_) => "unreadable ingest message",
            PreprocessError::Store(_) => "store error",
        }
    }

    /// Specifics for the operator: the key and what was wrong (never patient data).
    fn detail(&self) -> String {
        match self {
            PreprocessError::Undecodable { key, detail }
            | PreprocessError::DecoderFailed { key, detail }
            | PreprocessError::TooLarge { key, detail } => format!("{key}: {detail}"),
            PreprocessError::CodecLeftOut { key, syntax } => format!(
                "{key}: {syntax} is decoded by GDCM, which this build of panscreen leaves out; \
                 build it with --features gdcm (the tests and service images do), then requeue"
            ),
            PreprocessError::HelperUnavailable(detail)
            | PreprocessError::TaskFailed(detail)
            | PreprocessError::BadMessage(detail) => detail.clone(),
            PreprocessError::NoSlices | PreprocessError::Store(_) => String::new(),
            PreprocessError::Unsorted => "ingest sorts them; the message is inconsistent".into(),
            PreprocessError::SliceSize { key, rows, columns, series_rows, series_columns } => {
                format!(
                    "{key}: {rows}×{columns} where the series is {series_rows}×{series_columns}"
                )
            }
            PreprocessError::PositionChanged { key } => key.clone(),
        }
    }
}

impl From<PreprocessError> for StageError {
    fn from(error: PreprocessError) -> Self {
        match error {
            // The store decides: a missing object is the input's fault, an outage is not.
            PreprocessError::Store(error) => error.into(),
            PreprocessError::HelperUnavailable(_) | PreprocessError::TaskFailed(_) => {
                StageError::retryable(error.reason(), error.detail())
            }
            _ => StageError::permanent(error.reason(), error.detail()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use panscreen_shared::error::ErrorClass;

    #[test]
    fn each_error_keeps_its_reason_and_class() {
        let stage: StageError = PreprocessError::undecodable("a/IM1", "Rows is missing").into();
        assert_eq!(stage.class, ErrorClass::Permanent);
        assert_eq!(stage.to_string(), "cannot decode a slice: a/IM1: Rows is missing");
        let stage: StageError = PreprocessError::HelperUnavailable("no such file".into()).into();
        assert_eq!(stage.class, ErrorClass::Retryable);
        assert_eq!(stage.reason, "the GDCM helper process cannot run");
        let stage: StageError = PreprocessError::NoSlices.into();
        assert_eq!((stage.reason.as_str(), stage.detail.as_str()), ("study has no slices", ""));
    }
}
