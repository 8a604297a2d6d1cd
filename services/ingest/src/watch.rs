//! The long-running ingest: watches prefixes, decides each study once it is complete,
//! and remembers what it handled so that nothing is handled twice across restarts.
//!
//! **Completeness.** Objects of one study arrive one by one, often over minutes. A study
//! is decided when either
//! - a marker object (by default named `_COMPLETE`) lies in the folder of one of its
//!   instances or in a folder above (a study folder, or a whole batch): the sender says
//!   the study is whole; or
//! - no instance of it has been written for the quiet period (by the store's
//!   last-modified time; default 120 s).
//!
//! The marker is exact and fast; the quiet period needs nothing from the sender but
//! waits, and a sender that pauses longer than it splits a study: the late instances
//! are then ignored with the reason "arrived after its study was decided", never
//! screened twice.
//!
//! **The ledger.** After each pass has published its messages, ingest writes a ledger
//! segment under `<state>/ledger/` naming the objects it decided (as keyed hashes, not
//! keys) and the studies (by study key). A restarted ingest reads the segments and skips
//! those objects without reading them again. A crash between publishing and writing the
//! segment repeats the pass's messages, which JetStream drops by message id within its
//! duplicate window and aggregate drops by study key after it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use panscreen_shared::contracts::IgnoredInput;
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::queue::Queue;
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::{ObjectInfo, Store};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::header::InstanceHeader;
use crate::{
    decide_study, publish, read_object, unlisted_outcome, unreadable_outcome, IngestConfig,
    IngestReport, ObjectOutcome,
};

/// When a study counts as complete.
#[derive(Debug, Clone)]
pub struct Completion {
    /// No new instance for this long.
    pub quiet: Duration,
    /// File name of the marker object ("" for none).
    pub marker: String,
}

