//! Subcommands and flags.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::store::{OpenMode, Store};

use crate::pipeline::{self, EmbeddedOptions};
use crate::settings::{load_pseudonymizer, load_sites, ClusterArgs, ModelArgs};
use panscreen_synth::{Anatomy, Poses, Size, SynthOptions};

#[derive(Debug, Parser)]
#[command(
    name = "panscreen",
    version,
    about = "Population-scale screening for pancreatic lesions on routine non-contrast CT"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Write a cohort of synthetic non-contrast abdominal CT studies as DICOM.
    Synth(SynthArgs),
    /// Run ingest, preprocess, infer and aggregate in one process (no servers).
    Run(RunArgs),
    /// Read headers only and say what a run would do with every object: which series of
    /// each study would be screened, what would be quarantined or ignored, and why.
    Inspect(InspectArgs),
    /// Compare a run's results with the labels of a synthetic cohort.
    Evaluate(EvaluateArgs),
    /// Run one stage as a service over NATS JetStream and an object store.
    Serve(crate::serve::ServeArgs),
    /// Register a prefix of the store with the ingest service, which screens what is there.
    Submit(crate::serve::SubmitArgs),
    /// Create the campaign's JetStream stream, consumers and status bucket (idempotent).
    Setup(ClusterArgs),
    /// Per stage: backlog, processed, quarantined, throughput, time left.
    Status(StatusArgs),
    /// Merge small result files, drop duplicates, write the summary and worklist.
    Compact(CompactArgs),
    /// Send quarantined inputs through the pipeline again (after the cause is fixed).
    Requeue(RequeueArgs),
    /// Models: write a manifest for a trained model.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Internal: decodes JPEG-LS and 12-bit JPEG frames with GDCM for another panscreen
    /// process, on stdin and stdout (a crash in GDCM ends only this helper).
    #[command(name = "gdcm-decoder", hide = true)]
    GdcmDecoder,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a manifest for a model trained with nnU-Net v2 and exported to ONNX (its
    /// plans.json and dataset.json give the patch, spacing, CT normalisation and labels).
    #[command(name = "import-nnunet")]
    ImportNnunet(ImportNnunetArgs),
    /// Write a synthetic cohort as a cascade sees it (both grids, through the production
    /// ingest and preprocess) with the phantom's voxel truth on them: a training set.
    Dataset(crate::dataset::DatasetArgs),
}

