//! Studies as hospitals send them: many series beside the one to screen, a dose report,
//! tilted and oblique acquisitions, an image too large to decode, keys with spaces and
//! non-ASCII characters. Every object must end screened, quarantined or ignored, each
//! with its reason, and the run's accounting table must add up to the objects listed.

use std::path::Path;

use panscreen_shared::npy;
use panscreen_synth::{
    encode_enhanced_ct, encode_slice, synthesize, SeriesHeader, Slice, SynthOptions,
};
use panscreen_tests::{
    files_below, odd_case_header as header, query_tables, run_embedded, series_hu, small_cohort,
    write_series,
};

const KEY: &str = "0123456789abcdef0123456789abcdef-real-world";

/// Writes a 50-slice series as one Enhanced CT (multi-frame) object; returns its bytes.
fn write_enhanced(
    path: &Path,
    header: &SeriesHeader,
    position: impl Fn(usize) -> [f64; 3],
) -> Vec<u8> {
    let frames = series_hu(header, position);
    let slices: Vec<Slice<'_>> = frames
        .iter()
        .enumerate()
        .map(|(index, (position, hu))| Slice {
            sop_instance_uid: "",
            instance_number: index as i32 + 1,
            position: *position,
            hu,
        })
        .collect();
    let bytes =
        encode_enhanced_ct(header, &format!("{}.1", header.series_instance_uid), &slices).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn enhanced_ct_frames_decode_like_the_slices_they_hold() {
    let scratch = tempfile::tempdir().unwrap();
    let header = header(9, "ENHANCED");
    let place = |i: usize| [-180.0, -180.0, 50.0 - i as f64 * 2.5];
    let bytes = write_enhanced(&scratch.path().join("e.dcm"), &header, place);
    let parsed = panscreen_ingest::header::parse("e.dcm", bytes.len() as u64, &bytes).unwrap();
    assert_eq!(parsed.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2.1");
    assert_eq!(parsed.frame_positions.len(), 50);
    assert_eq!(parsed.frame_positions[7], place(7));
    assert_eq!(parsed.pixel_spacing, Some([5.6, 5.6]));
    assert_eq!(parsed.image_orientation, Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]));
    let object = panscreen_preprocess::decode::open("e.dcm", &bytes, &Default::default()).unwrap();
    // Preprocess reads the frames of a native Enhanced CT object where they lie in the file.
    let opened = panscreen_preprocess::decode::open_in_place(
        "e.dcm",
        bytes::Bytes::from(bytes.clone()),
        &Default::default(),
    )
    .unwrap();
    assert!(opened.in_place());
    for (index, (position, _)) in series_hu(&header, place).into_iter().enumerate().step_by(7) {
        let single = encode_slice(
            &header,
            &Slice {
                sop_instance_uid: "2.25.5",
                instance_number: 1,
                position,
                hu: &series_hu(&header, place)[index].1,
            },
        )
        .unwrap();
        let expected =
            panscreen_preprocess::decode::decode_slice("s.dcm", &single, -1000.0).unwrap();
        let frame =
            panscreen_preprocess::decode::decode_frame("e.dcm", &object, index as u32, -1000.0)
                .unwrap();
        assert_eq!(frame.position, position);
        assert_eq!(frame.hu, expected.hu, "frame {index}");
        let in_place = panscreen_preprocess::decode::decode_opened(
            "e.dcm",
            &opened,
            index as u32,
            -1000.0,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            (in_place.position, &in_place.hu),
            (position, &expected.hu),
            "frame {index} in place"
        );
    }
}

