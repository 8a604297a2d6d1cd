//! How a table file becomes visible: staged, committed, published.
//!
//! 1. Each Parquet file of a flush is written under `_staging/<writer>/<sequence>/`.
//! 2. A commit manifest `_commits/<writer>-<sequence>.json` names the files, their
//!    final keys and the study keys and quarantine ids they hold. Writing it is the
//!    commit point.
//! 3. The staged files are copied to their final keys and the staged copies deleted.
//! 4. Only then are the messages acked.
//!
//! A crash before step 2 leaves staged garbage and unacked messages, which come back and
//! are written again. A crash after step 2 leaves a commit whose files may not be in
//! place yet; [`roll_forward`] finishes it (every aggregate does so when it starts and
//! before each flush, and so does `compact`). Readers that glob `results/` therefore see
//! only committed files, and the manifests tell every aggregate replica which studies
//! are already written, so a study redelivered to another replica is dropped.

use std::collections::BTreeSet;

use bytes::Bytes;
use panscreen_shared::store::{Store, StoreError, StoreErrorKind};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::AggregateError;

pub const COMMITS: &str = "_commits";
pub const STAGING: &str = "_staging";

/// One committed file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommittedFile {
    /// Where readers find it (`results/…`, `quarantine/…`).
    pub key: String,
    /// Where it was staged.
    pub staged: String,
    pub rows: usize,
}

/// What one commit made visible.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitManifest {
    pub writer: String,
    pub sequence: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub committed_at: OffsetDateTime,
    pub files: Vec<CommittedFile>,
    /// Study keys in the results files of this commit.
    pub study_keys: Vec<String>,
    /// Message ids of the quarantine records in this commit.
    pub quarantine_ids: Vec<String>,
    /// Message ids of the ignored-input chunks in this commit.
    #[serde(default)]
    pub ignored_ids: Vec<String>,
    /// Files this commit replaces (compaction); deleted once it is in place.
    #[serde(default)]
    pub replaces: Vec<String>,
}

impl CommitManifest {
    pub fn key(&self) -> String {
        format!("{COMMITS}/{}-{:010}.json", self.writer, self.sequence)
    }
}

fn write_error(key: &str, source: StoreError) -> AggregateError {
    AggregateError::Write { key: key.to_string(), source }
}

/// What a commit holds, by id, for deduplication.
#[derive(Debug, Default)]
pub struct CommitIds {
    pub study_keys: Vec<String>,
    pub quarantine_ids: Vec<String>,
    pub ignored_ids: Vec<String>,
}

/// A flush in progress: files staged, not yet committed.
pub struct Staged {
    writer: String,
    sequence: u64,
    files: Vec<CommittedFile>,
}

impl Staged {
    pub fn new(writer: &str, sequence: u64) -> Staged {
        Staged { writer: writer.to_string(), sequence, files: Vec::new() }
    }

    /// Writes `bytes` to its staging key; `key` is where it will be published.
    pub async fn stage(
        &mut self,
        out: &Store,
        key: String,
        rows: usize,
        bytes: Bytes,
    ) -> Result<(), AggregateError> {
        let staged = format!("{STAGING}/{}/{:010}/{key}", self.writer, self.sequence);
        out.put(&staged, bytes).await.map_err(|e| write_error(&staged, e))?;
        self.files.push(CommittedFile { key, staged, rows });
        Ok(())
    }

    /// Writes the commit manifest (the commit point), then publishes the files.
    /// Returns the manifest; an error after the commit point leaves the commit for
    /// [`roll_forward`], and is reported as `Ok` with `published == false`.
    pub async fn commit(
        self,
        out: &Store,
        ids: CommitIds,
        replaces: Vec<String>,
    ) -> Result<(CommitManifest, bool), AggregateError> {
        let manifest = CommitManifest {
            writer: self.writer,
            sequence: self.sequence,
            committed_at: OffsetDateTime::now_utc(),
            files: self.files,
            study_keys: ids.study_keys,
            quarantine_ids: ids.quarantine_ids,
            ignored_ids: ids.ignored_ids,
            replaces,
        };
        let key = manifest.key();
        let body = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        out.put(&key, Bytes::from(body)).await.map_err(|e| write_error(&key, e))?;
        let published = match publish(out, &manifest).await {
            Ok(()) => true,
            Err(error) => {
                warn!(%error, commit = %key, "committed but not yet published; rolled forward later");
                false
            }
        };
        Ok((manifest, published))
    }
}

async fn exists(out: &Store, key: &str) -> Result<bool, AggregateError> {
    match out.head(key).await {
        Ok(_) => Ok(true),
        Err(source) if source.kind() == StoreErrorKind::NotFound => Ok(false),
        Err(source) => Err(write_error(key, source)),
    }
}

/// Puts a committed manifest's files in place (idempotent) and removes what it replaces.
pub async fn publish(out: &Store, manifest: &CommitManifest) -> Result<(), AggregateError> {
    for file in &manifest.files {
        if exists(out, &file.staged).await? {
            out.copy(&file.staged, &file.key).await.map_err(|e| write_error(&file.key, e))?;
            out.delete(&file.staged).await.map_err(|e| write_error(&file.staged, e))?;
        } else if !exists(out, &file.key).await? && !manifest.replaces.contains(&file.key) {
            // Neither staged nor published: a later compaction replaced it.
            info!(key = %file.key, "committed file already compacted away");
        }
    }
    for old in &manifest.replaces {
        out.delete_if_present(old).await.map_err(|source| write_error(old, source))?;
    }
    Ok(())
}

/// Every commit manifest in `out`, oldest sequence first per writer.
pub async fn read_commits(
    out: &Store,
    skip: &BTreeSet<String>,
) -> Result<Vec<CommitManifest>, AggregateError> {
    let listed = out.list(COMMITS).await.map_err(|e| write_error(COMMITS, e))?;
    let mut manifests = Vec::new();
    for object in listed {
        let key = object.key;
        if !key.ends_with(".json") || skip.contains(&key) {
            continue;
        }
        let bytes = match out.get(&key).await {
            Ok(bytes) => bytes,
            // Deleted by a compaction since the listing.
            Err(source) if source.kind() == StoreErrorKind::NotFound => continue,
            Err(source) => return Err(write_error(&key, source)),
        };
        let manifest: CommitManifest = serde_json::from_slice(&bytes)
            .map_err(|e| AggregateError::Table(format!("{key} is not a commit manifest: {e}")))?;
        manifests.push(manifest);
    }
    Ok(manifests)
}

/// Finishes every commit whose files are not all in place. Returns how many it touched.
pub async fn roll_forward(
    out: &Store,
    manifests: &[CommitManifest],
) -> Result<usize, AggregateError> {
    let staged: BTreeSet<String> = out
        .list(STAGING)
        .await
        .map_err(|e| write_error(STAGING, e))?
        .into_iter()
        .map(|o| o.key)
        .collect();
    let mut finished = 0;
    for manifest in manifests {
        // A compaction's commit is also unfinished while a file it replaces remains.
        if manifest.files.iter().any(|f| staged.contains(&f.staged))
            || !manifest.replaces.is_empty()
        {
            publish(out, manifest).await?;
            finished += 1;
        }
    }
    if finished > 0 {
        info!(commits = finished, "rolled forward commits a stopped writer left unpublished");
    }
    Ok(finished)
}