#[derive(Debug, Args)]
pub struct ImportNnunetArgs {
    /// nnU-Net's plans.json of the trained model.
    #[arg(long)]
    pub plans: PathBuf,
    /// nnU-Net's dataset.json of the dataset it was trained on.
    #[arg(long = "dataset-json")]
    pub dataset_json: PathBuf,
    /// The network exported to ONNX: one patch in, per-class logits out.
    #[arg(long)]
    pub onnx: PathBuf,
    /// The model directory to write (manifest.toml and a copy of the ONNX file).
    #[arg(long)]
    pub out: PathBuf,
    /// A cascade's model directory whose stage 1 (locate) finds the pancreas for this
    /// network: the result is a two-stage model that sees the box around the pancreas.
    #[arg(long)]
    pub locate: Option<PathBuf>,
    /// The plans' configuration the network was trained in.
    #[arg(long, default_value = "3d_fullres")]
    pub configuration: String,
    /// The dataset's label that is the lesion.
    #[arg(long, default_value = "lesion")]
    pub lesion_label: String,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Directory or store URL holding the DICOM files.
    #[arg(long, env = "PANSCREEN_INPUT")]
    pub input: String,
    /// Smallest series that is screened.
    #[arg(long, default_value_t = 20, env = "PANSCREEN_MIN_SLICES")]
    pub min_slices: usize,
    /// Objects read at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Machine-readable output: one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RequeueArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Only rows whose reason contains this text.
    #[arg(long)]
    pub reason: Option<String>,
    /// Only rows of this stage (ingest, preprocess, infer, aggregate).
    #[arg(long)]
    pub stage: Option<String>,
    /// Say what would be requeued; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The output directory of `panscreen run`, or the store of a distributed campaign
    /// (with --campaign: its tables are under campaigns/<campaign>/out/).
    #[arg(long, env = "PANSCREEN_STORE")]
    pub store: String,
    #[arg(long, env = "PANSCREEN_CAMPAIGN")]
    pub campaign: Option<String>,
    #[arg(long, env = "PANSCREEN_SITES")]
    pub sites: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory; studies go to OUT/studies/, ground truth to OUT/labels.parquet.
    #[arg(long, env = "PANSCREEN_SYNTH_OUT")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 20, env = "PANSCREEN_SYNTH_STUDIES")]
    pub studies: usize,
    #[arg(long, default_value_t = 1, env = "PANSCREEN_SYNTH_SEED")]
    pub seed: u64,
    /// Fraction of studies with a pancreatic lesion.
    #[arg(long, default_value_t = 0.1, env = "PANSCREEN_SYNTH_PREVALENCE")]
    pub prevalence: f64,
    #[arg(long, value_enum, default_value_t = Size::Small, env = "PANSCREEN_SYNTH_SIZE")]
    pub size: Size,
    /// Site registry (TOML); the built-in one when absent.
    #[arg(long, env = "PANSCREEN_SITES")]
    pub sites: Option<PathBuf>,
    /// Threads writing studies (default: all cores).
    #[arg(long, env = "PANSCREEN_SYNTH_THREADS")]
    pub threads: Option<usize>,
    /// Write studies as scanners send them: beside the plain axial series, two scouts, a
    /// contrast-enhanced phase, a 5 mm reformat, a secondary capture and a dose report.
    #[arg(long, env = "PANSCREEN_SYNTH_REALISTIC_STUDIES")]
    pub realistic_studies: bool,
    /// Slices per series, overriding the size's own count.
    #[arg(long, env = "PANSCREEN_SYNTH_SLICES")]
    pub slices: Option<usize>,
    /// Distance between slices in mm, overriding the size's own draw (with --slices, a
    /// scan of a chosen length).
    #[arg(long, env = "PANSCREEN_SYNTH_SLICE_SPACING_MM", value_parser = positive_mm)]
    pub slice_spacing_mm: Option<f64>,
    /// Which phantom: screening (every build, mimics, hard lesions, correlated noise,
    /// long scans; docs/synthetic-data.md) or basic (one build, easy lesions, white
    /// noise; the default before 2026-12).
    #[arg(long, value_enum, default_value = "screening", env = "PANSCREEN_SYNTH_ANATOMY")]
    pub anatomy: Anatomy,
    /// How patients lie: standard (supine, head first, centred) or varied (shifted up
    /// to ±40 mm, turned up to ±10°, some prone, some feet first; in labels.parquet).
    /// Default: standard for the basic phantom, varied for the screening one.
    #[arg(long, value_enum, env = "PANSCREEN_SYNTH_POSES")]
    pub poses: Option<Poses>,
    /// Centre every scan at this head–foot position (mm; the pancreas lies within 25 mm
    /// of 0): −200 scans the pelvis only, −90 cuts the pancreas. Default: within ±15 mm.
    #[arg(long, allow_hyphen_values = true, env = "PANSCREEN_SYNTH_SCAN_CENTRE_Z_MM")]
    pub scan_centre_z_mm: Option<f64>,
    /// Write only the studies with a lesion of LOW ≤ diameter < HIGH mm, as LOW..HIGH.
    /// All --studies are drawn; those left out are not written, so each study written
    /// is the one the whole cohort holds under its index: a cohort enriched for one
    /// stratum (learned-cascade's small-lesion training data, say).
    #[arg(long, env = "PANSCREEN_SYNTH_ONLY_LESIONS_MM", value_parser = mm_range)]
    pub only_lesions_mm: Option<(f64, f64)>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory holding the DICOM files to screen (any layout).
    #[arg(long, env = "PANSCREEN_INPUT")]
    pub input: PathBuf,
    /// Output directory for the Parquet tables and logs.
    #[arg(long, env = "PANSCREEN_OUT")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Campaign id: scopes subjects and outputs.
    #[arg(long, default_value = "default", env = "PANSCREEN_CAMPAIGN")]
    pub campaign: String,
    /// File holding the pseudonym key (at least 32 bytes). Without it (and without
    /// PANSCREEN_PSEUDONYM_KEY) a throwaway key is used.
    #[arg(long, env = "PANSCREEN_PSEUDONYM_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Site registry (TOML); the built-in one when absent.
    #[arg(long, env = "PANSCREEN_SITES")]
    pub sites: Option<PathBuf>,
    /// Studies preprocessed at once.
    #[arg(long, default_value_t = 2, env = "PANSCREEN_PREPROCESS_WORKERS")]
    pub preprocess_workers: usize,
    /// Smallest series that is screened.
    #[arg(long, default_value_t = 20, env = "PANSCREEN_MIN_SLICES")]
    pub min_slices: usize,
    /// Keep the model-ready tensors under OUT/work/.
    #[arg(long, env = "PANSCREEN_KEEP_WORK")]
    pub keep_work: bool,
    /// Replace the tables of an earlier run in OUT.
    #[arg(long, env = "PANSCREEN_OVERWRITE")]
    pub overwrite: bool,
    /// No progress bars.
    #[arg(long, env = "PANSCREEN_NO_PROGRESS")]
    pub no_progress: bool,
    /// Screen again what OUT's quarantine table holds (after its cause is fixed), into
    /// the same OUT: each study ends with one final outcome. Needs the run's --key-file.
    #[arg(long, conflicts_with = "overwrite")]
    pub requeue: bool,
    /// With --requeue: only rows whose reason contains this text.
    #[arg(long, requires = "requeue")]
    pub reason: Option<String>,
    /// With --requeue: only rows of this stage (ingest, preprocess, infer, aggregate).
    #[arg(long, requires = "requeue")]
    pub stage: Option<String>,
    /// With --requeue: say what would be screened again; change nothing.
    #[arg(long, requires = "requeue")]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// labels.parquet written by `panscreen synth`. Give `--labels` and `--results` once
    /// per cohort, in the same order, to evaluate several cohorts pooled.
    #[arg(long, required = true)]
    pub labels: Vec<PathBuf>,
    /// Output directory of `panscreen run`.
    #[arg(long, required = true)]
    pub results: Vec<PathBuf>,
    /// The pseudonym key file the run used.
    #[arg(long, env = "PANSCREEN_PSEUDONYM_KEY_FILE")]
    pub key_file: PathBuf,
    /// Prevalence of lesions in the population to be screened, for the predictive
    /// values a screening programme would see (the cohort's own is reported too).
    #[arg(long, default_value_t = 0.001, env = "PANSCREEN_SCREENING_PREVALENCE")]
    pub screening_prevalence: f64,
    /// Where the figures are written as Parquet [default, for one cohort:
    /// RESULTS/evaluation/evaluation.parquet; needed when pooling].
    #[arg(long, env = "PANSCREEN_EVALUATION_OUT")]
    pub out: Option<PathBuf>,
    /// Judge the held-out gate of the reference model (lesions ≥ 10 mm and ≥ 10 HU
    /// against every lesion-free study: AUC ≥ 0.95, and sensitivity ≥ 0.90 and
    /// specificity ≥ 0.95 at the operating point the run flagged by): print the verdict
    /// last, and exit with an error when any part is missed.
    #[arg(long)]
    pub gate: bool,
}

