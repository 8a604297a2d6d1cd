//! The embedded pipeline: ingest, preprocess, infer and aggregate in one process, over
//! the in-memory queue and the local filesystem. The stage code is the same the
//! distributed services run; only the queue and the store differ.
//!
//! Completion: ingest scans once and closes its subject; each stage's workers end when
//! their input subject is closed and drained, and then its output subjects are closed.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use panscreen_aggregate::tables::RegionCounts;
use panscreen_aggregate::{AggregateConfig, Aggregator};
use panscreen_infer::config::{InferConfig, Placement};
use panscreen_infer::service::load_model;
use panscreen_ingest::{IngestConfig, IngestReport, Redo};
use panscreen_preprocess::config::PreprocessConfig;
use panscreen_shared::contracts::{subjects, Stage};
use panscreen_shared::manifest::ModelManifest;
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::queue::{MemoryQueue, Queue};
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::{OpenMode, Store};
use panscreen_shared::worker::{StageCounters, WorkerConfig};
use tracing::{info, warn};

#[derive(Debug)]
pub struct EmbeddedOptions {
    pub input: PathBuf,
    pub out: PathBuf,
    pub model: PathBuf,
    pub campaign: String,
    pub sites: SiteRegistry,
    pub pseudonymizer: Pseudonymizer,
    pub ephemeral_key: bool,
    /// Where and how the model runs.
    pub placement: Placement,
    pub batch_size: usize,
    /// How long an inference batch waits to fill.
    pub batch_max_wait: Duration,
    pub preprocess_workers: usize,
    pub min_slices: usize,
    pub keep_work: bool,
    pub overwrite: bool,
    pub progress: bool,
    /// Screen again only these objects and studies, into the tables already in `out`
    /// (`panscreen run --requeue`), which are compacted afterwards.
    pub redo: Option<Redo>,
}

/// What a run did, for the closing table.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub out: PathBuf,
    pub objects_listed: usize,
    pub objects_screened: usize,
    pub objects_quarantined: usize,
    pub objects_ignored: usize,
    pub studies_accepted: usize,
    pub results_written: usize,
    pub flagged: usize,
    pub quarantined_by_stage: Vec<(Stage, u64)>,
    pub regions: Vec<RegionCounts>,
    pub ingest_elapsed: Duration,
    pub elapsed: Duration,
    pub ephemeral_key: bool,
}

impl RunSummary {
    pub fn quarantined_total(&self) -> u64 {
        self.quarantined_by_stage.iter().map(|(_, n)| n).sum()
    }

    /// The closing table.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let line = |text: &mut String, s: String| {
            text.push_str(&s);
            text.push('\n');
        };
        line(
            &mut text,
            format!(
                "\npanscreen run finished in {:.1} s (ingest {:.1} s)",
                self.elapsed.as_secs_f64(),
                self.ingest_elapsed.as_secs_f64()
            ),
        );
        line(&mut text, "\ninput objects".to_string());
        line(&mut text, format!("  listed       {:>8}", self.objects_listed));
        line(
            &mut text,
            format!("  screened     {:>8}   (files of the series screened)", self.objects_screened),
        );
        line(&mut text, format!("  quarantined  {:>8}", self.objects_quarantined));
        line(&mut text, format!("  ignored      {:>8}", self.objects_ignored));
        line(&mut text, "\nstudies".to_string());
        line(&mut text, format!("  accepted by ingest  {:>6}", self.studies_accepted));
        line(&mut text, format!("  results written     {:>6}", self.results_written));
        line(&mut text, format!("  flagged for recall  {:>6}", self.flagged));
        let not_assessable: i64 = self.regions.iter().map(|r| r.not_assessable).sum();
        if not_assessable > 0 {
            line(
                &mut text,
                format!(
                    "  not assessable      {not_assessable:>6}   (no pancreas found, or it runs off \
                     the scan: not_assessable_reason in results)"
                ),
            );
        }
        for (stage, count) in &self.quarantined_by_stage {
            line(&mut text, format!("  quarantined at {:<10}{:>6}", stage.as_str(), count));
        }
        line(
            &mut text,
            "\nregion     name          screened  flagged  flag rate  not assessable  quarantined"
                .to_string(),
        );
        for region in &self.regions {
            let rate = if region.screened > 0 {
                region.flagged as f64 / region.screened as f64 * 100.0
            } else {
                0.0
            };
            line(
                &mut text,
                format!(
                    "{:<10} {:<13} {:>8}  {:>7}  {:>8.1}%  {:>14}  {:>11}",
                    region.region_code,
                    region.region_name,
                    region.screened,
                    region.flagged,
                    rate,
                    region.not_assessable,
                    region.quarantined
                ),
            );
        }
        line(&mut text, format!("\nresults     {}", self.out.join("results").display()));
        line(
            &mut text,
            format!("summary     {}", self.out.join("summary/summary.parquet").display()),
        );
        line(
            &mut text,
            format!("worklist    {}", self.out.join("worklist/worklist.parquet").display()),
        );
        line(&mut text, format!("quarantine  {}", self.out.join("quarantine").display()));
        line(&mut text, format!("logs        {}", self.out.join("logs/panscreen.jsonl").display()));
        if self.quarantined_total() > 0 {
            line(
                &mut text,
                format!(
                    "\n{} input(s) quarantined; reasons in the quarantine table",
                    self.quarantined_total()
                ),
            );
        }
        if self.ephemeral_key {
            line(
                &mut text,
                "\nnote: a throwaway pseudonym key was used; these pseudonyms match no other run"
                    .to_string(),
            );
        }
        text
    }
}

