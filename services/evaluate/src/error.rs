//! Why an evaluation cannot be made. Each says which file, column or study (by its
//! pseudonym), so a figure is never computed from the wrong inputs or printed as NaN.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error("cannot read {path}: {detail}")]
    Unreadable { path: PathBuf, detail: String },
    #[error("{path} has no column {column} (of type {expected})")]
    Column { path: PathBuf, column: String, expected: &'static str },
    #[error("{path} holds no labelled studies")]
    NoLabels { path: PathBuf },
    #[error(
        "the labels list study {study_key} {times} times (a labels file concatenated with \
         itself, or two cohorts with one seed?)"
    )]
    DuplicateLabel { study_key: String, times: usize },
    #[error(
        "the results hold study {study_key} {times} times; run `panscreen compact` on the \
         output first"
    )]
    DuplicateResult { study_key: String, times: usize },
    #[error(
        "none of the {labelled} labelled studies in {labels} has a result or a quarantine \
         row among the {results} results in {output}: are the key file and the results \
         those of this cohort's run?"
    )]
    NoMatch { labels: PathBuf, output: PathBuf, labelled: usize, results: usize },
    #[error(
        "the screened studies have no {missing} (of {screened} screened): sensitivity, \
         specificity and AUC need both classes"
    )]
    OneClass { missing: &'static str, screened: usize },
    #[error("--screening-prevalence must be above 0 and below 1, not {0}")]
    Prevalence(f64),
    #[error("cannot write {path}: {detail}")]
    Write { path: PathBuf, detail: String },
}