pub fn execute(cli: Cli) -> anyhow::Result<()> {
    // GDCM frames are decoded by this same program, run as a helper.
    if let Ok(program) = std::env::current_exe() {
        panscreen_preprocess::gdcm_helper::set_program(program);
    }
    match cli.command {
        Command::GdcmDecoder => gdcm_decoder(),
        Command::Synth(args) => synth(args),
        Command::Run(args) => run(args),
        Command::Serve(args) => serve(args),
        Command::Submit(args) => submit(args),
        Command::Setup(cluster) => setup(cluster),
        Command::Status(args) => status(args),
        Command::Inspect(args) => inspect(args),
        Command::Compact(args) => compact(args),
        Command::Requeue(args) => requeue(args),
        Command::Evaluate(args) => evaluate(args),
        Command::Model(ModelCommand::ImportNnunet(args)) => import_nnunet(args),
        Command::Model(ModelCommand::Dataset(args)) => {
            panscreen_shared::telemetry::init_stderr("warn", false);
            crate::dataset::build(args)
        }
    }
}

/// `panscreen model import-nnunet`.
fn import_nnunet(args: ImportNnunetArgs) -> anyhow::Result<()> {
    panscreen_shared::telemetry::init_stderr("warn", false);
    let manifest =
        panscreen_infer::import::import_nnunet(&panscreen_infer::import::NnUnetExport {
            plans: args.plans,
            dataset_json: args.dataset_json,
            onnx: args.onnx,
            configuration: args.configuration,
            lesion_label: args.lesion_label,
            out: args.out,
            locate: args.locate,
        })?;
    println!(
        "wrote {} (checked against the ONNX file); run it with --model {}",
        manifest.display(),
        manifest.parent().map(|p| p.display().to_string()).unwrap_or_default()
    );
    Ok(())
}