/// A progress bar on stderr (hidden when asked; indicatif also hides it when stderr
/// is not a terminal). Bars meant for a `MultiProgress` are made hidden and drawn once
/// added to it.
pub fn progress_bar(length: u64, stage: &str, hidden: bool) -> ProgressBar {
    let target = if hidden { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
    let bar = ProgressBar::with_draw_target(Some(length), target);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(stage.to_string());
    bar
}

const RESULT_DIRECTORIES: [&str; 7] =
    ["results", "quarantine", "ignored", "summary", "worklist", "_commits", "_staging"];

fn prepare_out(out: &std::path::Path, overwrite: bool) -> anyhow::Result<()> {
    for directory in RESULT_DIRECTORIES {
        let path = out.join(directory);
        if path.exists() {
            anyhow::ensure!(
                overwrite,
                "{} already holds tables of an earlier run; choose another --out, or pass --overwrite",
                out.display()
            );
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Runs the four stages over `options.input` and writes the tables to `options.out`.
pub async fn run_embedded(options: EmbeddedOptions) -> anyhow::Result<RunSummary> {
    let started = Instant::now();
    let input =
        Store::open(&options.input.to_string_lossy(), OpenMode::Existing).context("input")?;
    let manifest = Arc::new(ModelManifest::load(&options.model)?);
    if options.redo.is_none() {
        prepare_out(&options.out, options.overwrite)?;
    }
    let out = Store::open(&options.out.to_string_lossy(), OpenMode::Create)?;
    let work_dir = options.out.join("work");
    let work = Store::open(&work_dir.to_string_lossy(), OpenMode::Create)?;
    let run_id = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
    panscreen_shared::telemetry::init_file_and_stderr(
        &options.out.join("logs/panscreen.jsonl"),
        "info",
    )?;
    if options.ephemeral_key {
        warn!("no pseudonym key given (--key-file or PANSCREEN_PSEUDONYM_KEY): using a throwaway key for this run");
    }

    let model = load_model((*manifest).clone(), options.placement.clone()).await?;
    let device = options.placement.device;
    info!(model = %manifest.name, version = %manifest.version, %device, "model loaded");

    let queue = MemoryQueue::new();
    let dyn_queue: Arc<dyn Queue> = Arc::new(queue.clone());
    let campaign = options.campaign.clone();
    let counters: Vec<Arc<StageCounters>> =
        (0..3).map(|_| Arc::new(StageCounters::default())).collect();
    let (preprocess_counters, infer_counters, aggregate_counters) =
        (counters[0].clone(), counters[1].clone(), counters[2].clone());

    let mut aggregator = Aggregator::new(
        AggregateConfig::new(&campaign, &format!("run{run_id}")),
        out.clone(),
        options.sites.clone(),
        aggregate_counters.clone(),
    );
    // Fired once infer has ended: every message aggregate will get is then queued.
    let (producers_done, producers_done_rx) = tokio::sync::oneshot::channel::<()>();
    let aggregate_task = {
        let queue = dyn_queue.clone();
        tokio::spawn(async move {
            let done = async {
                let _ = producers_done_rx.await;
            };
            let result = panscreen_aggregate::service::serve(
                &mut aggregator,
                queue,
                std::future::pending(),
                done,
            )
            .await;
            (aggregator, result)
        })
    };
    // Each worker stage ends once its input subject is closed and drained.
    let preprocess_task = {
        let mut worker = WorkerConfig::new(&campaign, Stage::Preprocess);
        worker.concurrency = options.preprocess_workers.max(1);
        let config =
            PreprocessConfig { campaign: campaign.clone(), manifest: manifest.clone(), worker };
        let (queue, input, work, counters) =
            (dyn_queue.clone(), input.clone(), work.clone(), preprocess_counters.clone());
        tokio::spawn(panscreen_preprocess::service::serve(
            config,
            queue,
            input,
            work,
            counters,
            std::future::pending(),
        ))
    };
    let infer_task = {
        let mut worker = WorkerConfig::new(&campaign, Stage::Infer);
        worker.batch_linger = options.batch_max_wait;
        let config = InferConfig {
            campaign: campaign.clone(),
            batch_size: options.batch_size,
            keep_tensors: options.keep_work,
            worker,
        };
        let (queue, work, counters) = (dyn_queue.clone(), work.clone(), infer_counters.clone());
        tokio::spawn(panscreen_infer::service::serve(
            config,
            model,
            queue,
            work,
            counters,
            std::future::pending(),
        ))
    };

    let hidden = !options.progress;
    let bars = if hidden {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    } else {
        MultiProgress::new()
    };
    let ingest_bar = bars.add(progress_bar(0, "ingest", true));
    ingest_bar.set_message("reading headers");
    ingest_bar.enable_steady_tick(Duration::from_millis(200));
    let ingest_started = Instant::now();
    let mut ingest_config = IngestConfig::new(&campaign);
    ingest_config.rules.min_slices = options.min_slices;
    let report: IngestReport = panscreen_ingest::run_once(
        dyn_queue.clone(),
        &input,
        &ingest_config,
        &options.pseudonymizer,
        &options.sites,
        options.redo.as_ref(),
    )
    .await?;
    queue.close(&subjects::ingested(&campaign)).await;
    queue.close(&subjects::ignored(&campaign)).await;
    let ingest_elapsed = ingest_started.elapsed();
    anyhow::ensure!(report.balanced(), "ingest lost track of an input object; this is a bug");
    out.put(
        &format!("accounting/run{run_id}.parquet"),
        panscreen_ingest::accounting::table(&run_id, &report)?,
    )
    .await?;
    ingest_bar.set_length(report.objects_listed as u64);
    ingest_bar.set_position(report.objects_listed as u64);
    ingest_bar.finish_with_message(format!(
        "{} studies, {} quarantined, {} ignored",
        report.studies.len(),
        report.quarantined.len(),
        report.ignored.len()
    ));
    info!(
        objects = report.objects_listed,
        studies = report.studies.len(),
        quarantined = report.quarantined.len(),
        "ingest finished"
    );

    let studies = report.studies.len() as u64;
    let stage_bars = [
        (bars.add(progress_bar(studies, "preprocess", true)), preprocess_counters.clone()),
        (bars.add(progress_bar(studies, "infer", true)), infer_counters.clone()),
        (
            bars.add(progress_bar(studies + report.quarantined.len() as u64, "aggregate", true)),
            aggregate_counters.clone(),
        ),
    ];
    let ticker = {
        let stage_bars = stage_bars.clone();
        tokio::spawn(async move {
            loop {
                for (bar, counters) in &stage_bars {
                    let (processed, quarantined, retried) = counters.snapshot();
                    bar.set_position(processed + quarantined);
                    bar.set_message(format!("{quarantined} quarantined, {retried} retried"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    preprocess_task.await??;
    queue.close(&subjects::preprocessed(&campaign)).await;
    infer_task.await??;
    queue.close(&subjects::scored(&campaign)).await;
    queue.close(&subjects::quarantine(&campaign)).await;
    let _ = producers_done.send(());
    let (aggregator, aggregate_result) = aggregate_task.await?;
    aggregate_result?;
    ticker.abort();
    for (bar, counters) in &stage_bars {
        let (processed, quarantined, _) = counters.snapshot();
        bar.set_position(processed + quarantined);
        bar.finish();
    }
    if !options.keep_work {
        let _ = std::fs::remove_dir_all(&work_dir);
    }

    let mut aggregate_report = aggregator.report().clone();
    if options.redo.is_some() {
        // The earlier outcomes of what was screened again go; each study keeps its final one.
        let compacted =
            panscreen_aggregate::compact::compact(&out, &campaign, &options.sites).await?;
        info!(
            studies = compacted.studies,
            quarantine_rows = compacted.quarantine_rows,
            "compacted after the requeue"
        );
        aggregate_report.regions = compacted.regions;
    }
    let summary = RunSummary {
        out: options.out.clone(),
        objects_listed: report.objects_listed,
        objects_screened: report.objects_screened,
        objects_quarantined: report.objects_quarantined,
        objects_ignored: report.ignored.len(),
        studies_accepted: report.studies.len(),
        results_written: aggregate_report.results_written,
        flagged: aggregate_report.flagged,
        quarantined_by_stage: vec![
            (Stage::Ingest, report.quarantined.len() as u64),
            (Stage::Preprocess, preprocess_counters.quarantined.load(Ordering::Relaxed)),
            (Stage::Infer, infer_counters.quarantined.load(Ordering::Relaxed)),
        ],
        regions: aggregate_report.regions,
        ingest_elapsed,
        elapsed: started.elapsed(),
        ephemeral_key: options.ephemeral_key,
    };
    info!(
        results = summary.results_written,
        flagged = summary.flagged,
        quarantined = summary.quarantined_total(),
        elapsed_s = summary.elapsed.as_secs_f64(),
        "run finished"
    );
    Ok(summary)
}
