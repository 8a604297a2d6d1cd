//! Object storage.
//!
//! A store is named by a URL: `file:///abs/dir`, a plain local path, or
//! `s3://bucket/prefix` (endpoint, region and keys from the standard AWS variables:
//! `AWS_ENDPOINT_URL` or `AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ALLOW_HTTP`). Keys are `/`-separated and relative to the root.
//! Local writes go to a temporary file and are renamed into place, and an S3 PUT is
//! atomic, so a reader never sees half an object. [`conformance`] holds what every
//! backend must do.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload};
use time::OffsetDateTime;

mod s3_listing;
use s3_listing::RawLister;

/// Sixteen random hex digits that name one writer's objects apart from any other's: an
/// attempt that is retried, or a message published twice, never overwrites or deletes what
/// another wrote under the same study or message.
pub fn unique_suffix() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source (never seen): the clock and process still tell writers apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        bytes = (nanos ^ u64::from(std::process::id()).rotate_left(40)).to_le_bytes();
    }
    hex::encode(bytes)
}

/// What went wrong with the store, classified once: callers branch on [`StoreError::kind`],
/// never on message text.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("directory {0} does not exist")]
    MissingDirectory(PathBuf),
    #[error("unsupported store location {location}: {why}")]
    Unsupported { location: String, why: String },
    #[error("cannot create directory {path}: {source}")]
    CreateDirectory { path: PathBuf, source: std::io::Error },
    #[error("{key} is not in the store")]
    NotFound { key: String },
    #[error("{key} cannot be read: permission denied ({detail})")]
    Denied { key: String, detail: String },
    #[error("{key} cannot be used as a key of this store: {detail}")]
    InvalidKey { key: String, detail: String },
    #[error("the store did not answer for {key}: {detail}")]
    Unavailable { key: String, detail: String },
}

/// The classes of [`StoreError`] that decide what a caller does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The store is misconfigured; nothing works until a person fixes it.
    Configuration,
    /// The object is not there (never was, or vanished since it was listed).
    NotFound,
    /// The object is there but this process may not read it.
    Denied,
    /// The key cannot be expressed to this store.
    InvalidKey,
    /// The store is unreachable or failing: infrastructure, not the input. Try again later.
    Unavailable,
}

impl StoreError {
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::MissingDirectory(_)
            | StoreError::Unsupported { .. }
            | StoreError::CreateDirectory { .. } => StoreErrorKind::Configuration,
            StoreError::NotFound { .. } => StoreErrorKind::NotFound,
            StoreError::Denied { .. } => StoreErrorKind::Denied,
            StoreError::InvalidKey { .. } => StoreErrorKind::InvalidKey,
            StoreError::Unavailable { .. } => StoreErrorKind::Unavailable,
        }
    }

    /// Whether trying the same thing later may succeed (the store, not the input, failed).
    pub fn is_transient(&self) -> bool {
        self.kind() == StoreErrorKind::Unavailable
    }

    fn from_object_store(key: &str, error: object_store::Error) -> StoreError {
        let key = key.to_string();
        match error {
            object_store::Error::NotFound { .. } => StoreError::NotFound { key },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => {
                StoreError::Denied { key, detail: source.to_string() }
            }
            object_store::Error::InvalidPath { source } => {
                StoreError::InvalidKey { key, detail: source.to_string() }
            }
            other => StoreError::Unavailable { key, detail: other.to_string() },
        }
    }

    fn from_io(key: &str, error: std::io::Error) -> StoreError {
        let key = key.to_string();
        match error.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound { key },
            std::io::ErrorKind::PermissionDenied => {
                StoreError::Denied { key, detail: error.to_string() }
            }
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidFilename => {
                StoreError::InvalidKey { key, detail: error.to_string() }
            }
            _ => StoreError::Unavailable { key, detail: error.to_string() },
        }
    }
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// `/`-separated key relative to the store's root, exactly as stored.
    pub key: String,
    pub size: u64,
    pub last_modified: OffsetDateTime,
}

/// An entry a listing found but cannot hand out as a key (a file name that is not UTF-8,
/// a broken link, a folder that cannot be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnlistedObject {
    /// The name as well as it can be shown (invalid bytes as `\xNN`).
    pub key_lossy: String,
    /// Why it cannot be read, in words.
    pub reason: String,
}