/// The runtime a command's async work runs on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Serves GDCM frame decoding on stdin and stdout (the hidden helper).
fn gdcm_decoder() -> anyhow::Result<()> {
    panscreen_preprocess::gdcm_helper::serve(std::io::stdin().lock(), std::io::stdout().lock())?;
    Ok(())
}

/// A distance in mm above zero (clap's parser for one).
fn positive_mm(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(mm) if mm.is_finite() && mm > 0.0 => Ok(mm),
        Ok(mm) => Err(format!("{mm} mm: a distance above 0 expected")),
        Err(error) => Err(format!("{text:?} is not a number of mm: {error}")),
    }
}

fn mm_range(text: &str) -> Result<(f64, f64), String> {
    let expected = || format!("{text:?}: LOW..HIGH in mm expected, 0 <= LOW < HIGH (9..16, say)");
    let (low, high) = text.split_once("..").ok_or_else(expected)?;
    match (low.trim().parse::<f64>(), high.trim().parse::<f64>()) {
        (Ok(low), Ok(high)) if panscreen_synth::is_diameter_range(low, high) => Ok((low, high)),
        _ => Err(expected()),
    }
}

/// `panscreen synth`.
fn synth(args: SynthArgs) -> anyhow::Result<()> {
    panscreen_shared::telemetry::init_stderr("warn", false);
    let options = SynthOptions {
        out: args.out.clone(),
        studies: args.studies,
        seed: args.seed,
        prevalence: args.prevalence,
        size: args.size,
        sites: load_sites(&args.sites)?,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        realistic: args.realistic_studies,
        slices: args.slices,
        slice_spacing_mm: args.slice_spacing_mm,
        poses: args.poses.unwrap_or(match args.anatomy {
            Anatomy::Basic => Poses::Standard,
            Anatomy::Screening => Poses::Varied,
        }),
        anatomy: args.anatomy,
        scan_centre_z_mm: args.scan_centre_z_mm,
        only_lesions_mm: args.only_lesions_mm,
    };
    let bar = pipeline::progress_bar(args.studies as u64, "synth", false);
    let truths = panscreen_synth::synthesize(&options, &|_| bar.inc(1))?;
    bar.finish_and_clear();
    let lesions = truths.iter().filter(|t| t.lesion.is_some()).count();
    let drawn = match args.only_lesions_mm {
        Some((low, high)) => {
            format!(" of {} drawn: those with a lesion of {low}..{high} mm", args.studies)
        }
        None => String::new(),
    };
    let studies = if truths.len() == 1 { "study" } else { "studies" };
    println!(
        "wrote {} {studies} ({} with a lesion{drawn}) to {}; ground truth in {}",
        truths.len(),
        lesions,
        args.out.join("studies").display(),
        args.out.join("labels.parquet").display()
    );
    Ok(())
}

