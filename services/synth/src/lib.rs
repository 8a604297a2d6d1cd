//! Synthetic non-contrast abdominal CT cohorts, written as real DICOM files (one file
//! per slice), with the ground truth kept apart in `labels.parquet`. The same seed
//! gives the same bytes.
//!
//! - [`anatomy`]: the phantom: body, organs, pancreas, lesion, noise.
//! - [`dicom`]: the DICOM writer (classic CT slices, Enhanced CT objects).
//! - [`rng`]: a small seeded generator, so that a cohort does not change with a crate.
//!
//! Why a crate of its own, under `services/`: the `panscreen synth` command, the demo,
//! `panscreen evaluate` and the tests all write cohorts with it, and everything the
//! `panscreen` binary links lives under `services/` and `shared/` (`tests/` holds only
//! what tests use). None of the stages depends on it.

pub mod anatomy;
pub mod dicom;
pub mod noise;
pub mod rng;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int32Array, StringArray};
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use panscreen_shared::sites::{Site, SiteRegistry};
use sha2::{Digest, Sha256};
use time::{Date, Duration, Month};

pub use anatomy::{BodyTruth, Lesion, Phantom, Tissue, BACKGROUND, LESION, PANCREAS};
pub use dicom::{encode_enhanced_ct, encode_slice, SeriesHeader, Slice};
pub use rng::Rng;

/// Study size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Size {
    /// About 256×256×60 at 1.4 mm in-plane and 2.5 mm slices: for tests.
    Small,
    /// 512×512, 150–300 slices, 0.6–0.8 mm in-plane, 1–2.5 mm slices: realistic load.
    Full,
}

/// Which phantom the cohort is drawn from (docs/synthetic-data.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Anatomy {
    /// One build, a smooth tube of a gland, a round sharp lesion of 10–30 mm and
    /// 10–30 HU, white noise, scans centred on the pancreas: easy; the default until
    /// 2026-12, kept so that earlier cohorts keep their bytes and the data-path tests
    /// stay quick.
    Basic,
    /// The default. Bodies of every build, mimics in every study, a lobulated textured gland, lesions
    /// of 5–40 mm and 5–30 HU with blurred irregular edges, correlated noise rising with
    /// body size, blur, a calibration offset per site, scans of 150–450 mm with the
    /// pancreas anywhere in the upper abdomen.
    #[default]
    Screening,
}

impl Anatomy {
    pub fn name(self) -> &'static str {
        match self {
            Anatomy::Basic => "basic",
            Anatomy::Screening => "screening",
        }
    }
}

/// How patients lie in the scanner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Poses {
    /// Every patient supine, head first, centred, square to the scanner.
    #[default]
    Standard,
    /// Body shifted up to ±40 mm and turned up to ±10° in the scanner; about one in six
    /// prone and one in six feet first (the image's orientation says so, as scanners
    /// write it).
    Varied,
}

/// How one patient lay: recorded in `labels.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pose {
    /// DICOM Patient Position: HFS (head first, supine), HFP (prone), FFS (feet first).
    pub patient_position: &'static str,
    /// Where the middle of the field of view is in the patient (LPS x, y, mm).
    pub centre_mm: [f64; 2],
    /// Turn of the image's rows from the patient's left-right axis, degrees.
    pub rotation_deg: f64,
}

impl Pose {
    const STANDARD: Pose =
        Pose { patient_position: "HFS", centre_mm: [0.0, 0.0], rotation_deg: 0.0 };