#[test]
fn real_studies_are_screened_from_the_right_series_and_every_object_is_accounted_for() {
    let scratch = tempfile::tempdir().unwrap();
    let cohort = scratch.path().join("cohort");
    let options =
        SynthOptions { prevalence: 0.5, realistic: true, ..small_cohort(cohort.clone(), 2, 77) };
    synthesize(&options, &|_| {}).unwrap();
    let input = cohort.join("studies");
    // Keys with spaces and non-ASCII characters: a hospital's own folder names.
    std::fs::rename(input.join("study-00001"), input.join("宁波 第一医院 (copy)")).unwrap();

    // Gantry tilt: declared, and the slices step sideways as they go.
    let mut tilted = header(1, "ABDOMEN TILT");
    tilted.gantry_tilt = 15.0;
    let shift = 15f64.to_radians().tan() * 2.5;
    write_series(&input.join("tilted"), &tilted, |i| {
        [-180.0, -180.0 + i as f64 * shift, i as f64 * 2.5]
    });
    // Oblique: slices rotated 20° about the left-right axis.
    let mut oblique = header(2, "ABDOMEN OBLIQUE");
    let angle = 20f64.to_radians();
    oblique.orientation = [1.0, 0.0, 0.0, 0.0, angle.cos(), -angle.sin()];
    let normal = [0.0, angle.sin(), angle.cos()];
    write_series(&input.join("oblique"), &oblique, |i| {
        let step = i as f64 * 2.5;
        [-180.0, -180.0 + normal[1] * step, normal[2] * step]
    });
    // Only a contrast-enhanced series: nothing fits the screening rules.
    let mut contrast = header(3, "ABDOMEN ARTERIAL");
    contrast.contrast_agent = Some("IOHEXOL 350".into());
    write_series(&input.join("contrast only"), &contrast, |i| [-180.0, -180.0, i as f64 * 2.5]);
    // The same kind of series from a newer scanner: one Enhanced CT object, 50 frames,
    // listed in reverse order along the body.
    write_enhanced(
        &input.join("enhanced/series 5/EnhancedCT.dcm"),
        &header(5, "ABDOMEN ENHANCED"),
        |i| [-180.0, -180.0, 120.0 - i as f64 * 2.5],
    );
    // A header that declares a gigantic image: refused before anything is decoded.
    let mut huge = header(4, "HUGE");
    huge.rows = 65535;
    huge.columns = 65535;
    let bytes = encode_slice(
        &huge,
        &Slice { sop_instance_uid: "2.25.801", instance_number: 1, position: [0.0; 3], hu: &[] },
    )
    .expect("a header declaring 65535×65535 pixels is written");
    std::fs::write(input.join("huge.dcm"), bytes).unwrap();
    let listed = files_below(&input).len();

    let out = scratch.path().join("out");
    run_embedded(&input, &out, &scratch.path().join("key"), KEY);
    let tables = query_tables(
        &out,
        &[
            (
                "results",
                "select series_number, series_reason, series_not_chosen from read_parquet('OUT/results/**/*.parquet')",
            ),
            ("quarantine", "select reason, detail from read_parquet('OUT/quarantine/**/*.parquet') order by reason"),
            (
                "ignored",
                "select reason, count(*) from read_parquet('OUT/ignored/**/*.parquet') group by reason order by reason",
            ),
            (
                "accounting",
                "select outcome, reason, objects, objects_listed from read_parquet('OUT/accounting/*.parquet')",
            ),
        ],
    );
    println!("{}", serde_json::to_string_pretty(&tables).unwrap());

    // Both realistic studies, one under a non-ASCII folder, screened from the plain
    // series, and the Enhanced CT study from its 50 frames.
    let results = tables["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{results:?}");
    let enhanced: Vec<&serde_json::Value> =
        results.iter().filter(|row| row[1].as_str().unwrap().contains("50 slices")).collect();
    assert_eq!(enhanced.len(), 1, "{results:?}");
    for row in results.iter().filter(|row| !row[1].as_str().unwrap().contains("50 slices")) {
        assert_eq!(row[0], 2, "the plain axial series is series 2: {row:?}");
        let not_chosen = row[2].as_str().unwrap();
        for why in [
            "LOCALIZER",
            "contrast agent IOPAMIDOL 370",
            "DERIVED\\SECONDARY\\AXIAL",
            "Secondary Capture",
        ] {
            assert!(not_chosen.contains(why), "{why} missing from {not_chosen}");
        }
    }
    let quarantine: Vec<String> = tables["quarantine"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap().to_string())
        .collect();
    for reason in [
        "series was acquired with gantry tilt",
        "series is oblique",
        "no series fits the screening rules",
    ] {
        assert!(quarantine.contains(&reason.to_string()), "{reason} not in {quarantine:?}");
    }
    assert!(
        quarantine.contains(&"image would decode beyond the size limit".to_string()),
        "{quarantine:?}"
    );
    let ignored: Vec<(String, u64)> = tables["ignored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_u64().unwrap()))
        .collect();
    assert!(
        ignored.contains(&("not an image: X-Ray Radiation Dose SR Storage".to_string(), 2)),
        "{ignored:?}"
    );

    // The accounting adds up to every file in the input, and each outcome is there.
    let accounting = tables["accounting"].as_array().unwrap();
    let total: u64 = accounting.iter().map(|r| r[2].as_u64().unwrap()).sum();
    assert_eq!(total as usize, listed, "{accounting:?}");
    assert!(accounting.iter().all(|r| r[3].as_u64().unwrap() as usize == listed));
    for outcome in ["screened", "quarantined", "ignored"] {
        assert!(accounting.iter().any(|r| r[0] == outcome), "no {outcome} row: {accounting:?}");
    }
    // Screened objects are exactly the two plain series and the Enhanced CT object.
    let screened: u64 =
        accounting.iter().filter(|r| r[0] == "screened").map(|r| r[2].as_u64().unwrap()).sum();
    assert_eq!(screened, 121);

    // No identifier of the odd cases leaks into any output.
    for file in files_below(&out) {
        let bytes = std::fs::read(&file).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for secret in ["ODD^CASE", "ODD0000", "ACCODD", "19550505"] {
            assert!(!text.contains(secret), "{secret} in {}", file.display());
        }
    }
}

/// The same patient scanned supine head first, prone, feet first and lying on their
/// side: every series is resampled onto the same patient axes, so the model is given
/// the same tensor (to float rounding) and the geometry points the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prone_feet_first_and_side_lying_scans_give_the_supine_tensor() {
    use panscreen_shared::store::{OpenMode, Store};
    let scratch = tempfile::tempdir().unwrap();
    let supine = header(7, "ABDOMEN");
    let step = supine.pixel_spacing[0] * 63.0;
    let planes = series_hu(&supine, |i| [-180.0, -180.0, i as f64 * 2.5]);
    // (name, orientation, first pixel's shift, pixel (r, c) ← supine pixel)
    type Source = fn(usize, usize) -> (usize, usize);
    let variants: [(&str, [f64; 6], [f64; 3], Source); 4] = [
        ("supine", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0], |r, c| (r, c)),
        ("prone", [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0], [step, step, 0.0], |r, c| (63 - r, 63 - c)),
        ("feet first", [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [step, 0.0, 0.0], |r, c| (r, 63 - c)),
        ("on the side", [0.0, 1.0, 0.0, -1.0, 0.0, 0.0], [step, 0.0, 0.0], |r, c| (c, 63 - r)),
    ];
    let manifest = std::sync::Arc::new(
        panscreen_shared::manifest::ModelManifest::load(
            &panscreen_tests::workspace_root().join("models/tiny-panda"),
        )
        .unwrap(),
    );
    let mut tensors = Vec::new();
    for (name, orientation, shift, source) in variants {
        let directory = scratch.path().join(name);
        std::fs::create_dir_all(&directory).unwrap();
        let mut series = header(7, "ABDOMEN");
        series.orientation = orientation;
        for (index, (position, hu)) in planes.iter().enumerate() {
            let turned: Vec<f32> = (0..64 * 64)
                .map(|at| {
                    let (r, c) = source(at / 64, at % 64);
                    hu[r * 64 + c]
                })
                .collect();
            let uid = format!("{}.{index}", series.series_instance_uid);
            let slice = Slice {
                sop_instance_uid: &uid,
                instance_number: index as i32 + 1,
                position: std::array::from_fn(|axis| position[axis] + shift[axis]),
                hu: &turned,
            };
            let bytes = encode_slice(&series, &slice).unwrap();
            std::fs::write(directory.join(format!("{index:02}.dcm")), bytes).unwrap();
        }
        let input = Store::open(directory.to_str().unwrap(), OpenMode::Existing).unwrap();
        let queue = std::sync::Arc::new(panscreen_shared::queue::MemoryQueue::new());
        let report = panscreen_ingest::run_once(
            queue,
            &input,
            &panscreen_ingest::IngestConfig::new("turned"),
            &panscreen_shared::pseudonym::Pseudonymizer::new(KEY.as_bytes().to_vec()).unwrap(),
            &panscreen_shared::sites::SiteRegistry::builtin(),
            None,
        )
        .await
        .unwrap();
        assert_eq!(report.studies.len(), 1, "{name}: {:?}", report.quarantined);
        let work =
            Store::open(scratch.path().join("work").to_str().unwrap(), OpenMode::Create).unwrap();
        let handler = panscreen_preprocess::PreprocessHandler {
            campaign: "turned".into(),
            input,
            work,
            manifest: manifest.clone(),
            fetch_ahead: 4,
        };
        let (geometry, volume) = handler.build_tensor(&report.studies[0]).await.unwrap();
        tensors.push((name, geometry, volume));
    }
    let (_, reference, expected) = &tensors[0];
    let spread = expected.iter().fold(0.0f32, |m, v| m.max((v - expected[0]).abs()));
    assert!(spread > 0.1, "the phantom must not be uniform ({spread})");
    // Turned 180° it is not the same volume, so a series left unturned would fail below.
    let turned: f32 =
        expected.iter().zip(expected.iter().rev()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(turned > 0.1, "{turned}");
    let centre = reference.shape[2..].iter().map(|n| (*n as f64 - 1.0) / 2.0).collect::<Vec<_>>();
    let centre = [centre[0], centre[1], centre[2]];
    for (name, geometry, volume) in &tensors[1..] {
        let worst = volume.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{name}: the tensor differs by up to {worst}");
        for (found, wanted) in [
            (geometry.row_direction, reference.row_direction),
            (geometry.column_direction, reference.column_direction),
            (geometry.slice_direction, reference.slice_direction),
            (geometry.to_patient(centre), reference.to_patient(centre)),
            (geometry.origin_mm, reference.origin_mm),
        ] {
            let apart = (0..3).map(|axis| (found[axis] - wanted[axis]).abs()).fold(0.0, f64::max);
            assert!(apart < 1e-6, "{name}: {found:?} where supine has {wanted:?}");
        }
    }
}

/// Patients as they lie in real scanners (shifted up to 40 mm, turned up to 10°, some
/// prone, some feet first): every study is screened, by the one-stage model and by both
/// cascades, and where any finds a lesion, the centroid it reports is where the lesion
/// is in the patient, through every orientation (the geometry from DICOM to tensor and
/// back holds, for the cascade through its coarse grid, its box and its patches too).
#[test]
fn varied_poses_are_screened_and_lesions_are_found_where_they_are() {
    use arrow::array::{Array, BooleanArray, Float64Array, StringArray};
    let scratch = tempfile::tempdir().unwrap();
    let cohort = SynthOptions {
        prevalence: 0.5,
        poses: panscreen_synth::Poses::Varied,
        ..small_cohort(scratch.path().join("cohort"), 18, 21)
    };
    let truths = synthesize(&cohort, &|_| {}).unwrap();
    let positions: std::collections::BTreeSet<&str> =
        truths.iter().map(|t| t.pose.patient_position).collect();
    assert_eq!(positions.len(), 3, "HFS, HFP and FFS in the cohort: {positions:?}");
    let models = panscreen_tests::workspace_root().join("models");
    let (one_stage, hand_set) = (models.join("tiny-panda"), models.join("tiny-panda-cascade"));
    for (name, model) in [
        ("one-stage", Some(one_stage.as_path())),
        ("hand-set cascade", Some(hand_set.as_path())),
        ("learned cascade, the default", None),
    ] {
        let out = scratch.path().join(format!("out-{name}"));
        panscreen_tests::run_embedded_with(
            &cohort.out.join("studies"),
            &out,
            &scratch.path().join("key"),
            KEY,
            model,
        );
        let mut results = std::collections::BTreeMap::new();
        for file in panscreen_tests::parquet_files(&out.join("results")).unwrap() {
            for batch in panscreen_tests::read_batches(&file).unwrap() {
                let column = |name: &str| batch.column_by_name(name).unwrap().clone();
                let keys = column("study_key");
                let keys = keys.as_any().downcast_ref::<StringArray>().unwrap();
                let flagged = column("flagged");
                let flagged = flagged.as_any().downcast_ref::<BooleanArray>().unwrap();
                let assessable = column("assessable");
                let assessable = assessable.as_any().downcast_ref::<BooleanArray>().unwrap();
                let centroid: Vec<_> = ["x", "y", "z"]
                    .iter()
                    .map(|axis| column(&format!("lesion_centroid_{axis}_mm")))
                    .collect();
                for row in 0..batch.num_rows() {
                    let at = |axis: usize| {
                        let values =
                            centroid[axis].as_any().downcast_ref::<Float64Array>().unwrap();
                        values.is_valid(row).then(|| values.value(row))
                    };
                    let point = (0..3).map(at).collect::<Option<Vec<f64>>>();
                    results.insert(
                        keys.value(row).to_string(),
                        (flagged.value(row), assessable.value(row), point),
                    );
                }
            }
        }
        assert_eq!(results.len(), truths.len(), "{name}: every study screened");
        let pseudonymizer =
            panscreen_shared::pseudonym::Pseudonymizer::new(KEY.as_bytes().to_vec()).unwrap();
        let (mut found, mut found_turned) = (0, 0);
        for truth in &truths {
            let (flagged, assessable, point) =
                &results[&pseudonymizer.study(&truth.study_instance_uid)];
            assert!(*assessable, "{name} {}: the whole pancreas is in every scan", truth.directory);
            let (Some(lesion), true, Some(point)) = (&truth.lesion, *flagged, point) else {
                continue;
            };
            let distance = (0..3)
                .map(|axis| (point[axis] - lesion.center_mm[axis]).powi(2))
                .sum::<f64>()
                .sqrt();
            eprintln!(
                "{name} {} {}: lesion {:.0} mm found {distance:.1} mm from its centre",
                truth.directory, truth.pose.patient_position, lesion.diameter_mm
            );
            assert!(
                distance <= lesion.diameter_mm.max(10.0),
                "{name} {} ({}): centroid {point:?}, lesion at {:?}",
                truth.directory,
                truth.pose.patient_position,
                lesion.center_mm
            );
            found += 1;
            if truth.pose.patient_position != "HFS" {
                found_turned += 1;
            }
        }
        assert!(found >= 4, "{name}: {found} lesions found and placed");
        assert!(found_turned > 0, "{name}: no lesion of a prone or feet-first study was found");
    }
}

/// The screening phantom's studies (fields of view that follow the body, 2.5–5 mm
/// slices, 150–450 mm scans, varied poses, correlated noise) all go through the
/// cascade: each one is in the results, scored or judged not assessable with its reason;
/// none is quarantined. What the model makes of them is measured in docs/benchmarks.md.
#[test]
fn every_study_of_the_screening_phantom_is_screened() {
    use arrow::array::{Array, BooleanArray, StringArray};
    let scratch = tempfile::tempdir().unwrap();
    let cohort = SynthOptions {
        prevalence: 0.5,
        poses: panscreen_synth::Poses::Varied,
        anatomy: panscreen_synth::Anatomy::Screening,
        ..small_cohort(scratch.path().join("cohort"), 8, 23)
    };
    let truths = synthesize(&cohort, &|_| {}).unwrap();
    let spacings: std::collections::BTreeSet<String> = truths
        .iter()
        .map(|t| format!("{}/{}", t.image.pixel_spacing_mm, t.image.slice_spacing_mm))
        .collect();
    assert!(spacings.len() >= 4, "geometry varies from study to study: {spacings:?}");
    let out = scratch.path().join("out");
    let cascade = panscreen_tests::workspace_root().join("models/tiny-panda-cascade");
    panscreen_tests::run_embedded_with(
        &cohort.out.join("studies"),
        &out,
        &scratch.path().join("key"),
        KEY,
        Some(cascade.as_path()),
    );
    let mut screened = std::collections::BTreeMap::new();
    for file in panscreen_tests::parquet_files(&out.join("results")).unwrap() {
        for batch in panscreen_tests::read_batches(&file).unwrap() {
            let column = |name: &str| batch.column_by_name(name).unwrap().clone();
            let (keys, assessable, reasons) =
                (column("study_key"), column("assessable"), column("not_assessable_reason"));
            let keys = keys.as_any().downcast_ref::<StringArray>().unwrap();
            let assessable = assessable.as_any().downcast_ref::<BooleanArray>().unwrap();
            let reasons = reasons.as_any().downcast_ref::<StringArray>().unwrap();
            for row in 0..batch.num_rows() {
                assert_eq!(
                    assessable.value(row),
                    !reasons.is_valid(row),
                    "a study not assessable says why, an assessable one has no reason"
                );
                screened.insert(keys.value(row).to_string(), assessable.value(row));
            }
        }
    }
    let pseudonymizer =
        panscreen_shared::pseudonym::Pseudonymizer::new(KEY.as_bytes().to_vec()).unwrap();
    for truth in &truths {
        let key = pseudonymizer.study(&truth.study_instance_uid);
        assert!(screened.contains_key(&key), "{} is not in the results", truth.directory);
    }
    let quarantined = panscreen_tests::parquet_files(&out.join("quarantine")).unwrap_or_default();
    let rows: usize = quarantined
        .iter()
        .flat_map(|file| panscreen_tests::read_batches(file).unwrap())
        .map(|batch| batch.num_rows())
        .sum();
    assert_eq!(rows, 0, "nothing of the screening phantom is quarantined");
}

/// `panscreen model dataset`: the tensors a cascade is given, with the phantom's truth
/// on them. The truth lands on the image through every pose: the gland's inner voxels
/// (two voxels from its edge) read the gland's HU plus the site's offset, within its
/// texture; a lesion study has lesion voxels on both grids; the gland's volume on the
/// 4 mm grid and on the fine one agree.
#[test]
fn a_dataset_puts_the_phantoms_truth_on_the_models_grids() {
    use arrow::array::{Array, Float64Array, StringArray};
    use std::ffi::OsStr;
    let scratch = tempfile::tempdir().unwrap();
    let cohort = SynthOptions {
        prevalence: 0.5,
        poses: panscreen_synth::Poses::Varied,
        anatomy: panscreen_synth::Anatomy::Screening,
        ..small_cohort(scratch.path().join("cohort"), 4, 5)
    };
    let truths = synthesize(&cohort, &|_| {}).unwrap();
    let out = scratch.path().join("dataset");
    let model = panscreen_tests::workspace_root().join("models/tiny-panda-cascade");
    let output = panscreen_tests::panscreen(&[
        OsStr::new("model"),
        OsStr::new("dataset"),
        OsStr::new("--cohort"),
        cohort.out.as_os_str(),
        OsStr::new("--model"),
        model.as_os_str(),
        OsStr::new("--out"),
        out.as_os_str(),
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut gland_hu = std::collections::HashMap::new();
    for batch in panscreen_tests::read_batches(&cohort.out.join("labels.parquet")).unwrap() {
        let column = |name: &str| batch.column_by_name(name).unwrap().clone();
        let (dirs, hu, offset) =
            (column("study_dir"), column("pancreas_hu"), column("site_offset_hu"));
        let dirs = dirs.as_any().downcast_ref::<StringArray>().unwrap();
        let hu = hu.as_any().downcast_ref::<Float64Array>().unwrap();
        let offset = offset.as_any().downcast_ref::<Float64Array>().unwrap();
        for row in 0..batch.num_rows() {
            gland_hu.insert(dirs.value(row).to_string(), hu.value(row) + offset.value(row));
        }
    }
    let read = |path: std::path::PathBuf| std::fs::read(&path).unwrap();
    for truth in &truths {
        let name = &truth.directory;
        let (shape, labels) =
            npy::decode_u8(&read(out.join(format!("fine/{name}.labels.npy")))).unwrap();
        let (image_shape, hu) =
            npy::decode_i16(&read(out.join(format!("fine/{name}.npy")))).unwrap();
        assert_eq!(shape, image_shape);
        let (_, coarse) =
            npy::decode_u8(&read(out.join(format!("coarse/{name}.labels.npy")))).unwrap();
        let volume = |labels: &[u8], voxel_mm3: f64| {
            labels.iter().filter(|l| **l != 0).count() as f64 * voxel_mm3 / 1000.0
        };
        let (fine_ml, coarse_ml) = (volume(&labels, 12.0), volume(&coarse, 64.0));
        assert!((fine_ml / coarse_ml - 1.0).abs() < 0.15, "{name}: {fine_ml} ml vs {coarse_ml} ml");
        let [depth, height, width] = [shape[0], shape[1], shape[2]];
        let at = |z: usize, y: usize, x: usize| (z * height + y) * width + x;
        let mut inner = Vec::new();
        for z in 2..depth - 2 {
            for y in 2..height - 2 {
                for x in 2..width - 2 {
                    let gland = |dz: i64, dy: i64, dx: i64| {
                        labels[at(
                            (z as i64 + dz) as usize,
                            (y as i64 + dy) as usize,
                            (x as i64 + dx) as usize,
                        )] == panscreen_synth::PANCREAS
                    };
                    let deep = (-2..=2).all(|d| gland(d, 0, 0) && gland(0, d, 0) && gland(0, 0, d));
                    if deep {
                        inner.push(f64::from(hu[at(z, y, x)]));
                    }
                }
            }
        }
        assert!(inner.len() > 200, "{name}: {} inner gland voxels", inner.len());
        let mean = inner.iter().sum::<f64>() / inner.len() as f64;
        let wanted = gland_hu[name];
        assert!(
            (mean - wanted).abs() < 6.0,
            "{name} ({}): inner gland {mean:.1} HU, truth {wanted:.1}",
            truth.pose.patient_position
        );
        let lesion_voxels = labels.iter().filter(|l| **l == panscreen_synth::LESION).count();
        assert_eq!(
            lesion_voxels > 0,
            truth.lesion.is_some(),
            "{name}: {lesion_voxels} lesion voxels"
        );
    }
    let lines = std::fs::read_to_string(out.join("dataset.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), truths.len());
}

/// The cascade judges only a scan that holds the whole pancreas. Scans of the pelvis
/// (no pancreas) and scans that end across the pancreas come out not assessable, each
/// with its reason: no probability, never flagged, counted apart in the summary. Whole
/// scans beside them are scored as usual.
#[test]
fn the_cascade_judges_only_scans_that_hold_the_whole_pancreas() {
    let scratch = tempfile::tempdir().unwrap();
    let input = scratch.path().join("input");
    let mut expected = std::collections::BTreeMap::new();
    let pseudonymizer =
        panscreen_shared::pseudonym::Pseudonymizer::new(KEY.as_bytes().to_vec()).unwrap();
    for (seed, centre, outcome) in [
        (61, None, "assessable"),
        (62, Some(-200.0), "no pancreas found"),
        (63, Some(-60.0), "the pancreas runs off the scan"),
    ] {
        let cohort = SynthOptions {
            prevalence: 0.5,
            scan_centre_z_mm: centre,
            ..small_cohort(input.join(format!("cohort-{seed}")), 2, seed)
        };
        for truth in synthesize(&cohort, &|_| {}).unwrap() {
            expected.insert(pseudonymizer.study(&truth.study_instance_uid), outcome);
        }
    }
    let out = scratch.path().join("out");
    let cascade = panscreen_tests::workspace_root().join("models/tiny-panda-cascade");
    panscreen_tests::run_embedded_with(
        &input,
        &out,
        &scratch.path().join("key"),
        KEY,
        Some(&cascade),
    );
    let tables = query_tables(
        &out,
        &[
            (
                "results",
                "select study_key, assessable, coalesce(not_assessable_reason, ''), \
                 lesion_probability is null, flagged, pancreas_volume_mm3 is null \
                 from read_parquet('OUT/results/**/*.parquet')",
            ),
            (
                "summary",
                "select sum(screened), sum(not_assessable) from 'OUT/summary/summary.parquet'",
            ),
        ],
    );
    let rows = tables["results"].as_array().unwrap();
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    for row in rows {
        let outcome = expected[row[0].as_str().unwrap()];
        let (assessable, reason) = (row[1].as_bool().unwrap(), row[2].as_str().unwrap());
        if outcome == "assessable" {
            assert!(assessable && reason.is_empty(), "{row:?}");
            assert_eq!((row[3].as_bool(), row[5].as_bool()), (Some(false), Some(false)), "{row:?}");
        } else {
            assert!(!assessable && reason.starts_with(outcome), "{outcome}: {row:?}");
            assert_eq!(row[3].as_bool(), Some(true), "no probability: {row:?}");
            assert_eq!(row[4].as_bool(), Some(false), "never flagged: {row:?}");
        }
    }
    assert_eq!(tables["summary"], serde_json::json!([[6, 4]]));
}
