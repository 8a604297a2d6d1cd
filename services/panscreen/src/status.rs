//! `panscreen status`: per stage, the backlog JetStream holds for it, what its
//! instances report (processed, quarantined, the last minute's throughput), and an
//! estimate of the time left.

use std::collections::BTreeMap;
use std::fmt::Write;

use futures::StreamExt;
use panscreen_shared::contracts::{topology, Stage};
use panscreen_shared::queue::jetstream::Backlog;
use panscreen_shared::status::InstanceStats;
use serde::Serialize;
use time::OffsetDateTime;

use crate::settings::ClusterArgs;

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageStatus {
    pub stage: String,
    /// Instances heard from in the last 15 s.
    pub instances: u32,
    pub pending: u64,
    pub in_flight: u64,
    pub redelivered: u64,
    pub processed: u64,
    pub quarantined: u64,
    /// Messages finished per minute across live instances (each over the last minute,
    /// or over its life when younger).
    pub per_minute: u64,
    /// (pending + in flight) / rate; absent when it cannot be estimated (see `progress`).
    pub seconds_left: Option<f64>,
    /// "done", "moving", or why there is no estimate: "no instances" (backlog, nobody
    /// live), "working" (studies in flight, none finished yet in the window), "stalled"
    /// (backlog, live instances, nothing in flight or finished).
    pub progress: String,
    /// Ingest only: studies seen whose files are still arriving.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_studies: Option<u64>,
    /// Infer only: studies judged not assessable (in `processed` too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_assessable: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CampaignStatus {
    pub campaign: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub stages: Vec<StageStatus>,
    /// The prefixes submitted to the campaign, with whether each holds objects now
    /// (absent when the store could not be read).
    pub submitted: Option<Vec<SubmittedPrefix>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubmittedPrefix {
    pub prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    pub submitted_at: OffsetDateTime,
    /// False: nothing is there (yet); a typo in the prefix looks like this.
    pub holds_objects: bool,
}

async fn submitted_prefixes(cluster: &ClusterArgs) -> anyhow::Result<Vec<SubmittedPrefix>> {
    let root = cluster.store()?;
    let mut prefixes = Vec::new();
    for request in panscreen_ingest::submissions::submitted(&cluster.ingest_state()?).await? {
        let holds_objects = root.has_objects(&request.prefix).await?;
        prefixes.push(SubmittedPrefix {
            prefix: request.prefix,
            submitted_at: request.requested_at,
            holds_objects,
        });
    }
    Ok(prefixes)
}

pub async fn status(cluster: &ClusterArgs) -> anyhow::Result<CampaignStatus> {
    let queue = cluster.existing_queue().await?;
    if !queue.campaign_exists().await? {
        let known = queue.campaign_streams().await.unwrap_or_default();
        anyhow::bail!(
            "campaign {} has no stream ({}) on NATS: check --campaign / PANSCREEN_CAMPAIGN; streams there: {}",
            cluster.campaign,
            queue.stream_name(),
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        );
    }
    let now = OffsetDateTime::now_utc();
    let mut stages: BTreeMap<Stage, StageStatus> = Stage::ALL
        .iter()
        .map(|s| (*s, StageStatus { stage: s.to_string(), ..Default::default() }))
        .collect();
    let mut rates: BTreeMap<Stage, f64> = BTreeMap::new();
    for (subject, stage) in topology::consumers(&cluster.campaign) {
        let Backlog { pending, in_flight, redelivered, .. } =
            queue.backlog(&subject, &topology::consumer(stage)).await?;
        let entry = stages.get_mut(&stage).expect("every stage");
        entry.pending += pending;
        entry.in_flight += in_flight;
        entry.redelivered += redelivered;
    }
    let buckets = queue.existing_stats_bucket().await?;
    let mut keys = match &buckets {
        Some(bucket) => bucket.keys().await?.boxed(),
        None => futures::stream::empty().boxed(),
    };
    while let Some(key) = keys.next().await {
        let Some(bucket) = &buckets else { break };
        let Some(bytes) = bucket.get(key?).await? else { continue };
        let Ok(stats) = serde_json::from_slice::<InstanceStats>(&bytes) else { continue };
        let entry = stages.get_mut(&stats.stage).expect("every stage");
        entry.processed += stats.processed;
        entry.quarantined += stats.quarantined;
        if stats.stage == Stage::Infer {
            *entry.not_assessable.get_or_insert(0) += stats.not_assessable;
        }
        if stats.is_fresh(now) {
            entry.instances += 1;
            // Reports from before `per_minute` existed carry only the minute's count.
            let rate =
                if stats.per_minute > 0.0 { stats.per_minute } else { stats.last_minute as f64 };
            *rates.entry(stats.stage).or_default() += rate;
            if stats.stage == Stage::Ingest {
                *entry.waiting_studies.get_or_insert(0) += stats.in_flight;
            }
        }
    }
    for (stage, entry) in stages.iter_mut() {
        let rate = rates.get(stage).copied().unwrap_or(0.0);
        entry.per_minute = rate.round() as u64;
        (entry.seconds_left, entry.progress) =
            estimate(entry.pending, entry.in_flight, entry.instances, rate);
    }
    let submitted = submitted_prefixes(cluster).await.ok();
    Ok(CampaignStatus {
        campaign: cluster.campaign.clone(),
        at: now,
        stages: stages.into_values().collect(),
        submitted,
    })
}

/// Time left and what the stage is doing, from its backlog, live instances and rate.
fn estimate(
    pending: u64,
    in_flight: u64,
    instances: u32,
    per_minute: f64,
) -> (Option<f64>, String) {
    let backlog = pending + in_flight;
    let (seconds, progress) = match (backlog, instances, per_minute > 0.0) {
        (0, _, _) => (Some(0.0), "done"),
        (_, 0, _) => (None, "no instances"),
        (_, _, true) => (Some(backlog as f64 * 60.0 / per_minute), "moving"),
        _ if in_flight > 0 => (None, "working"),
        _ => (None, "stalled"),
    };
    (seconds, progress.to_string())
}

fn time_left(seconds: Option<f64>, progress: &str) -> String {
    match seconds {
        None => progress.to_string(),
        Some(s) if s < 1.0 => "-".to_string(),
        Some(s) if s < 120.0 => format!("{s:.0} s"),
        Some(s) if s < 7200.0 => format!("{:.0} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

impl CampaignStatus {
    pub fn render(&self) -> String {
        let mut out = format!("campaign {} at {}\n", self.campaign, self.at);
        writeln!(
            out,
            "{:<11}{:>10}{:>9}{:>11}{:>13}{:>11}{:>13}{:>9}{:>11}",
            "stage",
            "instances",
            "pending",
            "in flight",
            "redelivered",
            "processed",
            "quarantined",
            "per min",
            "time left"
        )
        .expect("a String takes every write");
        for s in &self.stages {
            writeln!(
                out,
                "{:<11}{:>10}{:>9}{:>11}{:>13}{:>11}{:>13}{:>9}{:>11}",
                s.stage,
                s.instances,
                s.pending,
                s.in_flight,
                s.redelivered,
                s.processed,
                s.quarantined,
                s.per_minute,
                time_left(s.seconds_left, &s.progress)
            )
            .expect("a String takes every write");
        }
        match &self.submitted {
            Some(prefixes) => {
                for prefix in prefixes {
                    let state =
                        if prefix.holds_objects { "watched" } else { "watched, holds no objects" };
                    writeln!(
                        out,
                        "submitted {} ({state}, since {})",
                        prefix.prefix, prefix.submitted_at
                    )
                    .expect("a String takes every write");
                }
            }
            None => writeln!(out, "submitted prefixes: the store cannot be read now")
                .expect("a String takes every write"),
        }
        if let Some(waiting) = self.stages.iter().find_map(|s| s.waiting_studies).filter(|w| *w > 0)
        {
            writeln!(
                out,
                "ingest: {waiting} studies still receiving files (quiet period or marker pending)"
            )
            .expect("a String takes every write");
        }
        if let Some(count) = self.stages.iter().find_map(|s| s.not_assessable).filter(|n| *n > 0) {
            writeln!(
                out,
                "infer: {count} of the processed studies not assessable (no pancreas found, or it \
                 runs off the scan): no probability, never counted as negative"
            )
            .expect("a String takes every write");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_says_why_when_it_cannot_be_estimated() {
        assert_eq!(estimate(0, 0, 0, 0.0), (Some(0.0), "done".to_string()));
        assert_eq!(estimate(10, 2, 0, 0.0), (None, "no instances".to_string()));
        // A young instance busy with its first long studies is working, not stalled.
        assert_eq!(estimate(56, 2, 1, 0.0), (None, "working".to_string()));
        assert_eq!(estimate(56, 0, 1, 0.0), (None, "stalled".to_string()));
        let (seconds, progress) = estimate(54, 6, 2, 30.0);
        assert_eq!((seconds, progress.as_str()), (Some(120.0), "moving"));
        assert_eq!(time_left(Some(120.0), "moving"), "2 min");
        assert_eq!(time_left(None, "working"), "working");
    }

    #[test]
    fn the_studies_not_assessable_are_said_apart() {
        let stage = |name: &str, not_assessable| StageStatus {
            stage: name.into(),
            processed: 40,
            not_assessable,
            ..StageStatus::default()
        };
        let mut status = CampaignStatus {
            campaign: "c".into(),
            at: OffsetDateTime::UNIX_EPOCH,
            stages: vec![stage("preprocess", None), stage("infer", Some(3))],
            submitted: Some(Vec::new()),
        };
        assert!(status.render().contains("infer: 3 of the processed studies not assessable"));
        status.stages[1].not_assessable = Some(0);
        assert!(!status.render().contains("not assessable"));
    }
}