impl Default for Completion {
    fn default() -> Self {
        Completion { quiet: Duration::from_secs(120), marker: "_COMPLETE".to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_covers_its_folder_and_everything_below() {
        let marked: BTreeSet<&str> = ["in/study-1"].into_iter().collect();
        assert!(under_marker(&marked, "in/study-1/series-2/a.dcm"));
        assert!(under_marker(&marked, "in/study-1/a.dcm"));
        assert!(!under_marker(&marked, "in/study-10/a.dcm"));
        assert!(!under_marker(&marked, "in/a.dcm"));
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LedgerSegment {
    /// Keyed hashes of the object keys decided.
    objects: Vec<String>,
    /// Study keys decided.
    studies: Vec<String>,
    /// Objects (keyed hashes) and studies requeued: decided again on the next pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    forgotten_objects: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    forgotten_studies: Vec<String>,
    /// Requeue generation by study key or object hash (absent: 0).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    generations: BTreeMap<String, u32>,
    /// The objects (keyed hashes) of each study decided, so that a study known only by
    /// its key (a row of infer or aggregate) can be requeued. Not held in memory: read
    /// by [`objects_of_studies`] when a requeue asks.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    study_objects: BTreeMap<String, Vec<String>>,
}

/// The objects (keyed hashes, as the ledger holds them) of each of `studies` that the
/// ledger under `state` names, from the latest segment that decided it.
pub async fn objects_of_studies(
    state: &Store,
    studies: &BTreeSet<String>,
) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut found = BTreeMap::new();
    if studies.is_empty() {
        return Ok(found);
    }
    for segment in state.list("ledger").await? {
        let segment: LedgerSegment = serde_json::from_slice(&state.get(&segment.key).await?)?;
        for (study, objects) in segment.study_objects {
            if studies.contains(&study) {
                found.insert(study, objects);
            }
        }
    }
    Ok(found)
}

/// What `panscreen requeue` asks of ingest: decide these objects and studies again.
/// Written under `<state>/requeue/`, applied and deleted by the next pass.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RequeueRequest {
    /// Object keys, as in the quarantine table's `inputs`.
    pub objects: Vec<String>,
    /// Study keys (pseudonyms).
    pub studies: Vec<String>,
    /// Objects by their ledger id (keyed hash), for studies whose rows list no keys.
    #[serde(default)]
    pub object_ids: Vec<String>,
}

/// Where requeue requests wait for ingest, under its state prefix.
pub const REQUEUE: &str = "requeue";

/// Segments beyond this many are merged into one when ingest starts.
const SEGMENTS_BEFORE_MERGE: usize = 64;

/// What one pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    pub listed: usize,
    /// Objects decided in this pass, and what became of them.
    pub decided: IngestReport,
    /// Studies seen but not yet complete.
    pub waiting_studies: usize,
}

pub struct Watcher {
    input: Store,
    state: Store,
    config: IngestConfig,
    completion: Completion,
    pseudonymizer: Pseudonymizer,
    sites: SiteRegistry,
    handled_objects: HashSet<String>,
    handled_studies: HashSet<String>,
    /// Headers of instances whose study is not complete yet, with their write time.
    waiting: HashMap<String, (InstanceHeader, OffsetDateTime)>,
    /// Passes in a row in which the store failed to serve an object.
    read_failures: HashMap<String, u32>,
    /// Requeue generation by study key or object hash.
    generations: BTreeMap<String, u32>,
}

/// An object the store fails to serve in this many passes in a row is quarantined.
const PASSES_BEFORE_GIVING_UP: u32 = 10;

fn folder(key: &str) -> &str {
    key.rsplit_once('/').map(|(folder, _)| folder).unwrap_or("")
}

/// Whether a marker lies in the folder of `key` or in a folder above it.
fn under_marker(marked: &BTreeSet<&str>, key: &str) -> bool {
    let mut folder = key;
    while let Some((parent, _)) = folder.rsplit_once('/') {
        if marked.contains(parent) {
            return true;
        }
        folder = parent;
    }
    marked.contains("")
}

impl Watcher {
    /// Reads the ledger under `state` (merging it when it has grown long).
    pub async fn open(
        input: Store,
        state: Store,
        config: IngestConfig,
        completion: Completion,
        pseudonymizer: Pseudonymizer,
        sites: SiteRegistry,
    ) -> anyhow::Result<Watcher> {
        let mut watcher = Watcher {
            input,
            state,
            config,
            completion,
            pseudonymizer,
            sites,
            handled_objects: HashSet::new(),
            handled_studies: HashSet::new(),
            waiting: HashMap::new(),
            read_failures: HashMap::new(),
            generations: BTreeMap::new(),
        };
        // Oldest first (keys are timestamps): a requeue forgets what came before it.
        let segments = watcher.state.list("ledger").await?;
        let merge = segments.len() > SEGMENTS_BEFORE_MERGE;
        let mut study_objects = BTreeMap::new();
        for segment in &segments {
            let bytes = watcher.state.get(&segment.key).await?;
            let mut segment: LedgerSegment = serde_json::from_slice(&bytes)?;
            if merge {
                study_objects.append(&mut segment.study_objects);
            }
            watcher.apply(segment);
        }
        if merge {
            let merged = LedgerSegment {
                objects: watcher.handled_objects.iter().cloned().collect(),
                studies: watcher.handled_studies.iter().cloned().collect(),
                generations: watcher.generations.clone(),
                study_objects,
                ..LedgerSegment::default()
            };
            watcher.write_segment(&merged).await?;
            for segment in segments {
                watcher.state.delete(&segment.key).await?;
            }
        }
        info!(
            objects = watcher.handled_objects.len(),
            studies = watcher.handled_studies.len(),
            "ledger read"
        );
        Ok(watcher)
    }

    fn apply(&mut self, segment: LedgerSegment) {
        self.handled_objects.extend(segment.objects);
        self.handled_studies.extend(segment.studies);
        for object in &segment.forgotten_objects {
            self.handled_objects.remove(object);
        }
        for study in &segment.forgotten_studies {
            self.handled_studies.remove(study);
        }
        for (id, generation) in segment.generations {
            let known = self.generations.entry(id).or_default();
            *known = (*known).max(generation);
        }
    }

    /// Applies the requeue requests waiting under `requeue/`: their objects and studies
    /// are forgotten (so this pass decides them again) with their generation raised, in
    /// a ledger segment, before the request is deleted.
    async fn take_requeue_requests(&mut self) -> anyhow::Result<usize> {
        let mut applied = 0;
        for request in self.state.list(REQUEUE).await? {
            let bytes = self.state.get(&request.key).await?;
            let Ok(asked) = serde_json::from_slice::<RequeueRequest>(&bytes) else {
                warn!("an unreadable requeue request, deleted");
                self.state.delete_if_present(&request.key).await?;
                continue;
            };
            let mut segment = LedgerSegment {
                forgotten_objects: asked
                    .objects
                    .iter()
                    .map(|key| self.object_id(key))
                    .chain(asked.object_ids.iter().cloned())
                    .collect(),
                forgotten_studies: asked.studies.clone(),
                ..LedgerSegment::default()
            };
            for id in segment.forgotten_objects.iter().chain(&segment.forgotten_studies) {
                segment
                    .generations
                    .insert(id.clone(), self.generations.get(id).copied().unwrap_or(0) + 1);
            }
            self.write_segment(&segment).await?;
            self.state.delete_if_present(&request.key).await?;
            applied += asked.objects.len() + asked.object_ids.len();
            self.apply(segment);
        }
        if applied > 0 {
            info!(objects = applied, "requeued objects will be decided again");
        }
        Ok(applied)
    }

