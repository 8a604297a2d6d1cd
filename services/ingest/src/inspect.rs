//! `panscreen inspect`: what a run would do with every object, from headers only.

use std::fmt::Write;

use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::{Store, StoreError};

use crate::{scan, IngestConfig, IngestReport};

/// A scan's report and how long it took.
pub struct Inspection {
    pub report: IngestReport,
    pub seconds: f64,
}

/// Lists `store` under `config.prefix`, reads every header and decides every study, as
/// a run would, without publishing anything (pseudonyms under a throwaway key).
pub async fn inspect(store: &Store, config: &IngestConfig) -> Result<Inspection, StoreError> {
    let started = std::time::Instant::now();
    let report = scan(store, config, &Pseudonymizer::ephemeral(), &SiteRegistry::builtin()).await?;
    Ok(Inspection { report, seconds: started.elapsed().as_secs_f64() })
}

impl Inspection {
    fn files_per_second(&self) -> f64 {
        self.report.objects_listed as f64 / self.seconds.max(1e-9)
    }

    /// One JSON document: counts, accounting, and each study's chosen series and why.
    pub fn to_json(&self) -> serde_json::Value {
        let report = &self.report;
        let accounting: Vec<serde_json::Value> = report
            .accounting()
            .iter()
            .map(|row| serde_json::json!({"outcome": row.outcome, "reason": row.reason, "objects": row.objects}))
            .collect();
        let studies: Vec<serde_json::Value> = report
            .studies
            .iter()
            .map(|study| {
                serde_json::json!({
                    "series_number": study.series.series_number,
                    "slices": study.series.slices,
                    "reason": study.series.reason,
                    "not_chosen": study.series.not_chosen,
                })
            })
            .collect();
        serde_json::json!({
            "objects_listed": report.objects_listed,
            "seconds": self.seconds,
            "files_per_second": self.files_per_second(),
            "accounting": accounting,
            "studies": studies,
        })
    }

    /// The same for a person.
    pub fn render(&self) -> String {
        let report = &self.report;
        let mut text = format!(
            "{} objects read (headers only) in {:.2} s, {:.0} files/s\n",
            report.objects_listed,
            self.seconds,
            self.files_per_second()
        );
        for row in report.accounting() {
            let _ = writeln!(text, "  {:<12} {:>7}  {}", row.outcome, row.objects, row.reason);
        }
        for study in &report.studies {
            let _ = writeln!(text, "study: {}", study.series.reason);
        }
        for record in &report.quarantined {
            let _ = writeln!(
                text,
                "quarantined {}: {} ({})",
                record.input, record.reason, record.detail
            );
        }
        text
    }
}
