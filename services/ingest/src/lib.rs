//! ingest: finds CT studies in object storage and hands each one, de-identified, to
//! preprocess.
//!
//! - [`header`]: one object's DICOM header, read without pixel data; truncation and
//!   non-DICOM input are caught here.
//! - [`select`]: instances grouped into series; the series to screen chosen and its
//!   geometry checked (orientation, size, spacing, missing or duplicate slices).
//! - [`deidentify`]: pseudonyms, age band, site and region.
//! - [`watch`]: the long-running ingest: a ledger of what was decided, completion of a
//!   study (marker or quiet period), requeue requests.
//! - [`submissions`]: the prefixes submitted to a campaign, as records in the store.
//! - [`accounting`]: the accounting table of a run or a pass.
//! - [`inspect`]: what a run would do with every object (`panscreen inspect`).
//! - [`service`]: the stage as it runs (`panscreen serve ingest`); the embedded run
//!   calls [`run_once`]. [`config`]: its settings. [`error`]: why an object or a study
//!   is not screened.
//!
//! Every listed object ends in exactly one place: part of a screened series, quarantined
//! with a reason, or ignored with a reason. [`IngestReport`] counts them.

pub mod accounting;
pub mod config;
pub mod deidentify;
pub mod error;
pub mod header;
pub mod inspect;
pub mod select;
pub mod service;
pub mod submissions;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use panscreen_shared::contracts::{
    subjects, IgnoredInput, IgnoredInputs, QuarantineRecord, SeriesChoice, SliceRef, Stage,
    StudyIngested,
};
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::queue::{Queue, QueueError};
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::{ObjectInfo, Store, StoreError, StoreErrorKind, UnlistedObject};
use time::OffsetDateTime;
use tracing::{info, warn};

pub use crate::config::IngestConfig;
use crate::header::{needs_more_bytes, InstanceHeader};
use crate::select::{choose_series, group_series};

/// What ingest made of every listed object.
#[derive(Debug, Default)]
pub struct IngestReport {
    pub objects_listed: usize,
    pub studies: Vec<StudyIngested>,
    pub quarantined: Vec<QuarantineRecord>,
    pub ignored: Vec<IgnoredInput>,
    /// Objects in screened series.
    pub objects_screened: usize,
    /// Objects behind the quarantine records (a quarantined study counts all its files).
    pub objects_quarantined: usize,
    /// The same, by quarantine reason.
    pub quarantined_objects_by_reason: BTreeMap<String, usize>,
}

/// One line of a run's accounting: how many input objects ended where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountingRow {
    /// `screened`, `quarantined` or `ignored`.
    pub outcome: &'static str,
    pub reason: String,
    pub objects: usize,
}

impl IngestReport {
    /// Counts `objects` quarantined for `reason`.
    pub fn quarantined_objects(&mut self, reason: &str, objects: usize) {
        self.objects_quarantined += objects;
        *self.quarantined_objects_by_reason.entry(reason.to_string()).or_default() += objects;
    }

    /// Where every listed object went, by outcome and reason. The objects add up to
    /// `objects_listed`.
    pub fn accounting(&self) -> Vec<AccountingRow> {
        let mut rows = vec![AccountingRow {
            outcome: "screened",
            reason: format!("in the series chosen for screening ({} studies)", self.studies.len()),
            objects: self.objects_screened,
        }];
        for (reason, objects) in &self.quarantined_objects_by_reason {
            rows.push(AccountingRow {
                outcome: "quarantined",
                reason: reason.clone(),
                objects: *objects,
            });
        }
        let mut ignored: BTreeMap<&str, usize> = BTreeMap::new();
        for input in &self.ignored {
            *ignored.entry(input.reason.as_str()).or_default() += 1;
        }
        for (reason, objects) in ignored {
            rows.push(AccountingRow { outcome: "ignored", reason: reason.to_string(), objects });
        }
        rows
    }

    /// Every listed object is accounted for exactly once.
    pub fn balanced(&self) -> bool {
        self.objects_screened + self.objects_quarantined + self.ignored.len() == self.objects_listed
    }
}

fn quarantine(
    campaign: &str,
    input: &str,
    study_key: Option<String>,
    site_id: Option<String>,
    reason: &str,
    detail: &str,
) -> QuarantineRecord {
    QuarantineRecord {
        campaign: campaign.to_string(),
        stage: Stage::Ingest,
        input: input.to_string(),
        inputs: vec![input.to_string()],
        study_key,
        site_id,
        reason: reason.to_string(),
        detail: detail.to_string(),
        attempts: 1,
        at: OffsetDateTime::now_utc(),
        generation: 0,
    }
}