/// `panscreen run` (and `run --requeue`).
fn run(args: RunArgs) -> anyhow::Result<()> {
    let (pseudonymizer, ephemeral) = load_pseudonymizer(&args.key_file)?;
    let runtime = runtime()?;
    let redo = if args.requeue {
        anyhow::ensure!(
            !ephemeral,
            "--requeue needs the pseudonym key of the run that wrote {} (--key-file): studies are \
             matched by their pseudonyms",
            args.out.display()
        );
        let out = Store::open(&args.out.to_string_lossy(), OpenMode::Existing)?;
        anyhow::ensure!(
            runtime.block_on(out.has_objects("_commits"))?,
            "{} holds no tables of an earlier run; nothing to requeue",
            args.out.display()
        );
        let selection =
            crate::requeue::Selection { reason: args.reason.clone(), stage: args.stage.clone() };
        let (redo, report) = runtime.block_on(crate::requeue::redo(&out, &selection))?;
        print!("{}", report.render_embedded(args.dry_run));
        if args.dry_run || report.rows_requeued == 0 {
            return Ok(());
        }
        Some(redo)
    } else {
        None
    };
    let (placement, batch_max_wait) = (args.model.placement(), args.model.batch_max_wait());
    let options = EmbeddedOptions {
        input: args.input,
        out: args.out,
        model: args.model.model,
        campaign: args.campaign,
        sites: load_sites(&args.sites)?,
        pseudonymizer,
        ephemeral_key: ephemeral,
        placement,
        batch_size: args.model.batch_size,
        batch_max_wait,
        preprocess_workers: args.preprocess_workers,
        min_slices: args.min_slices,
        keep_work: args.keep_work,
        overwrite: args.overwrite,
        progress: !args.no_progress,
        redo,
    };
    let summary = runtime.block_on(pipeline::run_embedded(options))?;
    print!("{}", summary.render());
    Ok(())
}

/// `panscreen serve <stage>`.
fn serve(args: crate::serve::ServeArgs) -> anyhow::Result<()> {
    panscreen_shared::telemetry::init_stderr("info", true);
    let runtime = runtime()?;
    runtime.block_on(crate::serve::serve(args, crate::serve::shutdown_signal()))
}

/// `panscreen submit` (and `--list`, `--remove`).
fn submit(args: crate::serve::SubmitArgs) -> anyhow::Result<()> {
    panscreen_shared::telemetry::init_stderr("warn", false);
    let runtime = runtime()?;
    let campaign = args.cluster.campaign.clone();
    if args.list {
        for request in runtime.block_on(crate::serve::submitted(&args.cluster))? {
            println!("{}\tsubmitted {}", request.prefix, request.requested_at);
        }
        return Ok(());
    }
    if let Some(prefix) = &args.remove {
        let removed = runtime.block_on(crate::serve::withdraw(&args.cluster, prefix))?;
        anyhow::ensure!(
            removed,
            "'{prefix}' is not submitted to campaign {campaign} (see submit --list)"
        );
        println!("campaign {campaign} no longer watches '{prefix}'; what was screened stays in the tables");
        return Ok(());
    }
    let submitted = runtime.block_on(crate::serve::submit(args))?;
    let prefix = &submitted.prefix;
    println!("submitted prefix '{prefix}' to campaign {campaign}; the ingest service screens it");
    if submitted.empty {
        println!("note: '{prefix}' holds no objects yet; ingest screens what arrives there");
    }
    if !submitted.notified {
        println!("note: NATS did not take the wake-up; ingest finds the prefix at its next rescan");
    }
    Ok(())
}

/// `panscreen setup`.
fn setup(cluster: ClusterArgs) -> anyhow::Result<()> {
    panscreen_shared::telemetry::init_stderr("warn", false);
    let runtime = runtime()?;
    let consumers = runtime.block_on(crate::serve::setup(&cluster))?;
    println!(
        "stream {} ready with consumers {}",
        panscreen_shared::queue::jetstream::stream_name(&cluster.campaign),
        consumers.join(", ")
    );
    Ok(())
}

/// `panscreen status`.
fn status(args: StatusArgs) -> anyhow::Result<()> {
    panscreen_shared::telemetry::init_stderr("warn", false);
    let runtime = runtime()?;
    let status = runtime.block_on(crate::status::status(&args.cluster))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render());
    }
    Ok(())
}

/// `panscreen inspect`.
fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    panscreen_shared::telemetry::init_stderr("warn", false);
    let store = Store::open(&args.input, OpenMode::Existing)
        .with_context(|| format!("input {}", args.input))?;
    let mut config = panscreen_ingest::IngestConfig::new("inspect");
    config.rules.min_slices = args.min_slices;
    config.concurrency = args.concurrency.max(1);
    let inspection = runtime()?.block_on(panscreen_ingest::inspect::inspect(&store, &config))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&inspection.to_json())?);
    } else {
        print!("{}", inspection.render());
    }
    Ok(())
}

