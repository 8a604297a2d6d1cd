//! Object storage.
//!
//! A store is named by a URL: `file:///abs/dir` or a plain local path. Keys are
//! `/`-separated and relative to that root. Local writes go to a temporary file and
//! are renamed into place, so a reader never sees half an object.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
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
        if location.contains("://") {
            return Err(StoreError::Unsupported {
                location: location.to_string(),
                why: "this build reads local directories and file:// URLs".to_string(),
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

    /// Wraps any `object_store` implementation (tests, other backends).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, location: impl Into<String>) -> Store {
        Store { inner, location: location.into() }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Every object under `prefix` (all objects when empty), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
        let mut objects: Vec<ObjectMeta> = self.inner.list(prefix.as_ref()).try_collect().await?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, object_store::Error> {
        self.inner.get(&ObjectPath::from(key)).await?.bytes().await
    }

    /// Bytes `start..end` of an object (end is clamped by the caller to the size).
    pub async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Bytes, object_store::Error> {
        self.inner.get_range(&ObjectPath::from(key), start..end).await
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), object_store::Error> {
        self.inner.put(&ObjectPath::from(key), PutPayload::from(bytes)).await.map(|_| ())
    }

    pub async fn delete(&self, key: &str) -> Result<(), object_store::Error> {
        self.inner.delete(&ObjectPath::from(key)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
