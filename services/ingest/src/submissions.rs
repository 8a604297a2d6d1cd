//! The prefixes submitted to a campaign (`panscreen submit`), recorded under ingest's
//! state (`watch/<hash>.json`), so that a restarted ingest keeps watching them. `submit`
//! writes the record itself: a submission is either recorded (and then never lost) or
//! refused with an error. A message on the `submitted` subject only wakes ingest up.

use std::time::Duration;

use bytes::Bytes;
use panscreen_shared::contracts::ScanRequest;
use panscreen_shared::store::{Store, StoreError};
use tracing::warn;

/// The record's key for `prefix`.
fn record_key(prefix: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("watch/{}.json", &hex::encode(Sha256::digest(prefix.as_bytes()))[..24])
}

/// Records `request` under `state`, trying again through a short store outage.
pub async fn record(state: &Store, request: &ScanRequest) -> Result<(), StoreError> {
    let body = Bytes::from(serde_json::to_vec(request).expect("a scan request serializes"));
    let key = record_key(&request.prefix);
    let mut pause = Duration::from_millis(250);
    for attempt in 1..=6 {
        match state.put(&key, body.clone()).await {
            Err(error) if error.is_transient() && attempt < 6 => {
                warn!(%error, attempt, "the store did not take the write; trying again");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            other => return other,
        }
    }
    unreachable!("the last attempt returns")
}

/// Removes the record of `prefix`; returns whether there was one.
pub async fn remove(state: &Store, prefix: &str) -> Result<bool, StoreError> {
    let key = record_key(prefix);
    if state.head(&key).await.is_err() {
        return Ok(false);
    }
    state.delete(&key).await?;
    Ok(true)
}

/// The prefixes submitted to a campaign, read from their records, sorted.
pub async fn submitted(state: &Store) -> Result<Vec<ScanRequest>, StoreError> {
    let mut requests = Vec::new();
    for object in state.list("watch").await? {
        let bytes = state.get(&object.key).await?;
        match serde_json::from_slice::<ScanRequest>(&bytes) {
            Ok(request) => requests.push(request),
            Err(error) => {
                warn!(%error, record = %object.key, "unreadable submission record, skipped")
            }
        }
    }
    requests.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    Ok(requests)
}
