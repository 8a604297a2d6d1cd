//! The volume path alone, per study, for `load-tests/dicom-bench.sh`: what preprocess does
//! between a `StudyIngested` and a `StudyPreprocessed` (fetch and parse every slice the
//! model's grids need, HU, resample onto each grid, normalize; for a cascade, the fine
//! grid rounded to int16 and compressed as it is stored), with nothing else sharing
//! the core. `panscreen run` times the same work per study, but on one core infer's share
//! of the core lands in it.
//!
//! Usage: `volume_path STUDIES_DIR MODEL_DIR [ROUNDS] [--stage1-only] [--fine-whole-int16]`.
//! Headers are read first (not timed); prints milliseconds per study for each round, and
//! the peak RSS of the process. `--stage1-only` makes a cascade's stage-1 grid alone (the
//! grid `load-tests/simpleitk_reference.py` resamples onto), as a one-stage model on it
//! would. `--fine-whole-int16` stores the fine grid's whole int16 range instead of stage
//! 2's window, as before 2026-12-05.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use panscreen_ingest::config::IngestConfig;
use panscreen_preprocess::{hu, PreprocessHandler};
use panscreen_shared::manifest::ModelManifest;
use panscreen_shared::npy;
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::{OpenMode, Store};

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    // As `panscreen` does: a study's buffers are reused by the next.
    panscreen_preprocess::keep_freed_memory();
    let (flags, mut args): (Vec<String>, Vec<String>) =
        std::env::args().skip(1).partition(|arg| arg.starts_with("--"));
    let usage =
        "usage: volume_path STUDIES_DIR MODEL_DIR [ROUNDS] [--stage1-only] [--fine-whole-int16]";
    anyhow::ensure!((2..=3).contains(&args.len()), usage);
    let rounds: usize = if args.len() == 3 { args.remove(2).parse().context(usage)? } else { 2 };
    let (studies, model) = (&args[0], &args[1]);
    let mut manifest = ModelManifest::load(std::path::Path::new(model))?;
    let mut fine_range = hu::fine_grid_range(&manifest.input.intensity);
    for flag in &flags {
        match flag.as_str() {
            "--stage1-only" => {
                let locate = manifest.locate.take().context("--stage1-only needs a cascade")?;
                manifest.input = locate.input;
            }
            // As the fine grid was stored before 2026-12-05, to compare.
            "--fine-whole-int16" => fine_range = [-32768.0, 32767.0],
            _ => anyhow::bail!(usage),
        }
    }
    let manifest = Arc::new(manifest);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let input = Store::open(studies, OpenMode::Existing)?;
    let work = Store::open(&std::env::temp_dir().to_string_lossy(), OpenMode::Existing)?;
    let report = runtime.block_on(panscreen_ingest::scan(
        &input,
        &IngestConfig::new("bench"),
        &Pseudonymizer::ephemeral(),
        &SiteRegistry::builtin(),
    ))?;
    anyhow::ensure!(!report.studies.is_empty(), "no study to screen under {studies}");
    let handler = PreprocessHandler {
        campaign: "bench".into(),
        input,
        work,
        manifest: manifest.clone(),
        fetch_ahead: panscreen_preprocess::config::FETCH_AHEAD,
    };
    for round in 1..=rounds {
        let started = Instant::now();
        let (mut stored_bytes, mut storing) = (0, std::time::Duration::ZERO);
        for study in &report.studies {
            let grids = runtime.block_on(handler.build_grids(study))?;
            let store_started = Instant::now();
            stored_bytes += npy::encode_f32(&grids.tensor.0.shape, &grids.tensor.1).len();
            if let Some((geometry, hu)) = &grids.fine {
                stored_bytes += hu::encode_fine_grid(&geometry.shape, hu, fine_range).len();
            }
            storing += store_started.elapsed();
        }
        let per_study = |elapsed: std::time::Duration| {
            elapsed.as_secs_f64() * 1000.0 / report.studies.len() as f64
        };
        println!(
            "round {round}: {:.0} ms/study over {} studies ({} grids each; {:.0} ms of it encoding them; {:.1} MB stored in all)",
            per_study(started.elapsed()),
            report.studies.len(),
            if manifest.locate.is_some() { 2 } else { 1 },
            per_study(storing),
            stored_bytes as f64 / 1e6,
        );
    }
    match peak_rss_mib() {
        Some(peak) => println!("peak RSS {peak:.0} MiB"),
        None => println!("peak RSS unknown (no /proc/self/status)"),
    }
    Ok(())
}