/// What a tolerant listing found: the objects, and every entry it could not use.
#[derive(Debug, Default, Clone)]
pub struct Listing {
    pub objects: Vec<ObjectInfo>,
    pub unlisted: Vec<UnlistedObject>,
}

/// A rooted object store.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: String,
    /// For a local directory, its path: listing and reading then go to the file system
    /// directly, so that every file name a hospital export holds can be read (the
    /// `object_store` local backend skips names such as `IMG#12` and stops a listing at
    /// the first name that is not UTF-8).
    local_root: Option<PathBuf>,
    /// For S3, the lister that input scans use (it sees every key, see [`s3_listing`]),
    /// and the key prefix of this store's root in the bucket.
    s3: Option<(Arc<RawLister>, String)>,
}

/// The object path of a key, kept as written (non-ASCII included) when it is a valid
/// path; percent-encoded only where it would not be. `Path::from` would encode every
/// non-ASCII character, and S3 would then store the encoded form as the key.
fn object_path(key: &str) -> ObjectPath {
    ObjectPath::parse(key).unwrap_or_else(|_| ObjectPath::from(key))
}

fn modified_time(metadata: &std::fs::Metadata) -> OffsetDateTime {
    metadata.modified().map(OffsetDateTime::from).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn chrono_time(time: chrono::DateTime<chrono::Utc>) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(time.timestamp_nanos_opt().unwrap_or(0)))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// How an existing store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The root must exist (inputs).
    Existing,
    /// The root is created if missing (outputs, work areas).
    Create,
}

/// Walks `directory` (below `root`), returning every regular file with its key, and every
/// entry that cannot be one. Runs on a blocking thread.
fn walk_directory(root: &Path, directory: &Path) -> Listing {
    let mut listing = Listing::default();
    let relative = |path: &Path| -> String {
        use std::os::unix::ffi::OsStrExt;
        shown_name(path.strip_prefix(root).unwrap_or(path).as_os_str().as_bytes())
    };
    if directory.is_file() {
        // The prefix names one file.
        if let Ok(metadata) = std::fs::metadata(directory) {
            if let Some(key) = directory.strip_prefix(root).ok().and_then(|p| p.to_str()) {
                listing.objects.push(ObjectInfo {
                    key: key.to_string(),
                    size: metadata.len(),
                    last_modified: modified_time(&metadata),
                });
            }
        }
        return listing;
    }
    if !directory.is_dir() {
        return listing;
    }
    for entry in walkdir::WalkDir::new(directory).min_depth(1).follow_links(true) {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                let shown = error.path().map(relative).unwrap_or_else(|| "(unknown)".to_string());
                let reason = if error.loop_ancestor().is_some() {
                    "a symbolic link that loops back to a folder above it".to_string()
                } else if error.io_error().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
                {
                    "a broken symbolic link, or removed while the folder was listed".to_string()
                } else {
                    format!("cannot be listed: {error}")
                };
                listing.unlisted.push(UnlistedObject { key_lossy: shown, reason });
                continue;
            }
        };
        if entry.file_type().is_dir() {
            continue;
        }
        let inside = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let Some(key) = inside.to_str().map(str::to_string) else {
            listing.unlisted.push(UnlistedObject {
                key_lossy: relative(entry.path()),
                reason: "the file name is not valid UTF-8 (rename it, e.g. with convmv)"
                    .to_string(),
            });
            continue;
        };
        match entry.metadata() {
            Ok(metadata) if metadata.is_file() => listing.objects.push(ObjectInfo {
                key,
                size: metadata.len(),
                last_modified: modified_time(&metadata),
            }),
            Ok(_) => listing.unlisted.push(UnlistedObject {
                key_lossy: key,
                reason: "not a regular file (a device, socket or pipe)".to_string(),
            }),
            Err(error) => listing.unlisted.push(UnlistedObject {
                key_lossy: key,
                reason: format!("cannot be listed: {error}"),
            }),
        }
    }
    listing
}

/// A file name as `ls -b` shows it: valid UTF-8 as it is, each invalid byte as `\xNN`,
/// so that two different names never look the same.
fn shown_name(bytes: &[u8]) -> String {
    let mut shown = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        shown.push_str(chunk.valid());
        for byte in chunk.invalid() {
            shown.push_str(&format!("\\x{byte:02x}"));
        }
    }
    shown
}