    fn object_id(&self, key: &str) -> String {
        self.pseudonymizer.pseudonym("object-key", key)
    }

    async fn write_segment(&self, segment: &LedgerSegment) -> anyhow::Result<()> {
        let now = OffsetDateTime::now_utc().unix_timestamp_nanos();
        let key = format!("ledger/{now:024}.json");
        self.state.put(&key, Bytes::from(serde_json::to_vec(segment)?)).await?;
        Ok(())
    }

    /// Studies seen but not yet complete.
    pub fn waiting_studies(&self) -> usize {
        self.waiting
            .values()
            .map(|(header, _)| &header.study_instance_uid)
            .collect::<HashSet<_>>()
            .len()
    }

    /// Lists `prefixes`, reads the headers of objects not handled before, decides every
    /// complete study, publishes, and writes the ledger segment.
    ///
    /// One object never fails a pass: an object the store cannot name or read is
    /// quarantined (or ignored when it vanished), and one the store failed to serve
    /// (an outage) stays unhandled for the next pass. A prefix whose listing fails is
    /// left for the next pass too, and no study with files under it is decided now.
    pub async fn pass(
        &mut self,
        queue: &dyn Queue,
        prefixes: &[String],
    ) -> anyhow::Result<PassReport> {
        if let Err(error) = self.take_requeue_requests().await {
            warn!(error = %format!("{error:#}"), "reading requeue requests failed; the next pass tries again");
        }
        let mut listed: BTreeMap<String, ObjectInfo> = BTreeMap::new();
        let mut unlisted = BTreeMap::new();
        let mut failed_prefixes = Vec::new();
        for prefix in prefixes {
            match self.input.scan(prefix).await {
                Ok(listing) => {
                    listed.extend(
                        listing.objects.into_iter().map(|object| (object.key.clone(), object)),
                    );
                    unlisted.extend(
                        listing.unlisted.into_iter().map(|entry| (entry.key_lossy.clone(), entry)),
                    );
                }
                Err(error) => {
                    warn!(kind = ?error.kind(), "listing a watched prefix failed; the next pass tries again");
                    failed_prefixes.push(prefix.trim_matches('/').to_string());
                }
            }
        }
        let under_failed =
            |key: &str| failed_prefixes.iter().any(|p| p.is_empty() || key.starts_with(p.as_str()));
        let now = OffsetDateTime::now_utc();
        let mut report =
            PassReport { listed: listed.len() + unlisted.len(), ..PassReport::default() };
        let decided = &mut report.decided;
        let mut segment = LedgerSegment::default();
        let marker = self.completion.marker.as_str();
        let is_marker = |key: &str| !marker.is_empty() && key.rsplit('/').next() == Some(marker);
        let marked: BTreeSet<&str> =
            listed.keys().filter(|k| is_marker(k)).map(|k| folder(k)).collect();

        // Objects no earlier pass decided, with their ledger ids (one keyed hash each).
        let unhandled: Vec<(&String, String)> = listed
            .keys()
            .chain(unlisted.keys())
            .map(|key| (key, self.object_id(key)))
            .filter(|(_, id)| !self.handled_objects.contains(id))
            .collect();
        let mut markers = Vec::new();
        let mut to_read = Vec::new();
        for (key, _) in unhandled.iter().filter(|(key, _)| !self.waiting.contains_key(*key)) {
            if let Some(entry) = unlisted.get(*key) {
                if let ObjectOutcome::Quarantined(record) =
                    unlisted_outcome(&self.config, entry.clone())
                {
                    decided.quarantined_objects(&record.reason, 1);
                    decided.quarantined.push(record);
                }
            } else if is_marker(key) {
                markers.push(key.to_string());
            } else {
                to_read.push(&listed[*key]);
            }
        }
        let (input, config) = (&self.input, &self.config);
        let outcomes: Vec<_> = futures::stream::iter(to_read)
            .map(|object| async move {
                let outcome = read_object(input, config, object.key.clone(), object.size).await;
                (object, outcome)
            })
            .buffer_unordered(self.config.concurrency.max(1))
            .collect()
            .await;
        for key in markers {
            decided.ignored.push(IgnoredInput {
                input: key,
                reason: "completion marker, not an image".to_string(),
            });
        }
        // Objects the store failed to serve this time: not decided, read again next pass.
        let mut read_later: HashSet<String> = HashSet::new();
        for (object, outcome) in outcomes {
            let outcome = match outcome {
                Ok(outcome) => {
                    self.read_failures.remove(&object.key);
                    outcome
                }
                Err(error) if error.is_transient() => {
                    let failures = self.read_failures.entry(object.key.clone()).or_default();
                    *failures += 1;
                    if *failures < PASSES_BEFORE_GIVING_UP {
                        read_later.insert(object.key.clone());
                        continue;
                    }
                    self.read_failures.remove(&object.key);
                    unreadable_outcome(&self.config, object.key.clone(), &error)
                }
                Err(error) => unreadable_outcome(&self.config, object.key.clone(), &error),
            };
            match outcome {
                ObjectOutcome::Instance(header) => {
                    self.waiting.insert(header.key.clone(), (*header, object.last_modified));
                }
                ObjectOutcome::Quarantined(record) => {
                    decided.quarantined_objects(&record.reason, 1);
                    decided.quarantined.push(record);
                }
                ObjectOutcome::Ignored(ignored) => decided.ignored.push(ignored),
            }
        }
        let read_later_folders: HashSet<&str> = read_later.iter().map(|k| folder(k)).collect();
        if !read_later.is_empty() {
            warn!(
                objects = read_later.len(),
                "the store failed to serve some objects; the next pass reads them again"
            );
        }

        // Complete studies leave the waiting room.
        let mut by_study: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, (header, _)) in &self.waiting {
            by_study.entry(header.study_instance_uid.clone()).or_default().push(key.clone());
        }
        let quiet = time::Duration::try_from(self.completion.quiet).unwrap_or(time::Duration::MAX);
        for keys in by_study.into_values() {
            let last_write =
                keys.iter().map(|k| self.waiting[k].1).max().expect("a study has an instance");
            let complete =
                keys.iter().any(|k| under_marker(&marked, k)) || last_write + quiet <= now;
            // Some of its files may be among those not listed or read this time.
            let maybe_partial =
                keys.iter().any(|k| under_failed(k) || read_later_folders.contains(folder(k)));
            if !complete || maybe_partial {
                continue;
            }
            let instances: Vec<InstanceHeader> =
                keys.iter().map(|k| self.waiting.remove(k).expect("waiting instance").0).collect();
            let study_key = self.pseudonymizer.study(&instances[0].study_instance_uid);
            if self.handled_studies.contains(&study_key) {
                warn!(study = %study_key, files = instances.len(), "files arrived after their study was decided");
                decided.ignored.extend(instances.into_iter().map(|i| {
                    IgnoredInput {
                        input: i.key,
                        reason:
                            "arrived after its study was decided (raise the quiet period or send a completion marker)"
                                .to_string(),
                    }
                }));
                continue;
            }
            let generation = self.generations.get(&study_key).copied().unwrap_or(0);
            segment
                .study_objects
                .insert(study_key.clone(), keys.iter().map(|key| self.object_id(key)).collect());
            segment.studies.push(study_key);
            decide_study(
                &self.config,
                &self.pseudonymizer,
                &self.sites,
                instances,
                generation,
                decided,
            );
        }
        report.waiting_studies = self.waiting_studies();

        // Every listed object neither handled before nor still waiting was decided now.
        segment.objects = unhandled
            .into_iter()
            .filter(|(key, _)| !self.waiting.contains_key(*key) && !read_later.contains(*key))
            .map(|(_, id)| id)
            .collect();
        decided.objects_listed = segment.objects.len();
        if segment.objects.is_empty() {
            return Ok(report);
        }
        // An object requeued on its own (not part of a study) has a generation of its own.
        for record in decided.quarantined.iter_mut().filter(|record| record.study_key.is_none()) {
            record.generation =
                self.generations.get(&self.object_id(&record.input)).copied().unwrap_or(0);
        }
        publish(queue, &self.config.campaign, decided).await?;
        self.write_segment(&segment).await?;
        self.handled_objects.extend(segment.objects);
        self.handled_studies.extend(segment.studies);
        info!(
            listed = report.listed,
            studies = decided.studies.len(),
            quarantined = decided.quarantined.len(),
            ignored = decided.ignored.len(),
            waiting = report.waiting_studies,
            "ingest pass"
        );
        Ok(report)
    }
}
