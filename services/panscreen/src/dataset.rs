//! `panscreen model dataset`: a synthetic cohort as a model sees it, with its voxel truth.
//!
//! Every study goes through the production ingest (series selection) and preprocess
//! (decode, HU, orientation, resampling onto the model's grids), so a model is trained
//! on exactly the tensors it will be given; the truth (background, pancreas, lesion) is
//! the phantom's own at every voxel centre, drawn again from the cohort's seed
//! (`panscreen_synth::plan_study`), never resampled. Written per study:
//! - `coarse/<study>.npy` stage 1's input (f32, as preprocess stores it) and
//!   `coarse/<study>.labels.npy` (u8);
//! - `fine/<study>.npy` stage 2's grid, HU as int16, cut to the pancreas' box with
//!   `--margin-mm` on every side (the whole scan on that grid would be tens of MB a
//!   study), and `fine/<study>.labels.npy`;
//! - one line of `dataset.jsonl` per study: its labels and the grids' geometry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arrow::array::{Array, BooleanArray, Int32Array, StringArray};
use clap::Args;
use panscreen_infer::cascade::to_index;
use panscreen_ingest::config::IngestConfig;
use panscreen_preprocess::hu::{fine_grid_range, to_int16_within};
use panscreen_preprocess::PreprocessHandler;
use panscreen_shared::contracts::TensorGeometry;
use panscreen_shared::manifest::ModelManifest;
use panscreen_shared::npy;
use panscreen_shared::pseudonym::Pseudonymizer;
use panscreen_shared::sites::SiteRegistry;
use panscreen_shared::store::{OpenMode, Store};
use panscreen_synth::{plan_study, SynthOptions, BACKGROUND};

#[derive(Debug, Args)]
pub struct DatasetArgs {
    /// A cohort written by `panscreen synth` (its studies/, labels.parquet, cohort.json).
    #[arg(long)]
    pub cohort: PathBuf,
    /// The model directory whose grids and intensities the tensors are made for (a
    /// cascade: both stages' grids).
    #[arg(long)]
    pub model: PathBuf,
    /// Directory to write (created; must not hold a dataset already).
    #[arg(long)]
    pub out: PathBuf,
    /// Fine-grid margin around the pancreas (mm).
    #[arg(long, default_value_t = 40.0)]
    pub margin_mm: f64,
}

/// Labels at the centres of the voxels of `geometry` in `[start, start + size)`.
fn truth_on(
    plan: &panscreen_synth::StudyPlan,
    geometry: &TensorGeometry,
    start: [usize; 3],
    size: [usize; 3],
) -> Vec<u8> {
    let points = (0..size[0]).flat_map(move |z| {
        (0..size[1]).flat_map(move |y| {
            (0..size[2]).map(move |x| {
                geometry.to_patient([
                    (start[0] + z) as f64,
                    (start[1] + y) as f64,
                    (start[2] + x) as f64,
                ])
            })
        })
    });
    plan.truth_at(points)
}

struct Labelled {
    directory: String,
    index: usize,
    lesion: bool,
}

fn read_labels(cohort: &Path) -> anyhow::Result<HashMap<String, Labelled>> {
    let path = cohort.join("labels.parquet");
    let mut by_uid = HashMap::new();
    for batch in panscreen_evaluate::read_batches(&path)? {
        let column = |name: &str| {
            batch.column_by_name(name).cloned().with_context(|| {
                format!(
                    "{} has no column {name} (written by an older panscreen synth?)",
                    path.display()
                )
            })
        };
        let (uids, directories, indices, lesions) = (
            column("study_instance_uid")?,
            column("study_dir")?,
            column("study_index")?,
            column("lesion_present")?,
        );
        let uids = uids.as_any().downcast_ref::<StringArray>().context("study_instance_uid")?;
        let directories =
            directories.as_any().downcast_ref::<StringArray>().context("study_dir")?;
        let indices = indices.as_any().downcast_ref::<Int32Array>().context("study_index")?;
        let lesions = lesions.as_any().downcast_ref::<BooleanArray>().context("lesion_present")?;
        for row in 0..batch.num_rows() {
            by_uid.insert(
                uids.value(row).to_string(),
                Labelled {
                    directory: directories.value(row).to_string(),
                    index: indices.value(row) as usize,
                    lesion: lesions.is_valid(row) && lesions.value(row),
                },
            );
        }
    }
    Ok(by_uid)
}