pub(crate) enum ObjectOutcome {
    Instance(Box<InstanceHeader>),
    Quarantined(QuarantineRecord),
    Ignored(IgnoredInput),
}

/// An object the listing found but could not name as a key.
pub(crate) fn unlisted_outcome(config: &IngestConfig, unlisted: UnlistedObject) -> ObjectOutcome {
    ObjectOutcome::Quarantined(quarantine(
        &config.campaign,
        &unlisted.key_lossy,
        None,
        None,
        "object cannot be read by its name",
        &unlisted.reason,
    ))
}

/// What becomes of an object whose read failed for a reason other than an outage (those
/// are retried, see [`read_object_retrying`] and the watcher).
pub(crate) fn unreadable_outcome(
    config: &IngestConfig,
    key: String,
    error: &StoreError,
) -> ObjectOutcome {
    let (reason, detail) = match error.kind() {
        StoreErrorKind::NotFound => {
            return ObjectOutcome::Ignored(IgnoredInput {
                input: key,
                reason: "removed between listing and reading (nothing left to screen)".to_string(),
            })
        }
        StoreErrorKind::Denied => ("object cannot be read: permission denied", error.to_string()),
        StoreErrorKind::InvalidKey => ("object cannot be read by its name", error.to_string()),
        StoreErrorKind::Unavailable | StoreErrorKind::Configuration => {
            ("the store kept failing while this object was read", error.to_string())
        }
    };
    ObjectOutcome::Quarantined(quarantine(&config.campaign, &key, None, None, reason, &detail))
}

/// Reads one object's header, trying again on store outages (`attempts` in all, with
/// growing pauses), and always ends with an outcome: one object never stops a run.
pub(crate) async fn read_object_retrying(
    store: &Store,
    config: &IngestConfig,
    key: String,
    size: u64,
    attempts: u32,
) -> ObjectOutcome {
    let mut pause = std::time::Duration::from_millis(200);
    for attempt in 1..=attempts.max(1) {
        match read_object(store, config, key.clone(), size).await {
            Ok(outcome) => return outcome,
            Err(error) if error.is_transient() && attempt < attempts => {
                warn!(attempt, kind = ?error.kind(), "reading an object failed; trying again");
                tokio::time::sleep(pause).await;
                pause *= 4;
            }
            Err(error) => return unreadable_outcome(config, key, &error),
        }
    }
    unreachable!("the last attempt returns")
}

/// A header and how many bytes of its object were fetched to parse it.
#[derive(Debug)]
pub struct HeaderRead {
    pub parsed: Result<InstanceHeader, header::HeaderProblem>,
    pub bytes_read: u64,
}

/// Parses the header of the object `key` of `size` bytes from its first `first_bytes`,
/// fetching more only while the parser runs out: each further read fetches what follows,
/// up to four times as far, so a long header (an Enhanced CT's functional groups, a
/// vendor's large private element) costs a few range reads, never the whole pixel data.
pub async fn read_header(
    store: &Store,
    key: &str,
    size: u64,
    first_bytes: u64,
) -> Result<HeaderRead, StoreError> {
    let mut end = size.min(first_bytes.max(1));
    let mut bytes = store.get_range(key, 0, end).await?.to_vec();
    loop {
        match header::parse(key, size, &bytes) {
            Err(problem) if needs_more_bytes(&problem) && end < size => {
                let next = size.min(end.saturating_mul(4));
                bytes.extend_from_slice(&store.get_range(key, end, next).await?);
                end = next;
            }
            parsed => return Ok(HeaderRead { parsed, bytes_read: bytes.len() as u64 }),
        }
    }
}