    /// Directions of the image's rows and columns in the patient.
    pub fn directions(&self) -> ([f64; 3], [f64; 3]) {
        let (sin, cos) = self.rotation_deg.to_radians().sin_cos();
        let (x, y) = ([cos, sin, 0.0], [-sin, cos, 0.0]);
        let minus = |v: [f64; 3]| v.map(|c| -c);
        match self.patient_position {
            "HFP" => (minus(x), minus(y)),
            "FFS" => (minus(x), y),
            _ => (x, y),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub out: PathBuf,
    pub studies: usize,
    pub seed: u64,
    pub prevalence: f64,
    pub size: Size,
    pub sites: SiteRegistry,
    pub threads: usize,
    /// Add scouts, a contrast phase, a reformat, a secondary capture and a dose report
    /// beside the series to screen.
    pub realistic: bool,
    /// Slices per series instead of the size's own count (a 1,000-slice series for the
    /// memory benchmark, say).
    pub slices: Option<usize>,
    /// Distance between slices (mm) instead of the size's own draw: with `slices`, a
    /// scan of a chosen length (300 slices 1.25 mm apart for the volume-path benchmark,
    /// a scan every slice of which a cascade's stage 1 sees).
    pub slice_spacing_mm: Option<f64>,
    pub poses: Poses,
    pub anatomy: Anatomy,
    /// Where the middle of every scan lies along the patient's head–foot axis (LPS z,
    /// mm; the pancreas lies within 25 mm of 0) instead of a draw within ±15 mm: a scan
    /// of the pelvis (−200, say) or one that cuts the pancreas (−90).
    pub scan_centre_z_mm: Option<f64>,
    /// Write only the studies with a lesion of `low <= diameter < high` mm. The others
    /// are drawn and not written, so each study written is byte for byte the one the
    /// whole cohort holds under its index: a cohort enriched for one stratum.
    pub only_lesions_mm: Option<(f64, f64)>,
}

/// Whether `low..high` (mm) is a range of lesion diameters `--only-lesions-mm` takes.
pub fn is_diameter_range(low: f64, high: f64) -> bool {
    low.is_finite() && high.is_finite() && 0.0 <= low && low < high
}

/// Beside `labels.parquet`: the options that drew the cohort, so that any study's plan
/// (and its truth on any grid) can be drawn again ([`SynthOptions::from_record`]).
pub const COHORT_RECORD: &str = "cohort.json";

impl SynthOptions {
    fn record(&self) -> serde_json::Value {
        serde_json::json!({
            "seed": self.seed,
            "studies": self.studies,
            "prevalence": self.prevalence,
            "size": match self.size { Size::Small => "small", Size::Full => "full" },
            "anatomy": self.anatomy.name(),
            "poses": match self.poses { Poses::Standard => "standard", Poses::Varied => "varied" },
            "slices": self.slices,
            "slice_spacing_mm": self.slice_spacing_mm,
            "scan_centre_z_mm": self.scan_centre_z_mm,
            "only_lesions_mm": self.only_lesions_mm.map(|(low, high)| [low, high]),
        })
    }

    /// Whether a study with this truth is written (`only_lesions_mm`).
    fn writes(&self, truth: &StudyTruth) -> bool {
        match (self.only_lesions_mm, &truth.lesion) {
            (None, _) => true,
            (Some((low, high)), Some(lesion)) => {
                low <= lesion.diameter_mm && lesion.diameter_mm < high
            }
            (Some(_), None) => false,
        }
    }

    /// The options recorded in `cohort/cohort.json` (the site registry is the built-in
    /// one: a study's plan draws its site with one number whatever the registry holds,
    /// and the truth does not depend on the site).
    pub fn from_record(cohort: &Path) -> anyhow::Result<SynthOptions> {
        let path = cohort.join(COHORT_RECORD);
        let text = std::fs::read(&path).with_context(|| {
            format!("cannot read {} (written by panscreen synth since 2026-11-28)", path.display())
        })?;
        let record: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let field = |name: &str| {
            record.get(name).with_context(|| format!("{} has no {name}", path.display()))
        };
        let text_of = |name: &str| -> anyhow::Result<String> {
            Ok(field(name)?.as_str().with_context(|| format!("{name} is not text"))?.to_string())
        };
        Ok(SynthOptions {
            out: cohort.to_path_buf(),
            studies: field("studies")?.as_u64().context("studies is not a count")? as usize,
            seed: field("seed")?.as_u64().context("seed is not a number")?,
            prevalence: field("prevalence")?.as_f64().context("prevalence is not a number")?,
            size: match text_of("size")?.as_str() {
                "small" => Size::Small,
                "full" => Size::Full,
                other => anyhow::bail!("unknown size {other:?} in {}", path.display()),
            },
            sites: SiteRegistry::builtin(),
            threads: 1,
            realistic: false,
            slices: field("slices")?.as_u64().map(|n| n as usize),
            // Absent from records written before the option existed.
            slice_spacing_mm: record.get("slice_spacing_mm").and_then(|v| v.as_f64()),
            poses: match text_of("poses")?.as_str() {
                "standard" => Poses::Standard,
                "varied" => Poses::Varied,
                other => anyhow::bail!("unknown poses {other:?} in {}", path.display()),
            },
            anatomy: match text_of("anatomy")?.as_str() {
                "basic" => Anatomy::Basic,
                "screening" => Anatomy::Screening,
                other => anyhow::bail!("unknown anatomy {other:?} in {}", path.display()),
            },
            scan_centre_z_mm: field("scan_centre_z_mm")?.as_f64(),
            // Which studies were written does not change any study's plan.
            only_lesions_mm: None,
        })
    }
}

/// Ground truth of one synthetic study.
#[derive(Debug, Clone, PartialEq)]
pub struct StudyTruth {
    pub index: usize,
    /// Folder of the study under `studies/`.
    pub directory: String,
    pub study_instance_uid: String,
    pub site_id: String,
    pub region_code: String,
    pub lesion: Option<Lesion>,
    pub noise_sigma_hu: f64,
    pub anatomy: Anatomy,
    /// The screening phantom's body, gland and image draws (`None` for the basic one).
    pub body: Option<BodyTruth>,
    pub image: ImageTruth,
    pub pose: Pose,
    pub age: i32,
    pub sex: String,
    pub slices: usize,
    pub rows: usize,
    pub columns: usize,
    /// The identifiers written into the DICOM, kept so tests can check none leaks.
    pub patient_name: String,
    pub patient_id: String,
    pub patient_birth_date: String,
    pub accession_number: String,
}

/// The voxel radiology states a scan's noise on: 0.75 × 0.75 mm pixels, 5 mm slices.
pub const REFERENCE_VOXEL_MM3: f64 = 0.75 * 0.75 * 5.0;

/// Noise σ on a voxel of this size over σ on the reference voxel: quantum noise
/// averages down with the square root of the volume a voxel integrates.
pub fn voxel_noise_factor(pixel_spacing_mm: f64, slice_spacing_mm: f64) -> f64 {
    (REFERENCE_VOXEL_MM3 / (pixel_spacing_mm * pixel_spacing_mm * slice_spacing_mm)).sqrt()
}

/// How the image was made beyond the anatomy.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTruth {
    pub pixel_spacing_mm: f64,
    pub slice_spacing_mm: f64,
    /// Head–foot extent of the scan (LPS z of the first and last slice, mm).
    pub scan_z_mm: [f64; 2],
    /// Width (Gaussian σ, mm) of the reconstruction kernel's roll-off that shapes the
    /// noise's spectrum, [`noise::CtNoise`] (0: white noise). 0.45–1.05 mm puts the
    /// noise's power peak at 0.25–0.11 cycles/mm, from a standard abdominal kernel to a
    /// smooth one.
    pub noise_kernel_mm: f64,
    /// In-plane blur of the noise-free image (Gaussian σ, mm; 0: none).
    pub blur_mm: f64,
    /// The scan's noise as radiology states it: σ (HU) in a uniform region of a
    /// 5 mm-thick image with 0.75 mm pixels ([`REFERENCE_VOXEL_MM3`]). The noise of a
    /// voxel of another size follows from it (`noise_sigma_hu`).
    pub noise_reference_sigma_hu: f64,
    /// The site's calibration offset, added to every pixel (HU).
    pub site_offset_hu: f64,
}

/// Writes the cohort and `labels.parquet`; `on_study` is called after each study.
pub fn synthesize(
    options: &SynthOptions,
    on_study: &(dyn Fn(&StudyTruth) + Sync),
) -> anyhow::Result<Vec<StudyTruth>> {
    anyhow::ensure!(options.studies > 0, "--studies must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&options.prevalence),
        "--prevalence must be within [0, 1]"
    );
    if let Some((low, high)) = options.only_lesions_mm {
        anyhow::ensure!(
            is_diameter_range(low, high),
            "--only-lesions-mm {low}..{high}: a range of diameters low..high with 0 <= low < high \
             expected"
        );
        anyhow::ensure!(
            options.prevalence > 0.0,
            "--only-lesions-mm with --prevalence 0 would write no study"
        );
    }
    let studies_dir = options.out.join("studies");
    std::fs::create_dir_all(&studies_dir)
        .with_context(|| format!("cannot create {}", studies_dir.display()))?;
    let lesion_studies = choose_lesion_studies(options.studies, options.prevalence, options.seed);

    let next = AtomicUsize::new(0);
    let truths = Mutex::new(Vec::with_capacity(options.studies));
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let lesion_studies = Arc::new(lesion_studies);
    std::thread::scope(|scope| {
        for _ in 0..options.threads.max(1) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= options.studies
                    || first_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .is_some()
                {
                    return;
                }
                let plan = plan_study(options, index, lesion_studies[index]);
                if !options.writes(&plan.truth) {
                    continue;
                }
                match write_study(options, plan, &studies_dir) {
                    Ok(truth) => {
                        on_study(&truth);
                        truths
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(truth);
                    }
                    Err(error) => {
                        *first_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(error)
                    }
                }
            });
        }
    });
    if let Some(error) = first_error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(error);
    }
    let mut truths = truths.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let (Some((low, high)), true) = (options.only_lesions_mm, truths.is_empty()) {
        anyhow::bail!(
            "none of the {} studies drawn has a lesion of {low}..{high} mm; draw more (--studies) \
             or widen the range",
            options.studies
        );
    }
    truths.sort_by_key(|truth| truth.index);
    write_labels(&options.out.join("labels.parquet"), &truths)?;
    let record = options.record();
    let path = options.out.join(COHORT_RECORD);
    std::fs::write(&path, serde_json::to_vec_pretty(&record).expect("JSON"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(truths)
}

/// Exactly round(n·p) lesion studies, at seeded positions.
fn choose_lesion_studies(studies: usize, prevalence: f64, seed: u64) -> Vec<bool> {
    let count = (studies as f64 * prevalence).round() as usize;
    let mut order: Vec<usize> = (0..studies).collect();
    let mut rng = Rng::derive(seed, &[0x1e51_0000]);
    for i in (1..order.len()).rev() {
        let j = rng.range(0, i as i64) as usize;
        order.swap(i, j);
    }
    let mut chosen = vec![false; studies];
    for index in order.into_iter().take(count) {
        chosen[index] = true;
    }
    chosen
}

const FAMILY_NAMES: &[&str] =
    &["WANG", "LI", "ZHANG", "LIU", "CHEN", "YANG", "HUANG", "ZHAO", "WU", "ZHOU", "XU", "SUN"];
const GIVEN_NAMES: &[&str] =
    &["WEI", "FANG", "NA", "MIN", "JING", "LEI", "QIANG", "YAN", "JUN", "HUI", "XIN", "TAO"];

fn date_text(date: Date) -> String {
    format!("{:04}{:02}{:02}", date.year(), date.month() as u8, date.day())
}

/// Everything one study is made of, drawn from its seed before a pixel is computed.
pub struct StudyPlan {
    pub truth: StudyTruth,
    pub header: SeriesHeader,
    pub phantom: Phantom,
    /// Patient positions of the slices (first pixel of each).
    pub positions: Vec<[f64; 3]>,
    /// Directions of the image's rows and columns.
    pub directions: ([f64; 3], [f64; 3]),
    /// The study's generator after the plan's draws (the other series' UIDs).
    rest: Rng,
    /// The noise's spectrum, worked out on the first slice that needs it.
    noise: std::sync::OnceLock<noise::CtNoise>,
}

/// The study's plan: the same `options`, `index` and `with_lesion` give the same plan
/// (so the truth can be drawn again on any grid, see [`StudyPlan::truth_on`]).
pub fn plan_study(options: &SynthOptions, index: usize, with_lesion: bool) -> StudyPlan {
    let mut rng = Rng::derive(options.seed, &[index as u64]);
    let site: &Site = rng.pick(&options.sites.sites);
    let sex = if rng.chance(0.5) { "F" } else { "M" };
    let age = rng.range(40, 85) as i32;
    let first_day = Date::from_calendar_date(2025, Month::January, 1).expect("valid date");
    let scan_date = first_day + Duration::days(rng.range(0, 600));
    let birth_date =
        scan_date - Duration::days(age as i64 * 365 + age as i64 / 4 + rng.range(1, 360));
    let patient_name =
        format!("{}^{}^{}", rng.pick(FAMILY_NAMES), rng.pick(GIVEN_NAMES), rng.pick(GIVEN_NAMES));
    let patient_id = format!("P{:08}", rng.range(0, 99_999_999));
    let accession_number = format!("A{:010}", rng.range(0, 9_999_999_999));

    // The screening phantom is drawn first: the scanner's field of view follows the body.
    let screening = match options.anatomy {
        Anatomy::Basic => None,
        Anatomy::Screening => {
            let mut anatomy_rng = Rng::derive(options.seed, &[index as u64, 0x616e_6174]);
            Some((Phantom::screening(&mut anatomy_rng, with_lesion), anatomy_rng))
        }
    };
    let (rows, slices, pixel_spacing, slice_spacing) = match (&screening, options.size) {
        (None, Size::Small) => (256usize, 60usize, 1.40625, 2.5),
        (None, Size::Full) => {
            let spacing = [1.0, 1.25, 1.5, 2.0, 2.5][rng.range(0, 4) as usize];
            let slices = ((rng.uniform(220.0, 400.0) / spacing).round() as usize).clamp(150, 300);
            (512usize, slices, (rng.uniform(0.6, 0.8) * 1000.0).round() / 1000.0, spacing)
        }
        (Some(((_, body), _)), size) => {
            let length = rng.uniform(150.0, 450.0);
            let field = (2.0 * body.semi_axes_mm[0] + rng.uniform(40.0, 120.0)).clamp(320.0, 500.0);
            let rows = if size == Size::Small { 256usize } else { 512 };
            let (most, choices): (f64, &[f64]) = match size {
                // Thin-slice archives for the small size would be slow to test with:
                // 2.5–5 mm, as many routine reports are read.
                Size::Small => (90.0, &[2.5, 3.0, 4.0, 5.0]),
                Size::Full => (300.0, &[1.0, 1.25, 1.5, 2.0, 2.5]),
            };
            let spacing = choices
                .iter()
                .copied()
                .find(|spacing| length / spacing <= most)
                .unwrap_or(choices[choices.len() - 1]);
            let slices = (length / spacing).round() as usize + 1;
            (rows, slices, (field / rows as f64 * 1000.0).round() / 1000.0, spacing)
        }
    };
    let slices = options.slices.unwrap_or(slices);
    let slice_spacing = options.slice_spacing_mm.unwrap_or(slice_spacing);
    let signed_pixels = rng.chance(0.5);
    let header = SeriesHeader {
        patient_name: patient_name.clone(),
        patient_id: patient_id.clone(),
        issuer_of_patient_id: site.id.clone(),
        patient_birth_date: date_text(birth_date),
        patient_sex: sex.to_string(),
        patient_age: format!("{age:03}Y"),
        accession_number: accession_number.clone(),
        study_instance_uid: rng.uid(),
        series_instance_uid: rng.uid(),
        frame_of_reference_uid: rng.uid(),
        study_date: date_text(scan_date),
        study_time: format!(
            "{:02}{:02}{:02}",
            rng.range(7, 19),
            rng.range(0, 59),
            rng.range(0, 59)
        ),
        institution_name: site.institution_name.clone(),
        series_description: format!("ABDOMEN PLAIN {slice_spacing}mm"),
        rows: rows as u16,
        columns: rows as u16,
        pixel_spacing: [pixel_spacing, pixel_spacing],
        slice_thickness: slice_spacing,
        signed_pixels,
        bits_stored: if signed_pixels { 16 } else { 12 },
        rescale_intercept: if signed_pixels { 0.0 } else { -1024.0 },
        ..SeriesHeader::plain_ct()
    };
    let noise_sigma = rng.uniform(10.0, 20.0);
    let (phantom, body, image, first_z) = match screening {
        None => {
            let phantom = Phantom::random(&mut rng, with_lesion);
            let drawn_z = rng.uniform(-15.0, 15.0);
            let scan_center_z = options.scan_centre_z_mm.unwrap_or(drawn_z);
            let first_z = scan_center_z - (slices - 1) as f64 * slice_spacing / 2.0;
            let image = ImageTruth {
                pixel_spacing_mm: pixel_spacing,
                slice_spacing_mm: slice_spacing,
                scan_z_mm: [first_z, first_z + (slices - 1) as f64 * slice_spacing],
                noise_kernel_mm: 0.0,
                blur_mm: 0.0,
                site_offset_hu: 0.0,
                noise_reference_sigma_hu: noise_sigma
                    * voxel_noise_factor(pixel_spacing, slice_spacing).recip(),
            };
            (phantom, None, (image, noise_sigma), first_z)
        }
        Some(((phantom, body), mut anatomy_rng)) => {
            let rng = &mut anatomy_rng;
            // The gland anywhere in the scan's upper part, 25 mm clear of its ends when
            // the scan is long enough.
            let length = (slices - 1) as f64 * slice_spacing;
            let [low, high] = body.pancreas_z_mm;
            let room = length - (high - low) - 50.0;
            let first_z = match options.scan_centre_z_mm {
                Some(centre) => centre - length / 2.0,
                None if room > 0.0 => low - 25.0 - room * rng.uniform(0.0, 1.0).powf(0.7),
                None => (low + high) / 2.0 - length / 2.0,
            };
            // Noise rises with the body (fewer photons through more tissue).
            let build = ((body.semi_axes_mm[0] - 120.0) / 80.0).clamp(0.0, 1.0);
            // σ 8–30 HU on the reference voxel; a voxel n times its volume averages n
            // of them, so its noise is √n times lower (thin slices are noisier).
            let reference_sigma = 8.0 + 22.0 * (0.75 * build + 0.25 * rng.uniform(0.0, 1.0));
            let sigma = reference_sigma * voxel_noise_factor(pixel_spacing, slice_spacing);
            let image = ImageTruth {
                pixel_spacing_mm: pixel_spacing,
                slice_spacing_mm: slice_spacing,
                scan_z_mm: [first_z, first_z + length],
                noise_kernel_mm: rng.uniform(0.45, 1.05),
                blur_mm: rng.uniform(0.5, 1.0),
                site_offset_hu: site_offset_hu(&site.id),
                noise_reference_sigma_hu: reference_sigma,
            };
            (phantom, Some(body), (image, sigma), first_z)
        }
    };
    let (image, noise_sigma) = image;
    // Drawn from a generator of its own, so that standard cohorts keep their bytes.
    let pose = match options.poses {
        Poses::Standard => Pose::STANDARD,
        Poses::Varied => {
            let mut rng = Rng::derive(options.seed, &[index as u64, 0x706f_7365]);
            let draw = rng.uniform(0.0, 1.0);
            Pose {
                patient_position: if draw < 1.0 / 6.0 {
                    "HFP"
                } else if draw < 2.0 / 6.0 {
                    "FFS"
                } else {
                    "HFS"
                },
                centre_mm: [rng.uniform(-40.0, 40.0), rng.uniform(-40.0, 40.0)],
                rotation_deg: rng.uniform(-10.0, 10.0),
            }
        }
    };
    let (row_direction, column_direction) = pose.directions();
    let header = SeriesHeader {
        orientation: [
            row_direction[0],
            row_direction[1],
            row_direction[2],
            column_direction[0],
            column_direction[1],
            column_direction[2],
        ],
        patient_position: pose.patient_position.to_string(),
        ..header
    };
    // The first pixel: half the field of view back from its middle along rows and columns.
    let half = (rows as f64 - 1.0) * pixel_spacing / 2.0;
    let origin_xy: [f64; 2] = std::array::from_fn(|axis| {
        pose.centre_mm[axis] - half * (row_direction[axis] + column_direction[axis])
    });
    let positions: Vec<[f64; 3]> = (0..slices)
        .map(|i| [origin_xy[0], origin_xy[1], first_z + i as f64 * slice_spacing])
        .collect();
    let truth = StudyTruth {
        index,
        directory: format!("study-{index:05}"),
        study_instance_uid: header.study_instance_uid.clone(),
        site_id: site.id.clone(),
        region_code: site.region_code.clone(),
        lesion: phantom.lesion().cloned(),
        noise_sigma_hu: noise_sigma,
        anatomy: options.anatomy,
        body,
        image,
        pose,
        age,
        sex: sex.to_string(),
        slices,
        rows,
        columns: rows,
        patient_name,
        patient_id,
        patient_birth_date: header.patient_birth_date.clone(),
        accession_number,
    };
    StudyPlan {
        truth,
        header,
        phantom,
        positions,
        directions: (row_direction, column_direction),
        rest: rng,
        noise: std::sync::OnceLock::new(),
    }
}

/// A site's calibration offset: within ±10 HU, fixed by its id.
pub fn site_offset_hu(site_id: &str) -> f64 {
    let digest = Sha256::digest(site_id.as_bytes());
    let unit = u16::from_le_bytes([digest[0], digest[1]]) as f64 / u16::MAX as f64;
    (unit * 20.0 - 10.0).round()
}

impl StudyPlan {
    /// Noise-free HU of the axial slice at `position` (blurred in-plane as the
    /// scanner's kernel would).
    fn clean_slice(&self, position: [f64; 3]) -> Vec<f32> {
        let rows = self.truth.rows;
        let hu = self.phantom.slice_hu_along(
            position,
            [self.directions.0, self.directions.1],
            self.header.pixel_spacing,
            rows,
            rows,
        );
        let sigma_px = self.truth.image.blur_mm / self.truth.image.pixel_spacing_mm;
        if sigma_px > 0.0 {
            noise::blur(&hu, rows, rows, sigma_px)
        } else {
            hu
        }
    }

    /// Slice `slice` of a series at `position` as written: noise-free HU, the noise, the
    /// site's offset; and its UID.
    fn noisy_slice(
        &self,
        seed: u64,
        salt: u64,
        slice: usize,
        position: [f64; 3],
    ) -> (Vec<f32>, String) {
        let mut hu = self.clean_slice(position);
        let image = &self.truth.image;
        let mut rng = Rng::derive(seed, &[self.truth.index as u64, salt + slice as u64]);
        let sigma = self.truth.noise_sigma_hu;
        if image.noise_kernel_mm > 0.0 {
            let rows = self.truth.rows;
            let kernel_px = image.noise_kernel_mm / image.pixel_spacing_mm;
            let noise = self
                .noise
                .get_or_init(|| noise::CtNoise::new(rows, rows, kernel_px))
                .draw(&mut rng, sigma);
            for (value, noise) in hu.iter_mut().zip(noise) {
                *value += noise + image.site_offset_hu as f32;
            }
        } else {
            for value in hu.iter_mut() {
                *value += (rng.normal() * sigma) as f32;
            }
        }
        (hu, rng.uid())
    }

    /// Voxel truth ([`BACKGROUND`], [`PANCREAS`], [`LESION`]) at `points` (LPS, mm).
    pub fn truth_at(&self, points: impl Iterator<Item = [f64; 3]>) -> Vec<u8> {
        points.map(|point| self.phantom.label_at(point)).collect()
    }
}

fn write_study(
    options: &SynthOptions,
    plan: StudyPlan,
    studies_dir: &Path,
) -> anyhow::Result<StudyTruth> {
    let study_dir = studies_dir.join(&plan.truth.directory);
    write_series(&study_dir, &plan.header, &plan.positions, |i, position| {
        plan.noisy_slice(options.seed, 1, i, position)
    })?;
    if options.realistic {
        let mut rng = plan.rest.clone();
        write_other_series(
            &study_dir,
            &plan.header,
            &plan.positions,
            plan.truth.image.slice_spacing_mm,
            &mut rng,
            &|i, position, salt| plan.noisy_slice(options.seed, salt, i, position),
        )?;
    }
    Ok(plan.truth)
}

/// Writes one series, one file per slice; `slice` gives the HU and SOP Instance UID of
/// slice `i` at `position`.
fn write_series(
    study_dir: &Path,
    header: &SeriesHeader,
    positions: &[[f64; 3]],
    slice: impl Fn(usize, [f64; 3]) -> (Vec<f32>, String),
) -> anyhow::Result<()> {
    let series_dir = study_dir.join(format!("series-{}", header.series_number));
    std::fs::create_dir_all(&series_dir)
        .with_context(|| format!("cannot create {}", series_dir.display()))?;
    for (slice_index, position) in positions.iter().enumerate() {
        let (hu, sop_instance_uid) = slice(slice_index, *position);
        // Scanners number from the head down; file names follow neither order.
        let slice = Slice {
            sop_instance_uid: &sop_instance_uid,
            instance_number: (positions.len() - slice_index) as i32,
            position: *position,
            hu: &hu,
        };
        let bytes = encode_slice(header, &slice)?;
        let name = hex::encode(&Sha256::digest(sop_instance_uid.as_bytes())[..6]);
        let path = series_dir.join(format!("IM_{name}.dcm"));
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// What a real abdominal CT study holds beside the plain axial series: two scouts, a
/// contrast-enhanced portal-venous phase, a 5 mm reformat, a secondary-capture screenshot
/// and a radiation dose report. Only the plain series (number 2) fits the screening rules.
fn write_other_series(
    study_dir: &Path,
    plain: &SeriesHeader,
    positions: &[[f64; 3]],
    slice_spacing: f64,
    rng: &mut Rng,
    slice: &dyn Fn(usize, [f64; 3], u64) -> (Vec<f32>, String),
) -> anyhow::Result<()> {
    let words = |items: &[&str]| items.iter().map(|item| item.to_string()).collect::<Vec<_>>();
    let centre = positions[positions.len() / 2];
    // Scouts: one AP (coronal plane) and one lateral (sagittal plane) projection image.
    let mut scout = plain.clone();
    scout.series_instance_uid = rng.uid();
    scout.series_number = 1;
    scout.series_description = "SCOUT".into();
    scout.image_type = words(&["ORIGINAL", "PRIMARY", "LOCALIZER"]);
    for (number, orientation) in
        [(0usize, [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]), (1, [0.0, 1.0, 0.0, 0.0, 0.0, -1.0])]
    {
        scout.orientation = orientation;
        let position = [centre[0], centre[1] + number as f64, centre[2] + 200.0];
        write_series(study_dir, &scout, &[position], |i, p| slice(i, p, 10_000 + number as u64))?;
    }
    // Portal-venous phase: same geometry, enhanced soft tissue, contrast agent recorded.
    let mut contrast = plain.clone();
    contrast.series_instance_uid = rng.uid();
    contrast.series_number = 3;
    contrast.series_description = "ABDOMEN PORTAL VENOUS".into();
    contrast.contrast_agent = Some("IOPAMIDOL 370".into());
    write_series(study_dir, &contrast, positions, |i, p| {
        let (mut hu, uid) = slice(i, p, 20_000);
        hu.iter_mut().filter(|v| **v > -200.0).for_each(|v| *v += 70.0);
        (hu, uid)
    })?;
    // Thick reformat: derived 5 mm slices.
    let mut thick = plain.clone();
    thick.series_instance_uid = rng.uid();
    thick.series_number = 4;
    thick.series_description = "ABDOMEN 5mm MPR".into();
    thick.image_type = words(&["DERIVED", "SECONDARY", "AXIAL"]);
    thick.slice_thickness = 5.0;
    let step = (5.0 / slice_spacing).round().max(1.0) as usize;
    let thick_positions: Vec<[f64; 3]> = positions.iter().step_by(step).copied().collect();
    write_series(study_dir, &thick, &thick_positions, |i, p| slice(i, p, 30_000))?;
    // A screenshot of the viewer, stored as Secondary Capture.
    let mut capture = plain.clone();
    capture.series_instance_uid = rng.uid();
    capture.series_number = 90;
    capture.series_description = "KEY IMAGES".into();
    capture.sop_class_uid = "1.2.840.10008.5.1.4.1.1.7".into();
    capture.image_type = words(&["DERIVED", "SECONDARY"]);
    write_series(study_dir, &capture, &[centre], |i, p| slice(i, p, 40_000))?;
    // The scanner's radiation dose report.
    let mut dose = plain.clone();
    dose.series_instance_uid = rng.uid();
    dose.series_number = 997;
    let dose_dir = study_dir.join("series-997");
    std::fs::create_dir_all(&dose_dir)?;
    let dlp = rng.uniform(200.0, 600.0);
    std::fs::write(
        dose_dir.join("DOSE_SR.dcm"),
        dicom::encode_dose_report(&dose, &rng.uid(), dlp)?,
    )?;
    Ok(())
}

fn write_labels(path: &Path, truths: &[StudyTruth]) -> anyhow::Result<()> {
    let lesion_field = |pick: fn(&Lesion) -> f64| -> ArrayRef {
        Arc::new(truths.iter().map(|t| t.lesion.as_ref().map(pick)).collect::<Float64Array>())
    };
    let image_field = |pick: fn(&ImageTruth) -> f64| -> ArrayRef {
        Arc::new(truths.iter().map(|t| Some(pick(&t.image))).collect::<Float64Array>())
    };
    let body_field = |pick: fn(&BodyTruth) -> f64| -> ArrayRef {
        Arc::new(truths.iter().map(|t| t.body.as_ref().map(pick)).collect::<Float64Array>())
    };
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "study_dir",
            Arc::new(truths.iter().map(|t| Some(t.directory.as_str())).collect::<StringArray>()),
        ),
        (
            "study_instance_uid",
            Arc::new(
                truths.iter().map(|t| Some(t.study_instance_uid.as_str())).collect::<StringArray>(),
            ),
        ),
        (
            "site_id",
            Arc::new(truths.iter().map(|t| Some(t.site_id.as_str())).collect::<StringArray>()),
        ),
        (
            "region_code",
            Arc::new(truths.iter().map(|t| Some(t.region_code.as_str())).collect::<StringArray>()),
        ),
        (
            "lesion_present",
            Arc::new(truths.iter().map(|t| Some(t.lesion.is_some())).collect::<BooleanArray>()),
        ),
        ("lesion_center_x_mm", lesion_field(|l| l.center_mm[0])),
        ("lesion_center_y_mm", lesion_field(|l| l.center_mm[1])),
        ("lesion_center_z_mm", lesion_field(|l| l.center_mm[2])),
        ("lesion_diameter_mm", lesion_field(|l| l.diameter_mm)),
        ("lesion_hu_below_pancreas", lesion_field(|l| l.hu_delta)),
        (
            "lesion_location",
            Arc::new(
                truths
                    .iter()
                    .map(|t| t.lesion.as_ref().map(|l| l.location))
                    .collect::<StringArray>(),
            ),
        ),
        ("lesion_edge_mm", lesion_field(|l| l.edge_mm)),
        ("lesion_irregularity", lesion_field(|l| l.irregularity)),
        (
            "lesion_duct_dilated",
            Arc::new(
                truths
                    .iter()
                    .map(|t| t.lesion.as_ref().map(|l| l.duct_dilated))
                    .collect::<BooleanArray>(),
            ),
        ),
        (
            "noise_sigma_hu",
            Arc::new(truths.iter().map(|t| Some(t.noise_sigma_hu)).collect::<Float64Array>()),
        ),
        ("noise_reference_sigma_hu", image_field(|i| i.noise_reference_sigma_hu)),
        ("noise_kernel_mm", image_field(|i| i.noise_kernel_mm)),
        ("blur_mm", image_field(|i| i.blur_mm)),
        ("site_offset_hu", image_field(|i| i.site_offset_hu)),
        ("pixel_spacing_mm", image_field(|i| i.pixel_spacing_mm)),
        ("slice_spacing_mm", image_field(|i| i.slice_spacing_mm)),
        ("scan_z_min_mm", image_field(|i| i.scan_z_mm[0])),
        ("scan_z_max_mm", image_field(|i| i.scan_z_mm[1])),
        (
            "anatomy",
            Arc::new(truths.iter().map(|t| Some(t.anatomy.name())).collect::<StringArray>()),
        ),
        ("body_semi_axis_lr_mm", body_field(|b| b.semi_axes_mm[0])),
        ("body_semi_axis_ap_mm", body_field(|b| b.semi_axes_mm[1])),
        ("visceral_fat", body_field(|b| b.visceral_fat)),
        ("pancreas_hu", body_field(|b| b.pancreas_hu)),
        ("pancreas_z_min_mm", body_field(|b| b.pancreas_z_mm[0])),
        ("pancreas_z_max_mm", body_field(|b| b.pancreas_z_mm[1])),
        (
            "patient_position",
            Arc::new(truths.iter().map(|t| Some(t.pose.patient_position)).collect::<StringArray>()),
        ),
        (
            "fov_centre_x_mm",
            Arc::new(truths.iter().map(|t| Some(t.pose.centre_mm[0])).collect::<Float64Array>()),
        ),
        (
            "fov_centre_y_mm",
            Arc::new(truths.iter().map(|t| Some(t.pose.centre_mm[1])).collect::<Float64Array>()),
        ),
        (
            "rotation_deg",
            Arc::new(truths.iter().map(|t| Some(t.pose.rotation_deg)).collect::<Float64Array>()),
        ),
        ("age", Arc::new(truths.iter().map(|t| Some(t.age)).collect::<Int32Array>())),
        ("sex", Arc::new(truths.iter().map(|t| Some(t.sex.as_str())).collect::<StringArray>())),
        ("slices", Arc::new(truths.iter().map(|t| Some(t.slices as i32)).collect::<Int32Array>())),
        (
            "study_index",
            Arc::new(truths.iter().map(|t| Some(t.index as i32)).collect::<Int32Array>()),
        ),
    ];
    let schema = Schema::new(
        columns
            .iter()
            .map(|(name, array)| Field::new(*name, array.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, array)| array).collect(),
    )?;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lesion_count_follows_prevalence() {
        let chosen = choose_lesion_studies(20, 0.3, 7);
        assert_eq!(chosen.iter().filter(|c| **c).count(), 6);
        assert_eq!(chosen, choose_lesion_studies(20, 0.3, 7));
    }

    #[test]
    fn a_chosen_slice_distance_is_drawn_and_recorded() {
        let scratch = std::env::temp_dir().join(format!("synth-spacing-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        let options = SynthOptions {
            out: scratch.clone(),
            studies: 3,
            seed: 12,
            prevalence: 0.0,
            size: Size::Full,
            sites: SiteRegistry::builtin(),
            threads: 1,
            realistic: false,
            slices: Some(300),
            slice_spacing_mm: Some(1.25),
            poses: Poses::Standard,
            anatomy: Anatomy::Basic,
            scan_centre_z_mm: None,
            only_lesions_mm: None,
        };
        for index in 0..options.studies {
            let image = plan_study(&options, index, false).truth.image;
            assert_eq!(image.slice_spacing_mm, 1.25);
            assert_eq!(image.scan_z_mm[1] - image.scan_z_mm[0], 299.0 * 1.25);
        }
        // Without it, the size's own draw: 1–2.5 mm.
        let drawn = SynthOptions { slice_spacing_mm: None, ..options.clone() };
        let spacings: Vec<f64> = (0..12)
            .map(|index| plan_study(&drawn, index, false).truth.image.slice_spacing_mm)
            .collect();
        assert!(spacings.iter().any(|spacing| *spacing != 1.25), "{spacings:?}");
        std::fs::write(scratch.join(COHORT_RECORD), options.record().to_string()).unwrap();
        assert_eq!(SynthOptions::from_record(&scratch).unwrap().slice_spacing_mm, Some(1.25));
        let mut earlier = options.record();
        earlier.as_object_mut().unwrap().remove("slice_spacing_mm");
        std::fs::write(scratch.join(COHORT_RECORD), earlier.to_string()).unwrap();
        assert_eq!(SynthOptions::from_record(&scratch).unwrap().slice_spacing_mm, None);
        std::fs::remove_dir_all(&scratch).unwrap();
    }

    #[test]
    fn a_voxel_carries_the_reference_noise_scaled_by_its_volume() {
        // The reference voxel itself, and one 4 times its volume (half the noise).
        assert!((voxel_noise_factor(0.75, 5.0) - 1.0).abs() < 1e-12);
        assert!((voxel_noise_factor(1.5, 5.0) - 0.5).abs() < 1e-12);
        for size in [Size::Small, Size::Full] {
            let options = SynthOptions {
                out: PathBuf::new(),
                studies: 12,
                seed: 5,
                prevalence: 0.5,
                size,
                sites: SiteRegistry::builtin(),
                threads: 1,
                realistic: false,
                slices: None,
                slice_spacing_mm: None,
                poses: Poses::Varied,
                anatomy: Anatomy::Screening,
                scan_centre_z_mm: None,
                only_lesions_mm: None,
            };
            for index in 0..options.studies {
                let truth = plan_study(&options, index, index % 2 == 0).truth;
                let image = &truth.image;
                // 8–30 HU as radiology states it, whatever the voxel.
                assert!((8.0..=30.0).contains(&image.noise_reference_sigma_hu), "{image:?}");
                let factor = voxel_noise_factor(image.pixel_spacing_mm, image.slice_spacing_mm);
                let expected = image.noise_reference_sigma_hu * factor;
                assert!((truth.noise_sigma_hu - expected).abs() < 1e-9);
                // Small studies' thick voxels average the noise down; full ones' thin
                // slices carry more of it.
                match size {
                    Size::Small => assert!(factor < 1.0, "{factor}"),
                    Size::Full => assert!(factor > 1.0, "{factor}"),
                }
            }
        }
    }

    #[test]
    fn a_cohort_for_one_stratum_writes_those_studies_of_the_whole_cohort_byte_for_byte() {
        let scratch = std::env::temp_dir().join(format!("synth-stratum-{}", std::process::id()));
        let whole = SynthOptions {
            out: scratch.join("whole"),
            studies: 10,
            seed: 31,
            prevalence: 0.6,
            size: Size::Small,
            sites: SiteRegistry::builtin(),
            threads: 2,
            realistic: false,
            slices: Some(6),
            slice_spacing_mm: None,
            poses: Poses::Standard,
            anatomy: Anatomy::Basic,
            scan_centre_z_mm: None,
            only_lesions_mm: None,
        };
        let all = synthesize(&whole, &|_| {}).unwrap();
        // The basic phantom's lesions are 10–30 mm: the cut at 20 mm splits them.
        let small: Vec<&StudyTruth> = all
            .iter()
            .filter(|t| t.lesion.as_ref().is_some_and(|l| l.diameter_mm < 20.0))
            .collect();
        assert!(!small.is_empty() && small.len() < 6, "{} of 6 lesions under 20 mm", small.len());
        let stratum = SynthOptions {
            out: scratch.join("stratum"),
            only_lesions_mm: Some((10.0, 20.0)),
            ..whole.clone()
        };
        let written = synthesize(&stratum, &|_| {}).unwrap();
        assert_eq!(written, small.into_iter().cloned().collect::<Vec<_>>());
        let files = |dir: &Path| {
            let (mut files, mut folders) = (Vec::new(), vec![dir.join("studies")]);
            while let Some(folder) = folders.pop() {
                for entry in std::fs::read_dir(folder).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        folders.push(path);
                    } else {
                        files.push(path.strip_prefix(dir).unwrap().to_path_buf());
                    }
                }
            }
            files.sort();
            files
        };
        let stratum_files = files(&stratum.out);
        assert_eq!(stratum_files.len(), written.len() * 6);
        for file in &stratum_files {
            let bytes = std::fs::read(stratum.out.join(file)).unwrap();
            assert!(
                bytes == std::fs::read(whole.out.join(file)).unwrap(),
                "{} differs",
                file.display()
            );
        }
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(stratum.out.join(COHORT_RECORD)).unwrap())
                .unwrap();
        assert_eq!(record["only_lesions_mm"], serde_json::json!([10.0, 20.0]));

        // Nothing to write, and ranges that cannot be, are errors that say so.
        let none = SynthOptions {
            out: scratch.join("none"),
            only_lesions_mm: Some((35.0, 40.0)),
            ..whole.clone()
        };
        let error = synthesize(&none, &|_| {}).unwrap_err().to_string();
        assert!(
            error.contains("none of the 10 studies drawn has a lesion of 35..40 mm"),
            "{error}"
        );
        for (range, prevalence, says) in [
            ((20.0, 10.0), 0.5, "0 <= low < high"),
            ((f64::NAN, 10.0), 0.5, "0 <= low < high"),
            ((5.0, 10.0), 0.0, "--prevalence 0 would write no study"),
        ] {
            let bad = SynthOptions {
                out: scratch.join("bad"),
                prevalence,
                only_lesions_mm: Some(range),
                ..whole.clone()
            };
            let error = synthesize(&bad, &|_| {}).unwrap_err().to_string();
            assert!(error.contains(says), "{range:?}: {error}");
        }
        std::fs::remove_dir_all(&scratch).unwrap();
    }
}
