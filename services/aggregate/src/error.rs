//! What can go wrong while aggregate writes the tables. None of it is a study's fault:
//! a failed flush leaves its messages held and is tried again.

use panscreen_shared::queue::QueueError;
use panscreen_shared::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("cannot build a Parquet table: {0}")]
    Table(String),
    #[error("cannot write {key}: {source}")]
    Write { key: String, source: StoreError },
    #[error(transparent)]
    Queue(#[from] QueueError),
}