pub(crate) async fn read_object(
    store: &Store,
    config: &IngestConfig,
    key: String,
    size: u64,
) -> Result<ObjectOutcome, StoreError> {
    if key.rsplit('/').next().is_some_and(|name| name.eq_ignore_ascii_case("DICOMDIR")) {
        return Ok(ObjectOutcome::Ignored(IgnoredInput {
            input: key,
            reason: "DICOMDIR index file, not an image".into(),
        }));
    }
    if key.ends_with('/') && size == 0 {
        return Ok(ObjectOutcome::Ignored(IgnoredInput {
            input: key,
            reason: "folder placeholder (an empty object whose key ends in /)".into(),
        }));
    }
    if size == 0 {
        return Ok(ObjectOutcome::Quarantined(quarantine(
            &config.campaign,
            &key,
            None,
            None,
            "empty file",
            "0 bytes",
        )));
    }
    if size > config.max_object_bytes {
        let detail =
            format!("{size} bytes; the limit is {} bytes (not read)", config.max_object_bytes);
        return Ok(ObjectOutcome::Quarantined(quarantine(
            &config.campaign,
            &key,
            None,
            None,
            "object is larger than the size limit",
            &detail,
        )));
    }
    let parsed = read_header(store, &key, size, config.header_bytes).await?.parsed;
    Ok(match parsed {
        Ok(instance) if instance.decoded_bytes() > config.max_decoded_bytes => {
            let detail = format!(
                "{}×{}×{} frames of {} bits would decode to {} bytes; the limit is {} bytes",
                instance.rows,
                instance.columns,
                instance.number_of_frames,
                instance.bits_allocated,
                instance.decoded_bytes(),
                config.max_decoded_bytes
            );
            ObjectOutcome::Quarantined(quarantine(
                &config.campaign,
                &key,
                None,
                None,
                "image would decode beyond the size limit",
                &detail,
            ))
        }
        Ok(instance) => ObjectOutcome::Instance(Box::new(instance)),
        Err(header::HeaderProblem::NonImage(name)) => ObjectOutcome::Ignored(IgnoredInput {
            input: key,
            reason: format!("not an image: {name}"),
        }),
        Err(problem) => ObjectOutcome::Quarantined(quarantine(
            &config.campaign,
            &key,
            None,
            None,
            problem.reason(),
            problem.detail(),
        )),
    })
}

/// The folder all `keys` share, by whole path segments ("" when they share none).
fn common_folder(keys: &[&str]) -> String {
    let folder = |key: &str| -> Vec<String> {
        let mut parts: Vec<String> = key.split('/').map(str::to_string).collect();
        parts.pop();
        parts
    };
    let Some(first) = keys.first() else {
        return String::new();
    };
    let mut common = folder(first);
    for key in &keys[1..] {
        let other = folder(key);
        let same = common.iter().zip(&other).take_while(|(a, b)| a == b).count();
        common.truncate(same);
    }
    if common.is_empty() {
        String::new()
    } else {
        format!("{}/", common.join("/"))
    }
}

/// Attempts at reading one object in an embedded run before a store outage quarantines it.
const READ_ATTEMPTS: u32 = 4;

/// What an embedded requeue decides again: objects by key and studies by key
/// (pseudonym), each with the generation its new outcome carries (one more than the
/// quarantine row it replaces).
#[derive(Debug, Clone, Default)]
pub struct Redo {
    pub objects: BTreeMap<String, u32>,
    pub studies: BTreeMap<String, u32>,
}

/// Lists the input, reads every header, and decides every study.
pub async fn scan(
    store: &Store,
    config: &IngestConfig,
    pseudonymizer: &Pseudonymizer,
    sites: &SiteRegistry,
) -> Result<IngestReport, StoreError> {
    scan_selected(store, config, pseudonymizer, sites, None).await
}