/// Bytes `start..end` of a local file (fewer when the file is shorter).
fn read_local(path: &Path, range: Option<(u64, u64)>) -> std::io::Result<Bytes> {
    let mut file = std::fs::File::open(path)?;
    let Some((start, end)) = range else {
        let mut bytes = Vec::with_capacity(file.metadata().map(|m| m.len() as usize).unwrap_or(0));
        file.read_to_end(&mut bytes)?;
        return Ok(Bytes::from(bytes));
    };
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity(end.saturating_sub(start) as usize);
    file.take(end.saturating_sub(start)).read_to_end(&mut bytes)?;
    Ok(Bytes::from(bytes))
}

impl Store {
    /// Opens `location` (`file:///…` or a local path).
    pub fn open(location: &str, mode: OpenMode) -> Result<Store, StoreError> {
        if let Some(rest) = location.strip_prefix("file://") {
            return Self::open_directory(Path::new(rest), mode, location);
        }
        if let Some(rest) = location.strip_prefix("s3://") {
            return Self::open_s3(rest, location, &[]);
        }
        if location.contains("://") {
            return Err(StoreError::Unsupported {
                location: location.to_string(),
                why: "use a local directory, file:// or s3://".to_string(),
            });
        }
        Self::open_directory(Path::new(location), mode, location)
    }

    fn open_directory(
        directory: &Path,
        mode: OpenMode,
        location: &str,
    ) -> Result<Store, StoreError> {
        if !directory.is_dir() {
            if mode == OpenMode::Existing {
                return Err(StoreError::MissingDirectory(directory.to_path_buf()));
            }
            std::fs::create_dir_all(directory).map_err(|source| StoreError::CreateDirectory {
                path: directory.to_path_buf(),
                source,
            })?;
        }
        let unsupported =
            |why: String| StoreError::Unsupported { location: location.to_string(), why };
        let root = directory.canonicalize().map_err(|e| unsupported(e.to_string()))?;
        let local =
            LocalFileSystem::new_with_prefix(&root).map_err(|e| unsupported(e.to_string()))?;
        Ok(Store {
            inner: Arc::new(local.with_automatic_cleanup(true)),
            location: location.to_string(),
            local_root: Some(root),
            s3: None,
        })
    }

    /// Opens `s3://bucket/prefix` with the AWS variables, then `options` on top
    /// (object_store's keys: `aws_endpoint_url`, `aws_allow_http`, …).
    pub fn open_s3_with(location: &str, options: &[(&str, String)]) -> Result<Store, StoreError> {
        let rest = location.strip_prefix("s3://").ok_or_else(|| StoreError::Unsupported {
            location: location.to_string(),
            why: "not an s3:// URL".to_string(),
        })?;
        Self::open_s3(rest, location, options)
    }