/// `panscreen compact`.
fn compact(args: CompactArgs) -> anyhow::Result<()> {
    panscreen_shared::telemetry::init_stderr("warn", false);
    let runtime = runtime()?;
    let store = Store::open(&args.store, OpenMode::Existing)
        .with_context(|| format!("store {}", args.store))?;
    let (out, campaign) = match &args.campaign {
        Some(campaign) => (store.sub(&format!("campaigns/{campaign}/out")), campaign.clone()),
        None => (store.clone(), "default".to_string()),
    };
    if !runtime.block_on(panscreen_aggregate::compact::holds_tables(&out))? {
        let hint = match &args.campaign {
            Some(campaign) => format!("campaign {campaign} has no tables yet (is --campaign spelled right?)"),
            None => "for a distributed campaign give --campaign (its tables are under campaigns/<campaign>/out/)"
                .to_string(),
        };
        anyhow::bail!("{} holds no panscreen tables; nothing to compact: {hint}", out.location());
    }
    let report = runtime.block_on(panscreen_aggregate::compact::compact(
        &out,
        &campaign,
        &load_sites(&args.sites)?,
    ))?;
    if let Some(campaign) = &args.campaign {
        let work = store.sub(&format!("campaigns/{campaign}/work"));
        let swept =
            runtime.block_on(panscreen_preprocess::sweep_tensors(&work, &report.screened))?;
        if swept > 0 {
            println!("deleted {swept} work tensors of studies already in the results");
        }
    }
    println!(
        "compacted {} files into {}: {} studies ({} duplicates dropped), {} flagged, {} quarantine rows",
        report.files_before,
        report.files_after,
        report.studies,
        report.duplicates_dropped,
        report.flagged,
        report.quarantine_rows
    );
    Ok(())
}

/// `panscreen requeue`.
fn requeue(args: RequeueArgs) -> anyhow::Result<()> {
    panscreen_shared::telemetry::init_stderr("warn", false);
    let runtime = runtime()?;
    let campaign_root = args.cluster.store()?.sub(&args.cluster.campaign_prefix());
    let selection =
        crate::requeue::Selection { reason: args.reason.clone(), stage: args.stage.clone() };
    let report =
        runtime.block_on(crate::requeue::requeue(&campaign_root, &selection, args.dry_run))?;
    print!("{}", report.render(args.dry_run));
    if !args.dry_run && report.rows_requeued > 0 {
        // Wake ingest; without it the next rescan takes the request.
        let woken = runtime.block_on(crate::serve::wake_ingest(&args.cluster));
        if let Err(error) = woken {
            println!(
                "note: ingest was not woken ({error:#}); it takes the request at its next rescan"
            );
        }
    }
    Ok(())
}

/// `panscreen evaluate`.
fn evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    if args.labels.len() != args.results.len() {
        anyhow::bail!(
            "{} --labels but {} --results: give one of each per cohort, in the same order",
            args.labels.len(),
            args.results.len()
        );
    }
    let out = match (&args.out, args.results.as_slice()) {
        (Some(out), _) => out.clone(),
        (None, [results]) => results.join("evaluation/evaluation.parquet"),
        (None, all) => anyhow::bail!(
            "pooling {} cohorts: give --out, so that the pooled figures are not written \
             beside one cohort's results",
            all.len()
        ),
    };
    let pseudonymizer = Pseudonymizer::from_file(&args.key_file)?;
    let cohorts: Vec<(&Path, &Path)> = args
        .labels
        .iter()
        .zip(&args.results)
        .map(|(labels, results)| (labels.as_path(), results.as_path()))
        .collect();
    let report = panscreen_evaluate::evaluate(&cohorts, &pseudonymizer, args.screening_prevalence)?;
    report.write(&out)?;
    print!("{}", report.render());
    println!("\nevaluation table: {}", out.display());
    if args.gate {
        let verdict = report.gate_verdict().map_err(anyhow::Error::msg)?;
        println!("{verdict}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mm_range;

    #[test]
    fn a_diameter_range_reads_low_dot_dot_high_and_names_what_it_wants() {
        assert_eq!(mm_range("9..16"), Ok((9.0, 16.0)));
        assert_eq!(mm_range(" 0 .. 2.5"), Ok((0.0, 2.5)));
        for bad in ["16..9", "9..9", "-1..5", "9-16", "nine..16", "9..inf", ""] {
            let error = mm_range(bad).unwrap_err();
            assert!(error.contains("LOW..HIGH in mm expected"), "{bad}: {error}");
        }
    }
}