/// As [`scan`], deciding only what `redo` names (when given): its objects, and every
/// object of its studies and of the studies its objects belong to. Everything else is
/// left out of the report (it was decided by the run before).
pub async fn scan_selected(
    store: &Store,
    config: &IngestConfig,
    pseudonymizer: &Pseudonymizer,
    sites: &SiteRegistry,
    redo: Option<&Redo>,
) -> Result<IngestReport, StoreError> {
    let listing = store.scan(&config.prefix).await?;
    let object_generation = |key: &str| redo.and_then(|redo| redo.objects.get(key).copied());
    let selected = |key: &str| redo.is_none() || object_generation(key).is_some();
    let unlisted: Vec<UnlistedObject> =
        listing.unlisted.into_iter().filter(|unlisted| selected(&unlisted.key_lossy)).collect();
    // Objects of a study named only by its key can be anywhere: all headers are read then.
    let read_all = redo.is_none_or(|redo| !redo.studies.is_empty());
    let objects: Vec<ObjectInfo> =
        listing.objects.into_iter().filter(|o| read_all || selected(&o.key)).collect();
    let mut outcomes: Vec<(String, ObjectOutcome)> = unlisted
        .into_iter()
        .map(|unlisted| (unlisted.key_lossy.clone(), unlisted_outcome(config, unlisted)))
        .collect();
    outcomes.extend(
        futures::stream::iter(objects)
            .map(|object| async move {
                let key = object.key.clone();
                (
                    key,
                    read_object_retrying(store, config, object.key, object.size, READ_ATTEMPTS)
                        .await,
                )
            })
            .buffer_unordered(config.concurrency.max(1))
            .collect::<Vec<_>>()
            .await,
    );

    let mut studies: BTreeMap<String, Vec<InstanceHeader>> = BTreeMap::new();
    let mut report = IngestReport::default();
    for (key, outcome) in outcomes {
        match outcome {
            ObjectOutcome::Instance(instance) => {
                studies.entry(instance.study_instance_uid.clone()).or_default().push(*instance)
            }
            _ if !selected(&key) => {}
            ObjectOutcome::Quarantined(mut record) => {
                record.generation = object_generation(&key).unwrap_or(0);
                report.objects_listed += 1;
                report.quarantined_objects(&record.reason, 1);
                report.quarantined.push(record);
            }
            ObjectOutcome::Ignored(ignored) => {
                report.objects_listed += 1;
                report.ignored.push(ignored)
            }
        }
    }

    for instances in studies.into_values() {
        let generation = match redo {
            None => 0,
            Some(redo) => {
                let study_key = pseudonymizer.study(&instances[0].study_instance_uid);
                let by_object = instances.iter().filter_map(|i| object_generation(&i.key)).max();
                match (redo.studies.get(&study_key).copied(), by_object) {
                    (None, None) => continue,
                    (by_study, by_object) => by_study.max(by_object).unwrap_or(0),
                }
            }
        };
        report.objects_listed += instances.len();
        decide_study(config, pseudonymizer, sites, instances, generation, &mut report);
    }
    debug_assert!(report.balanced(), "every object accounted for once");
    Ok(report)
}

/// Decides one complete study: the series to screen and a message for preprocess, or a
/// quarantine record; the files of other series are ignored with a reason. `generation`
/// counts the study's requeues (0 on its first pass).
pub fn decide_study(
    config: &IngestConfig,
    pseudonymizer: &Pseudonymizer,
    sites: &SiteRegistry,
    instances: Vec<InstanceHeader>,
    generation: u32,
    report: &mut IngestReport,
) {
    let mut context =
        deidentify::study_context(&config.campaign, &instances[0], pseudonymizer, sites);
    context.generation = generation;
    let study_files = instances.len();
    let all_keys: Vec<String> = instances.iter().map(|i| i.key.clone()).collect();
    // The same instance sent twice (a re-send, a copy in two folders): keep one.
    let mut instances = instances;
    instances.sort_by(|a, b| a.key.cmp(&b.key));
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut unique = Vec::with_capacity(instances.len());
    let mut duplicates = 0usize;
    for instance in instances {
        match seen.get(&instance.sop_instance_uid) {
            Some(kept) => {
                duplicates += 1;
                report.ignored.push(IgnoredInput {
                    input: instance.key.clone(),
                    reason: format!("a second copy of {kept} (same SOP Instance UID)"),
                });
            }
            None => {
                seen.insert(instance.sop_instance_uid.clone(), instance.key.clone());
                unique.push(instance);
            }
        }
    }
    let study_files = study_files - duplicates;
    let series = group_series(unique.into_iter().flat_map(InstanceHeader::frames).collect());
    match choose_series(&series, &config.rules) {
        Ok(chosen) => {
            let first = &chosen.group.instances[0];
            for other in
                series.iter().filter(|g| g.series_instance_uid != chosen.group.series_instance_uid)
            {
                let why = chosen
                    .not_chosen
                    .iter()
                    .find(|(uid, _)| *uid == other.series_instance_uid)
                    .map(|(_, why)| why.as_str())
                    .unwrap_or("another series");
                for key in other.keys() {
                    report.ignored.push(IgnoredInput {
                        input: key.to_string(),
                        reason: format!("not the series chosen for screening ({why})"),
                    });
                }
            }
            let series_choice = SeriesChoice {
                series_key: pseudonymizer.series(&chosen.group.series_instance_uid),
                series_number: first.series_number,
                reason: chosen.reason.clone(),
                candidates: series.len() as u32,
                slices: chosen.group.instances.len() as u32,
                rows: first.rows,
                columns: first.columns,
                pixel_spacing_mm: first.pixel_spacing.unwrap_or([1.0, 1.0]),
                slice_spacing_mm: chosen.slice_spacing_mm,
                slice_thickness_mm: first.slice_thickness,
                not_chosen: chosen.not_chosen.iter().map(|(_, why)| why.clone()).collect(),
            };
            report.objects_screened += chosen.group.keys().count();
            info!(study = %context.study_key, slices = series_choice.slices, "study accepted");
            report.studies.push(StudyIngested {
                context,
                series: series_choice,
                image_orientation: first.image_orientation.expect("checked by choose_series"),
                slices: chosen
                    .group
                    .instances
                    .iter()
                    .map(|i| SliceRef {
                        key: i.key.clone(),
                        position_mm: i.image_position.expect("checked by choose_series"),
                        frame: i.frame.unwrap_or(0),
                    })
                    .collect(),
            });
        }
        Err(rejection) => {
            let keys: Vec<&str> = all_keys.iter().map(String::as_str).collect();
            warn!(study = %context.study_key, reason = %rejection.reason, "study quarantined");
            report.quarantined_objects(&rejection.reason, study_files);
            let folder = common_folder(&keys);
            let mut record = quarantine(
                &config.campaign,
                if folder.is_empty() { "(top level of the store)" } else { &folder },
                Some(context.study_key.clone()),
                Some(context.site_id.clone()),
                &rejection.reason,
                &format!("{} ({study_files} files)", rejection.detail),
            );
            record.inputs = all_keys;
            record.generation = generation;
            report.quarantined.push(record);
        }
    }
}

