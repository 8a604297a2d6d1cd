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

#[cfg(test)]
mod tests {
    use super::*;
    use panscreen_shared::store::OpenMode;

    fn store() -> (tempfile::TempDir, Store) {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        (directory, store)
    }

    fn ids(studies: &[&str]) -> CommitIds {
        CommitIds {
            study_keys: studies.iter().map(|s| s.to_string()).collect(),
            ..CommitIds::default()
        }
    }

    async fn keys(out: &Store, prefix: &str) -> Vec<String> {
        out.list(prefix).await.unwrap().into_iter().map(|o| o.key).collect()
    }

    #[tokio::test]
    async fn a_flush_is_invisible_until_its_commit_and_in_place_after() {
        let (_directory, out) = store();
        let mut staged = Staged::new("writer-a", 1);
        staged
            .stage(&out, "results/a-1.parquet".into(), 2, Bytes::from_static(b"rows"))
            .await
            .unwrap();
        staged
            .stage(&out, "quarantine/a-1.parquet".into(), 1, Bytes::from_static(b"row"))
            .await
            .unwrap();
        assert!(keys(&out, "results").await.is_empty(), "nothing visible before the commit point");
        let (manifest, published) =
            staged.commit(&out, ids(&["s1", "s2"]), Vec::new()).await.unwrap();
        assert!(published);
        assert_eq!(keys(&out, "results").await, ["results/a-1.parquet"]);
        assert_eq!(&out.get("results/a-1.parquet").await.unwrap()[..], b"rows");
        assert!(keys(&out, STAGING).await.is_empty(), "staged copies deleted");
        let read = read_commits(&out, &BTreeSet::new()).await.unwrap();
        assert_eq!(read, std::slice::from_ref(&manifest));
        assert_eq!(read[0].study_keys, ["s1", "s2"]);
        // Read once, skipped after.
        let skip: BTreeSet<String> = [manifest.key()].into();
        assert!(read_commits(&out, &skip).await.unwrap().is_empty());
    }

    /// A writer that stopped after the commit point, before its files were in place:
    /// whoever reads the commits next finishes it, once.
    #[tokio::test]
    async fn a_commit_left_unpublished_is_finished_by_the_next_reader_once() {
        let (_directory, out) = store();
        let mut staged = Staged::new("writer-a", 7);
        staged
            .stage(&out, "results/a-7.parquet".into(), 1, Bytes::from_static(b"r"))
            .await
            .unwrap();
        let manifest = CommitManifest {
            writer: "writer-a".into(),
            sequence: 7,
            committed_at: OffsetDateTime::now_utc(),
            files: staged.files.clone(),
            study_keys: vec!["s7".into()],
            quarantine_ids: Vec::new(),
            ignored_ids: Vec::new(),
            replaces: Vec::new(),
        };
        out.put(&manifest.key(), Bytes::from(serde_json::to_vec(&manifest).unwrap()))
            .await
            .unwrap();
        assert!(keys(&out, "results").await.is_empty());

        let manifests = read_commits(&out, &BTreeSet::new()).await.unwrap();
        assert_eq!(roll_forward(&out, &manifests).await.unwrap(), 1);
        assert_eq!(keys(&out, "results").await, ["results/a-7.parquet"]);
        assert!(keys(&out, STAGING).await.is_empty());
        assert_eq!(roll_forward(&out, &manifests).await.unwrap(), 0, "nothing left to finish");
    }

    /// A writer that stopped before the commit point left only staged files: nobody
    /// sees them (its messages come back and are written again).
    #[tokio::test]
    async fn staged_files_without_a_commit_are_never_published() {
        let (_directory, out) = store();
        let mut staged = Staged::new("writer-b", 3);
        staged
            .stage(&out, "results/b-3.parquet".into(), 1, Bytes::from_static(b"r"))
            .await
            .unwrap();
        drop(staged);
        let manifests = read_commits(&out, &BTreeSet::new()).await.unwrap();
        assert!(manifests.is_empty());
        assert_eq!(roll_forward(&out, &manifests).await.unwrap(), 0);
        assert!(keys(&out, "results").await.is_empty());
    }

    /// Two writers commit side by side; each sees the other's study keys.
    #[tokio::test]
    async fn two_writers_see_each_others_commits() {
        let (_directory, out) = store();
        for (writer, sequence, study) in
            [("writer-a", 1, "s1"), ("writer-b", 1, "s2"), ("writer-a", 2, "s3")]
        {
            let mut staged = Staged::new(writer, sequence);
            let key = format!("results/{writer}-{sequence}.parquet");
            staged.stage(&out, key, 1, Bytes::from_static(b"r")).await.unwrap();
            staged.commit(&out, ids(&[study]), Vec::new()).await.unwrap();
        }
        let manifests = read_commits(&out, &BTreeSet::new()).await.unwrap();
        let mut studies: Vec<&str> =
            manifests.iter().flat_map(|m| m.study_keys.iter().map(String::as_str)).collect();
        studies.sort();
        assert_eq!(studies, ["s1", "s2", "s3"]);
        assert_eq!(keys(&out, "results").await.len(), 3);
    }
}