pub fn build(args: DatasetArgs) -> anyhow::Result<()> {
    let options = SynthOptions::from_record(&args.cohort)?;
    let labels = read_labels(&args.cohort)?;
    let manifest = Arc::new(ModelManifest::load(&args.model)?);
    anyhow::ensure!(
        manifest.locate.is_some(),
        "{} is a one-stage model; a dataset holds both grids of a cascade",
        args.model.display()
    );
    anyhow::ensure!(
        !args.out.join("dataset.jsonl").exists(),
        "{} holds a dataset already; give another --out",
        args.out.display()
    );
    for folder in ["coarse", "fine"] {
        std::fs::create_dir_all(args.out.join(folder))
            .with_context(|| format!("cannot create {}", args.out.join(folder).display()))?;
    }
    // Study keys only join the labels to the studies inside this process.
    let pseudonymizer = Pseudonymizer::ephemeral();
    let by_key: HashMap<String, &Labelled> =
        labels.iter().map(|(uid, labelled)| (pseudonymizer.study(uid), labelled)).collect();
    let runtime = tokio::runtime::Runtime::new()?;
    let input = Store::open(&args.cohort.join("studies").to_string_lossy(), OpenMode::Existing)?;
    // build_grids writes nothing: the handler's work store is never used here.
    let work = Store::open(&args.out.to_string_lossy(), OpenMode::Existing)?;
    let report = runtime.block_on(panscreen_ingest::scan(
        &input,
        &IngestConfig::new("dataset"),
        &pseudonymizer,
        &SiteRegistry::builtin(),
    ))?;
    anyhow::ensure!(
        report.quarantined.is_empty(),
        "{} of the cohort's studies were quarantined by ingest (first: {})",
        report.quarantined.len(),
        report.quarantined[0].reason
    );
    let handler = PreprocessHandler {
        campaign: "dataset".into(),
        input,
        work,
        manifest: manifest.clone(),
        fetch_ahead: 4,
    };
    let mut lines = Vec::new();
    for study in &report.studies {
        let labelled = by_key
            .get(&study.context.study_key)
            .with_context(|| "a study of the cohort is not in its labels.parquet".to_string())?;
        let grids = runtime
            .block_on(handler.build_grids(study))
            .map_err(|error| anyhow::anyhow!("{}: {error}", labelled.directory))?;
        let plan = plan_study(&options, labelled.index, labelled.lesion);
        let (coarse, volume) = &grids.tensor;
        let (fine, hu) =
            grids.fine.as_ref().context("a cascade's preprocess writes a fine grid")?;
        let coarse_shape = [coarse.shape[2], coarse.shape[3], coarse.shape[4]];
        let coarse_labels = truth_on(&plan, coarse, [0; 3], coarse_shape);
        // The pancreas' box on the fine grid, from its coarse voxels (4 mm: the margin
        // covers what lies between them).
        let fine_shape = [fine.shape[2], fine.shape[3], fine.shape[4]];
        let mut low = [f64::MAX; 3];
        let mut high = [f64::MIN; 3];
        for (at, label) in coarse_labels.iter().enumerate() {
            if *label == BACKGROUND {
                continue;
            }
            let index = [
                at / (coarse_shape[1] * coarse_shape[2]),
                at / coarse_shape[2] % coarse_shape[1],
                at % coarse_shape[2],
            ];
            let on_fine = to_index(fine, coarse.to_patient(index.map(|i| i as f64)));
            for axis in 0..3 {
                low[axis] = low[axis].min(on_fine[axis]);
                high[axis] = high[axis].max(on_fine[axis]);
            }
        }
        anyhow::ensure!(
            low[0] <= high[0],
            "{}: no pancreas on the coarse grid",
            labelled.directory
        );
        let spacing = fine.spacing_mm;
        let start: [usize; 3] = std::array::from_fn(|axis| {
            (low[axis] - args.margin_mm / spacing[axis]).floor().max(0.0) as usize
        });
        let end: [usize; 3] = std::array::from_fn(|axis| {
            ((high[axis] + args.margin_mm / spacing[axis]).ceil() as usize + 1)
                .min(fine_shape[axis])
        });
        let size: [usize; 3] = std::array::from_fn(|axis| end[axis].saturating_sub(start[axis]));
        let fine_labels = truth_on(&plan, fine, start, size);
        // As preprocess stores it for infer: int16, clamped to stage 2's window.
        let range = fine_grid_range(&manifest.input.intensity);
        let mut crop = Vec::with_capacity(size.iter().product());
        for z in start[0]..end[0] {
            for y in start[1]..end[1] {
                let from = (z * fine_shape[1] + y) * fine_shape[2];
                let row = &hu[from + start[2]..from + end[2]];
                let at = crop.len();
                crop.resize(at + row.len(), 0);
                to_int16_within(row, &mut crop[at..], range);
            }
        }
        let name = &labelled.directory;
        let write = |path: PathBuf, bytes: bytes::Bytes| {
            std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
        };
        write(args.out.join(format!("coarse/{name}.npy")), npy::encode_f32(&coarse_shape, volume))?;
        write(
            args.out.join(format!("coarse/{name}.labels.npy")),
            npy::encode_u8(&coarse_shape, &coarse_labels),
        )?;
        write(args.out.join(format!("fine/{name}.npy")), npy::encode_i16(&size, &crop))?;
        write(
            args.out.join(format!("fine/{name}.labels.npy")),
            npy::encode_u8(&size, &fine_labels),
        )?;
        let count = |labels: &[u8], label: u8| labels.iter().filter(|l| **l == label).count();
        let truth = &plan.truth;
        lines.push(serde_json::json!({
            "study_dir": name,
            "study_index": labelled.index,
            "lesion_present": labelled.lesion,
            "lesion_diameter_mm": truth.lesion.as_ref().map(|l| l.diameter_mm),
            "lesion_hu_below_pancreas": truth.lesion.as_ref().map(|l| l.hu_delta),
            "coarse_shape": coarse_shape,
            "coarse_spacing_mm": coarse.spacing_mm,
            "coarse_pancreas_voxels": count(&coarse_labels, panscreen_synth::PANCREAS),
            "coarse_lesion_voxels": count(&coarse_labels, panscreen_synth::LESION),
            "fine_spacing_mm": spacing,
            "fine_grid_shape": fine_shape,
            "fine_crop_start": start,
            "fine_crop_shape": size,
            "fine_pancreas_voxels": count(&fine_labels, panscreen_synth::PANCREAS),
            "fine_lesion_voxels": count(&fine_labels, panscreen_synth::LESION),
        }));
        println!("{name}: coarse {coarse_shape:?}, fine crop {size:?}");
    }
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    std::fs::write(args.out.join("dataset.jsonl"), text)?;
    println!("{} studies written to {}", lines.len(), args.out.display());
    Ok(())
}