/// Ignored inputs travel in chunks of this many.
pub const IGNORED_PER_MESSAGE: usize = 500;

/// Publishes what a scan found: one message per study, one per quarantined input, and
/// the ignored inputs in chunks.
pub async fn publish(
    queue: &dyn Queue,
    campaign: &str,
    report: &IngestReport,
) -> Result<(), QueueError> {
    for study in &report.studies {
        let payload = Bytes::from(serde_json::to_vec(study).expect("contracts serialize"));
        queue
            .publish(
                &subjects::ingested(campaign),
                &study.context.message_id(Stage::Ingest),
                payload,
            )
            .await?;
    }
    for record in &report.quarantined {
        let payload = Bytes::from(serde_json::to_vec(record).expect("contracts serialize"));
        queue.publish(&subjects::quarantine(campaign), &record.message_id(), payload).await?;
    }
    for chunk in report.ignored.chunks(IGNORED_PER_MESSAGE) {
        let message = IgnoredInputs { campaign: campaign.to_string(), inputs: chunk.to_vec() };
        let payload = Bytes::from(serde_json::to_vec(&message).expect("contracts serialize"));
        queue.publish(&subjects::ignored(campaign), &message.message_id(), payload).await?;
    }
    Ok(())
}

/// Scans once and publishes: the embedded ingest.
pub async fn run_once(
    queue: Arc<dyn Queue>,
    store: &Store,
    config: &IngestConfig,
    pseudonymizer: &Pseudonymizer,
    sites: &SiteRegistry,
    redo: Option<&Redo>,
) -> anyhow::Result<IngestReport> {
    let report = scan_selected(store, config, pseudonymizer, sites, redo).await?;
    publish(&*queue, &config.campaign, &report).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_folder_is_whole_segments_of_any_script() {
        assert_eq!(common_folder(&["a/b/c1.dcm", "a/b/c2.dcm"]), "a/b/");
        assert_eq!(common_folder(&["a/x.dcm"]), "a/");
        assert_eq!(common_folder(&["site-x/1.dcm", "site-x/2.dcm"]), "site-x/");
        // The byte prefix of these two ends inside '增' and '平' (the panic of issue 10).
        assert_eq!(common_folder(&["病人甲/增强/IM_1.dcm", "病人甲/平扫/IM_2.dcm"]), "病人甲/");
        assert_eq!(common_folder(&["Müller/a.dcm", "Möller/a.dcm"]), "");
        assert_eq!(common_folder(&["ab/1.dcm", "abc/1.dcm"]), "");
        assert_eq!(common_folder(&["x.dcm", "y.dcm"]), "");
        assert_eq!(common_folder(&[]), "");
    }
}
