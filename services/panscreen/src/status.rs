//! `panscreen status`: per stage, the backlog JetStream holds for it, what its
//! instances report (processed, quarantined, the last minute's throughput), and an
//! estimate of the time left.

use std::collections::BTreeMap;
use std::fmt::Write;

use futures::StreamExt;
use panscreen_shared::contracts::{subjects, Stage};
use panscreen_shared::queue::jetstream::Backlog;
use panscreen_shared::status::InstanceStats;
use serde::Serialize;
use time::OffsetDateTime;

use crate::serve::{consumers, ClusterArgs};

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageStatus {
    pub stage: String,
    /// Instances heard from in the last 30 s.
    pub instances: u32,
    pub pending: u64,
    pub in_flight: u64,
    pub redelivered: u64,
    pub processed: u64,
    pub quarantined: u64,
    /// Messages finished in the last minute, across live instances.
    pub per_minute: u64,
    /// (pending + in flight) / per minute; absent when nothing is moving.
    pub seconds_left: Option<f64>,
    /// Ingest only: studies seen whose files are still arriving.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_studies: Option<u64>,
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
    for request in crate::serve::submitted(cluster).await? {
        let holds_objects = root.has_objects(&request.prefix).await?;
        prefixes.push(SubmittedPrefix { prefix: request.prefix, submitted_at: request.requested_at, holds_objects });
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
    let mut stages: BTreeMap<Stage, StageStatus> =
        Stage::ALL.iter().map(|s| (*s, StageStatus { stage: s.to_string(), ..Default::default() })).collect();
    for (subject, stage) in consumers(&cluster.campaign) {
        let Backlog { pending, in_flight, redelivered, .. } =
            queue.backlog(&subject, &subjects::consumer(stage)).await?;
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
        if stats.is_fresh(now) {
            entry.instances += 1;
            entry.per_minute += stats.last_minute;
            if stats.stage == Stage::Ingest {
                *entry.waiting_studies.get_or_insert(0) += stats.in_flight;
            }
        }
    }
    for entry in stages.values_mut() {
        let backlog = entry.pending + entry.in_flight;
        entry.seconds_left = match (backlog, entry.per_minute) {
            (0, _) => Some(0.0),
            (_, 0) => None,
            (backlog, rate) => Some(backlog as f64 * 60.0 / rate as f64),
        };
    }
    let submitted = submitted_prefixes(cluster).await.ok();
    Ok(CampaignStatus {
        campaign: cluster.campaign.clone(),
        at: now,
        stages: stages.into_values().collect(),
        submitted,
    })
}

fn duration(seconds: Option<f64>) -> String {
    match seconds {
        None => "stalled".to_string(),
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
        .unwrap();
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
                duration(s.seconds_left)
            )
            .unwrap();
        }
        match &self.submitted {
            Some(prefixes) => {
                for prefix in prefixes {
                    let state = if prefix.holds_objects { "watched" } else { "watched, holds no objects" };
                    writeln!(out, "submitted {} ({state}, since {})", prefix.prefix, prefix.submitted_at).unwrap();
                }
            }
            None => writeln!(out, "submitted prefixes: the store cannot be read now").unwrap(),
        }
        if let Some(waiting) = self.stages.iter().find_map(|s| s.waiting_studies).filter(|w| *w > 0) {
            writeln!(out, "ingest: {waiting} studies still receiving files (quiet period or marker pending)").unwrap();
        }
        out
    }
}