    fn open_s3(
        bucket_and_prefix: &str,
        location: &str,
        options: &[(&str, String)],
    ) -> Result<Store, StoreError> {
        let unsupported =
            |why: String| StoreError::Unsupported { location: location.to_string(), why };
        let (bucket, prefix) = bucket_and_prefix.split_once('/').unwrap_or((bucket_and_prefix, ""));
        if bucket.len() < 3 {
            return Err(unsupported("bucket names have at least 3 characters".to_string()));
        }
        // The client's own retries stay short (about 20 s at most): the stages retry an
        // outage themselves, holding their messages, and must hear of it in time to.
        let retry = object_store::RetryConfig {
            max_retries: 4,
            retry_timeout: std::time::Duration::from_secs(20),
            ..Default::default()
        };
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry);
        for (key, value) in options {
            let key = key.parse().map_err(|_| unsupported(format!("unknown S3 option {key}")))?;
            builder = builder.with_config(key, value);
        }
        let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint).unwrap_or_default();
        let allow_http = builder
            .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
            .is_some_and(|value| value.eq_ignore_ascii_case("true"));
        if endpoint.starts_with("http://") && !allow_http {
            return Err(unsupported(format!(
                "the endpoint {endpoint} is plain http; set AWS_ALLOW_HTTP=true to allow it (or use https)"
            )));
        }
        let region = builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".to_string());
        let virtual_hosted = builder
            .get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|value| value.eq_ignore_ascii_case("true"));
        let s3 = builder.build().map_err(|e| unsupported(e.to_string()))?;
        let endpoint = (!endpoint.is_empty()).then_some(endpoint);
        let lister = RawLister::new(
            s3.credentials().clone(),
            endpoint,
            bucket,
            region,
            virtual_hosted,
            allow_http,
        )
        .map_err(|e| unsupported(e.to_string()))?;
        let prefix = prefix.trim_matches('/');
        let inner: Arc<dyn ObjectStore> =
            if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) };
        Ok(Store {
            inner,
            location: location.to_string(),
            local_root: None,
            s3: Some((Arc::new(lister), prefix.to_string())),
        })
    }

    /// Wraps any `object_store` implementation (tests, other backends).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, location: impl Into<String>) -> Store {
        Store { inner, location: location.into(), local_root: None, s3: None }
    }

    /// The same store seen from `prefix` down (keys are relative to it).
    pub fn sub(&self, prefix: &str) -> Store {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return self.clone();
        }
        Store {
            inner: Arc::new(PrefixStore::new(self.inner.clone(), prefix)),
            location: format!("{}/{prefix}", self.location.trim_end_matches('/')),
            local_root: self.local_root.as_ref().map(|root| root.join(prefix)),
            s3: self.s3.as_ref().map(|(lister, root)| {
                let root =
                    if root.is_empty() { prefix.to_string() } else { format!("{root}/{prefix}") };
                (lister.clone(), root)
            }),
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// The local file behind `key`, for a directory store.
    /// A key with a `..` segment would reach outside the root: refused.
    fn local_path(&self, key: &str) -> Option<Result<PathBuf, StoreError>> {
        let root = self.local_root.as_ref()?;
        if key.split('/').any(|segment| segment == "..") {
            let detail = "a \"..\" segment would lead outside the store".to_string();
            return Some(Err(StoreError::InvalidKey { key: key.to_string(), detail }));
        }
        Some(Ok(root.join(key.trim_start_matches('/'))))
    }

    /// Every object under `prefix` (all objects when empty), sorted by key. For the
    /// store's own objects (tables, commits, ledgers): an entry it cannot use is an error.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let path = (!prefix.is_empty()).then(|| object_path(prefix));
        let mut stream = self.inner.list(path.as_ref());
        let mut objects = Vec::new();
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|error| StoreError::from_object_store(prefix, error))?;
            objects.push(ObjectInfo {
                key: meta.location.to_string(),
                size: meta.size,
                last_modified: chrono_time(meta.last_modified),
            });
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    /// Whether any object lies under `prefix` (reads one listing page at most).
    pub async fn has_objects(&self, prefix: &str) -> Result<bool, StoreError> {
        let path = (!prefix.is_empty()).then(|| object_path(prefix));
        match self.inner.list(path.as_ref()).next().await {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(error)) => Err(StoreError::from_object_store(prefix, error)),
        }
    }

    /// Every object under `prefix`, for input: an entry that cannot be used as a key is
    /// returned in [`Listing::unlisted`] with its reason, and the listing goes on.
    pub async fn scan(&self, prefix: &str) -> Result<Listing, StoreError> {
        if let Some((lister, root)) = &self.s3 {
            return lister.scan(root, prefix).await;
        }
        let Some(root) = self.local_root.clone() else {
            return Ok(Listing { objects: self.list(prefix).await?, unlisted: Vec::new() });
        };
        let directory = root.join(prefix.trim_matches('/'));
        let mut listing = tokio::task::spawn_blocking(move || walk_directory(&root, &directory))
            .await
            .map_err(|error| StoreError::Unavailable {
                key: prefix.to_string(),
                detail: error.to_string(),
            })?;
        listing.objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(listing)
    }

    async fn read(&self, key: &str, range: Option<(u64, u64)>) -> Result<Bytes, StoreError> {
        if let Some(path) = self.local_path(key) {
            let path = path?;
            return tokio::task::spawn_blocking(move || read_local(&path, range))
                .await
                .map_err(|error| StoreError::Unavailable {
                    key: key.to_string(),
                    detail: error.to_string(),
                })?
                .map_err(|error| StoreError::from_io(key, error));
        }
        let wrap = |error| StoreError::from_object_store(key, error);
        match range {
            None => {
                self.inner.get(&object_path(key)).await.map_err(wrap)?.bytes().await.map_err(wrap)
            }
            Some((start, end)) => {
                self.inner.get_range(&object_path(key), start..end).await.map_err(wrap)
            }
        }
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.read(key, None).await
    }

    /// Bytes `start..end` of an object (end is clamped by the caller to the size).
    pub async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Bytes, StoreError> {
        self.read(key, Some((start, end))).await
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(&object_path(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|error| StoreError::from_object_store(key, error))
    }

    /// Size and modification time of one object.
    pub async fn head(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        if let Some(path) = self.local_path(key) {
            let metadata = tokio::fs::metadata(path?)
                .await
                .map_err(|error| StoreError::from_io(key, error))?;
            if !metadata.is_file() {
                return Err(StoreError::NotFound { key: key.to_string() });
            }
            return Ok(ObjectInfo {
                key: key.to_string(),
                size: metadata.len(),
                last_modified: modified_time(&metadata),
            });
        }
        let meta = self
            .inner
            .head(&object_path(key))
            .await
            .map_err(|error| StoreError::from_object_store(key, error))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: meta.size,
            last_modified: chrono_time(meta.last_modified),
        })
    }

    /// Server-side copy (replaces `to`).
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StoreError> {
        self.inner
            .copy(&object_path(from), &object_path(to))
            .await
            .map_err(|error| StoreError::from_object_store(from, error))
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner
            .delete(&object_path(key))
            .await
            .map_err(|error| StoreError::from_object_store(key, error))
    }

    /// Deletes `key`; an object already gone counts as deleted.
    pub async fn delete_if_present(&self, key: &str) -> Result<(), StoreError> {
        match self.delete(key).await {
            Err(error) if error.kind() == StoreErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// What every store must do, as plain async functions; the file store's unit tests and
/// the S3 integration tests (against a real SeaweedFS) call them.
#[allow(clippy::unwrap_used)] // test support: a failed step is a failed test
pub mod conformance {
    use super::*;

    /// Put, list (sorted, under a prefix), get, ranged get, overwrite, delete; keys with
    /// spaces and non-ASCII characters.
    pub async fn round_trip(store: &Store, prefix: &str) {
        let keys = [
            format!("{prefix}/a/one.dcm"),
            format!("{prefix}/a/two words.dcm"),
            format!("{prefix}/a/病例-ü.dcm"),
            format!("{prefix}/b/three.dcm"),
        ];
        for (index, key) in keys.iter().enumerate() {
            store.put(key, Bytes::from(format!("object {index}"))).await.unwrap();
        }
        let listed: Vec<String> =
            store.list(&format!("{prefix}/a")).await.unwrap().into_iter().map(|m| m.key).collect();
        let mut expected: Vec<String> = keys[..3].to_vec();
        expected.sort();
        assert_eq!(listed, expected);
        assert_eq!(store.list(prefix).await.unwrap().len(), 4);
        assert_eq!(&store.get(&keys[1]).await.unwrap()[..], b"object 1");
        assert_eq!(&store.get(&keys[2]).await.unwrap()[..], b"object 2");
        assert_eq!(&store.get_range(&keys[0], 2, 6).await.unwrap()[..], b"ject");
        store.put(&keys[0], Bytes::from_static(b"replaced")).await.unwrap();
        assert_eq!(&store.get(&keys[0]).await.unwrap()[..], b"replaced");
        store.copy(&keys[2], &format!("{prefix}/c/copy")).await.unwrap();
        assert_eq!(&store.get(&format!("{prefix}/c/copy")).await.unwrap()[..], b"object 2");
        assert_eq!(store.head(&keys[2]).await.unwrap().size, 8);
        store.delete(&format!("{prefix}/c/copy")).await.unwrap();
        store.delete(&keys[3]).await.unwrap();
        assert_eq!(store.get(&keys[3]).await.unwrap_err().kind(), StoreErrorKind::NotFound);
        assert_eq!(store.head(&keys[3]).await.unwrap_err().kind(), StoreErrorKind::NotFound);
        store.delete_if_present(&keys[3]).await.unwrap();
        assert_eq!(store.list(prefix).await.unwrap().len(), 3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_conforms() {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        conformance::round_trip(&store, "conformance").await;
    }

    #[tokio::test]
    async fn put_list_get_round_trip() {
        let directory = tempfile::tempdir().unwrap();
        let store = Store::open(directory.path().to_str().unwrap(), OpenMode::Existing).unwrap();
        store.put("a/b.bin", Bytes::from_static(b"hello")).await.unwrap();
        store.put("a/c.bin", Bytes::from_static(b"world")).await.unwrap();
        let keys: Vec<String> = store.list("a").await.unwrap().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, ["a/b.bin", "a/c.bin"]);
        assert_eq!(&store.get("a/b.bin").await.unwrap()[..], b"hello");
        assert_eq!(&store.get_range("a/c.bin", 1, 3).await.unwrap()[..], b"or");
        let sub = store.sub("a/");
        assert_eq!(&sub.get("b.bin").await.unwrap()[..], b"hello");
        assert_eq!(sub.list("").await.unwrap().len(), 2);
    }

    /// Names real exports hold: non-ASCII folders, `#` and spaces, 200 characters, a
    /// name that is not UTF-8, a control character, a broken link. Every one is listed or
    /// named with a reason, and every listed one can be read.
    #[tokio::test]
    async fn a_scan_lists_every_name_a_hospital_export_holds() {
        use std::os::unix::ffi::OsStrExt;
        let directory = tempfile::tempdir().unwrap();
        let root = directory.path();
        let long = "x".repeat(196) + ".dcm";
        let names =
            ["平扫/IM#12", "增强/IM 0001.dcm", "Müller/Möller #3/a.dcm", "tab\tname.dcm", &long];
        for name in names {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, name.as_bytes()).unwrap();
        }
        std::fs::write(
            root.join(std::ffi::OsStr::from_bytes(b"bad-\xff\xfe.dcm")),
            b"latin-1 name",
        )
        .unwrap();
        std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling.dcm")).unwrap();
        let store = Store::open(root.to_str().unwrap(), OpenMode::Existing).unwrap();
        let listing = store.scan("").await.unwrap();
        let keys: Vec<&str> = listing.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys.len(), 5, "{keys:?}");
        for name in names {
            assert!(keys.contains(&name), "{name} missing from {keys:?}");
            assert_eq!(&store.get(name).await.unwrap()[..], name.as_bytes());
            assert_eq!(&store.get_range(name, 0, 2).await.unwrap()[..], &name.as_bytes()[..2]);
        }
        let mut unlisted: Vec<(String, String)> =
            listing.unlisted.into_iter().map(|u| (u.key_lossy, u.reason)).collect();
        unlisted.sort();
        assert_eq!(unlisted.len(), 2, "{unlisted:?}");
        assert_eq!(unlisted[0].0, "bad-\\xff\\xfe.dcm");
        assert!(unlisted[0].1.contains("not valid UTF-8"), "{}", unlisted[0].1);
        assert_eq!(unlisted[1].0, "dangling.dcm");
        assert!(unlisted[1].1.contains("broken symbolic link"), "{}", unlisted[1].1);
        assert_eq!(store.scan("平扫").await.unwrap().objects.len(), 1);
        assert_eq!(store.get("gone.dcm").await.unwrap_err().kind(), StoreErrorKind::NotFound);
        let outside = store.sub("平扫").get("../增强/IM 0001.dcm").await.unwrap_err();
        assert_eq!(outside.kind(), StoreErrorKind::InvalidKey, "{outside}");
    }

    #[test]
    fn plain_http_without_allow_http_names_the_variable() {
        let error = Store::open_s3_with(
            "s3://bucket",
            &[
                ("aws_endpoint_url", "http://127.0.0.1:1".to_string()),
                ("aws_allow_http", "false".to_string()),
            ],
        )
        .unwrap_err();
        assert!(error.to_string().contains("AWS_ALLOW_HTTP=true"), "{error}");
        assert_eq!(error.kind(), StoreErrorKind::Configuration);
    }

    #[test]
    fn missing_input_directory_is_named() {
        let error = Store::open("/definitely/not/here", OpenMode::Existing).unwrap_err();
        assert_eq!(error.to_string(), "directory /definitely/not/here does not exist");
    }

    #[test]
    fn file_urls_and_creation() {
        let directory = tempfile::tempdir().unwrap();
        let target = directory.path().join("new");
        let url = format!("file://{}", target.display());
        Store::open(&url, OpenMode::Create).unwrap();
        assert!(target.is_dir());
    }
}
