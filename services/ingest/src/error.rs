//! Why ingest does not screen an object or a study, as the reasons people read in
//! `quarantine/` and `ignored/` (every one is listed in `docs/operations.md`).
//!
//! - [`HeaderProblem`]: one object is not a usable DICOM instance (quarantined, or
//!   ignored when it is DICOM but not an image).
//! - [`Rejection`]: a study's series cannot be screened (the study is quarantined).
//!
//! Neither stops ingest: it records the object or study with its reason and goes on.

/// Why an object is not a usable DICOM instance.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderProblem {
    /// Not DICOM at all: quarantine (someone put it where studies go).
    NotDicom(String),
    /// DICOM, but cut short.
    Truncated(String),
    /// The prefix read ends inside the header: read the whole object and parse again.
    NeedsMoreBytes(String),
    /// DICOM, but a required attribute is missing or malformed.
    Invalid(String),
    /// A deflated data set that inflates beyond the limit (a deflate bomb).
    Inflates(String),
    /// A DICOM object that is not an image (a structured report, a presentation state,
    /// an encapsulated PDF…): its SOP class name.
    NonImage(String),
}

impl HeaderProblem {
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderProblem::NotDicom(_) => "not a DICOM file",
            HeaderProblem::Truncated(_) | HeaderProblem::NeedsMoreBytes(_) => {
                "DICOM file is truncated"
            }
            HeaderProblem::Invalid(_) => "DICOM header is missing required attributes",
            HeaderProblem::Inflates(_) => "object expands beyond the decompressed size limit",
            HeaderProblem::NonImage(_) => "not an image",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            HeaderProblem::NotDicom(detail)
            | HeaderProblem::Truncated(detail)
            | HeaderProblem::NeedsMoreBytes(detail)
            | HeaderProblem::Invalid(detail)
            | HeaderProblem::Inflates(detail)
            | HeaderProblem::NonImage(detail) => detail,
        }
    }
}

/// Why a study cannot be screened.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: String,
    pub detail: String,
}

impl Rejection {
    pub(crate) fn new(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        Rejection { reason: reason.into(), detail: detail.into() }
    }
}
