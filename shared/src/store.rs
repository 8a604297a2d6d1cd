//! Object storage.
//!
//! A store is named by a URL: `file:///abs/dir`, a plain local path, or
//! `s3://bucket/prefix` (endpoint, region and keys from the standard AWS variables:
//! `AWS_ENDPOINT_URL` or `AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ALLOW_HTTP`). Keys are `/`-separated and relative to the root.
//! Local writes go to a temporary file and are renamed into place, and an S3 PUT is
//! atomic, so a reader never sees half an object. [`conformance`] holds what every
//! backend must do.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("directory {0} does not exist")]
    MissingDirectory(PathBuf),
    #[error("unsupported store location {location}: {why}")]
    Unsupported { location: String, why: String },
    #[error("cannot create directory {path}: {source}")]
    CreateDirectory { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
}

/// A rooted object store.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: String,
}

/// The object path of a key, kept as written (non-ASCII included) when it is a valid
/// path; percent-encoded only where it would not be. `Path::from` would encode every
/// non-ASCII character, and S3 would then store the encoded form as the key.
fn object_path(key: &str) -> ObjectPath {
    ObjectPath::parse(key).unwrap_or_else(|_| ObjectPath::from(key))
}

/// How an existing store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The root must exist (inputs).
    Existing,
    /// The root is created if missing (outputs, work areas).
    Create,
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

    fn open_directory(directory: &Path, mode: OpenMode, location: &str) -> Result<Store, StoreError> {
        if !directory.is_dir() {
            if mode == OpenMode::Existing {
                return Err(StoreError::MissingDirectory(directory.to_path_buf()));
            }
            std::fs::create_dir_all(directory)
                .map_err(|source| StoreError::CreateDirectory { path: directory.to_path_buf(), source })?;
        }
        let local = LocalFileSystem::new_with_prefix(directory)?.with_automatic_cleanup(true);
        Ok(Store { inner: Arc::new(local), location: location.to_string() })
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

    fn open_s3(bucket_and_prefix: &str, location: &str, options: &[(&str, String)]) -> Result<Store, StoreError> {
        let (bucket, prefix) = bucket_and_prefix.split_once('/').unwrap_or((bucket_and_prefix, ""));
        if bucket.len() < 3 {
            return Err(StoreError::Unsupported {
                location: location.to_string(),
                why: "bucket names have at least 3 characters".to_string(),
            });
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (key, value) in options {
            let key = key.parse().map_err(|_| StoreError::Unsupported {
                location: location.to_string(),
                why: format!("unknown S3 option {key}"),
            })?;
            builder = builder.with_config(key, value);
        }
        let s3 = builder.build()?;
        let prefix = prefix.trim_matches('/');
        let inner: Arc<dyn ObjectStore> =
            if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) };
        Ok(Store { inner, location: location.to_string() })
    }

    /// Wraps any `object_store` implementation (tests, other backends).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, location: impl Into<String>) -> Store {
        Store { inner, location: location.into() }
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
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Every object under `prefix` (all objects when empty), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let prefix = (!prefix.is_empty()).then(|| object_path(prefix));
        let mut objects: Vec<ObjectMeta> = self.inner.list(prefix.as_ref()).try_collect().await?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, object_store::Error> {
        self.inner.get(&object_path(key)).await?.bytes().await
    }

    /// Bytes `start..end` of an object (end is clamped by the caller to the size).
    pub async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Bytes, object_store::Error> {
        self.inner.get_range(&object_path(key), start..end).await
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), object_store::Error> {
        self.inner.put(&object_path(key), PutPayload::from(bytes)).await.map(|_| ())
    }

    /// Size and modification time of one object.
    pub async fn head(&self, key: &str) -> Result<ObjectMeta, object_store::Error> {
        self.inner.head(&object_path(key)).await
    }

    /// Server-side copy (replaces `to`).
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), object_store::Error> {
        self.inner.copy(&object_path(from), &object_path(to)).await
    }

    pub async fn delete(&self, key: &str) -> Result<(), object_store::Error> {
        self.inner.delete(&object_path(key)).await
    }
}

/// What every store must do, as plain async functions; the file store's unit tests and
/// the S3 integration tests (against a real SeaweedFS) call them.
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
            store.list(&format!("{prefix}/a")).await.unwrap().into_iter().map(|m| m.location.to_string()).collect();
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
        assert!(matches!(store.get(&keys[3]).await, Err(object_store::Error::NotFound { .. })));
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
        let keys: Vec<String> = store.list("a").await.unwrap().into_iter().map(|m| m.location.to_string()).collect();
        assert_eq!(keys, ["a/b.bin", "a/c.bin"]);
        assert_eq!(&store.get("a/b.bin").await.unwrap()[..], b"hello");
        assert_eq!(&store.get_range("a/c.bin", 1, 3).await.unwrap()[..], b"or");
        let sub = store.sub("a/");
        assert_eq!(&sub.get("b.bin").await.unwrap()[..], b"hello");
        assert_eq!(sub.list("").await.unwrap().len(), 2);
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
