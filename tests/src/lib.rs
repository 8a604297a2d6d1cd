//! Helpers for panscreen's end-to-end tests: where the binary and the Python are,
//! running the CLI, reading the Parquet tables back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use panscreen_evaluate::{parquet_files, read_batches};
use panscreen_shared::sites::SiteRegistry;
use panscreen_synth::{encode_slice, Phantom, Rng, SeriesHeader, Size, Slice, SynthOptions};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The `panscreen` binary: `PANSCREEN_BIN`, else target/release or target/debug.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PANSCREEN_BIN") {
        return PathBuf::from(path);
    }
    for profile in ["release", "debug"] {
        let path = workspace_root().join("target").join(profile).join("panscreen");
        if path.is_file() {
            return path;
        }
    }
    panic!("the panscreen binary is not built; run `cargo xtask test` (or `cargo build --release -p panscreen`)");
}

/// Python with the packages of tests/requirements.txt.
pub fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("PANSCREEN_PYTHON") {
        return PathBuf::from(path);
    }
    let path = workspace_root().join(".panscreen/venv/bin/python");
    assert!(
        path.is_file(),
        "{} is missing; run `cargo xtask setup-python` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// Runs `panscreen ARGS` from the workspace root; returns the output.
pub fn panscreen(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(binary())
        .current_dir(workspace_root())
        .args(args)
        .output()
        .expect("panscreen starts")
}

/// `panscreen run --input INPUT --out OUT --key-file KEY_FILE` (the key written there
/// first); returns the output, having checked that the run succeeded.
pub fn run_embedded(input: &Path, out: &Path, key_file: &Path, key: &str) -> Output {
    run_embedded_with(input, out, key_file, key, None)
}

/// [`run_embedded`] with the model in `model` (the default model when `None`).
pub fn run_embedded_with(
    input: &Path,
    out: &Path,
    key_file: &Path,
    key: &str,
    model: Option<&Path>,
) -> Output {
    std::fs::write(key_file, key).unwrap();
    let mut args = vec![
        std::ffi::OsStr::new("run"),
        std::ffi::OsStr::new("--input"),
        input.as_os_str(),
        std::ffi::OsStr::new("--out"),
        out.as_os_str(),
        std::ffi::OsStr::new("--key-file"),
        key_file.as_os_str(),
    ];
    if let Some(model) = model {
        args.extend([std::ffi::OsStr::new("--model"), model.as_os_str()]);
    }
    let run = panscreen(&args);
    assert!(run.status.success(), "the run stopped: {}", String::from_utf8_lossy(&run.stderr));
    run
}

/// Runs each named DuckDB query over the tables under `out` (`OUT` in a query stands
/// for it) and returns `{name: rows}` as JSON, as an epidemiologist would read them.
pub fn query_tables(out: &Path, queries: &[(&str, &str)]) -> serde_json::Value {
    let script = r#"
import duckdb, json, sys
out, queries = sys.argv[1], json.loads(sys.argv[2])
print(json.dumps({name: duckdb.sql(sql.replace("OUT", out)).fetchall() for name, sql in queries.items()}))
"#;
    let queries: serde_json::Map<String, serde_json::Value> = queries
        .iter()
        .map(|(name, sql)| (name.to_string(), serde_json::Value::from(*sql)))
        .collect();
    let output = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(out)
        .arg(serde_json::Value::Object(queries).to_string())
        .output()
        .expect("python starts");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("the script prints JSON")
}

/// Every file below `directory`.
pub fn files_below(directory: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `studies` plain `small` studies without lesions, written to `out` by `synthesize`.
pub fn small_cohort(out: PathBuf, studies: usize, seed: u64) -> SynthOptions {
    SynthOptions {
        out,
        studies,
        seed,
        prevalence: 0.0,
        size: Size::Small,
        sites: SiteRegistry::builtin(),
        threads: 2,
        realistic: false,
        slices: None,
        slice_spacing_mm: None,
        poses: panscreen_synth::Poses::Standard,
        anatomy: panscreen_synth::Anatomy::Basic,
        scan_centre_z_mm: None,
        only_lesions_mm: None,
    }
}

/// The header of a 64×64 plain axial CT series of an odd case `study`: patient
/// identifiers the leak checks look for (`ODD^CASE`, `ODD0000…`, `ACCODD…`, `19550505`).
pub fn odd_case_header(study: u32, description: &str) -> SeriesHeader {
    SeriesHeader {
        patient_name: format!("ODD^CASE^{study}"),
        patient_id: format!("ODD{study:05}"),
        patient_birth_date: "19550505".into(),
        patient_sex: "M".into(),
        patient_age: "070Y".into(),
        accession_number: format!("ACCODD{study:04}"),
        study_instance_uid: format!("2.25.77{study}"),
        series_instance_uid: format!("2.25.78{study}"),
        frame_of_reference_uid: format!("2.25.79{study}"),
        study_date: "20250606".into(),
        study_time: "090000".into(),
        series_description: description.into(),
        pixel_spacing: [5.6, 5.6],
        ..SeriesHeader::plain_ct()
    }
}

/// The HU of a 50-slice series; `position(i)` places slice i.
pub fn series_hu(
    header: &SeriesHeader,
    position: impl Fn(usize) -> [f64; 3],
) -> Vec<([f64; 3], Vec<f32>)> {
    let mut rng = Rng::derive(5, &[header.study_instance_uid.len() as u64]);
    let phantom = Phantom::random(&mut rng, false);
    (0..50)
        .map(|index| {
            (position(index), phantom.slice_hu(position(index), header.pixel_spacing, 64, 64))
        })
        .collect()
}

/// The DICOM files of a 50-slice series, as (file name, bytes); `name(i)` names slice i.
pub fn series_files(
    header: &SeriesHeader,
    position: impl Fn(usize) -> [f64; 3],
    name: impl Fn(usize) -> String,
) -> Vec<(String, Vec<u8>)> {
    series_hu(header, position)
        .into_iter()
        .enumerate()
        .map(|(index, (position, hu))| {
            let uid = format!("{}.{index}", header.series_instance_uid);
            let slice = Slice {
                sop_instance_uid: &uid,
                instance_number: index as i32 + 1,
                position,
                hu: &hu,
            };
            (name(index), encode_slice(header, &slice).expect("a slice encodes"))
        })
        .collect()
}

/// Writes a 50-slice series, one file per slice (`slice NN.dcm`).
pub fn write_series(directory: &Path, header: &SeriesHeader, position: impl Fn(usize) -> [f64; 3]) {
    std::fs::create_dir_all(directory).unwrap();
    for (name, bytes) in series_files(header, position, |index| format!("slice {index:02}.dcm")) {
        std::fs::write(directory.join(name), bytes).unwrap();
    }
}

/// A stage handler that takes `delay` per batch and passes each payload on to
/// `panscreen.slow.out` under its own text as message id; counts its batches.
pub struct SlowEcho {
    pub delay: std::time::Duration,
    pub stage: panscreen_shared::contracts::Stage,
    pub batches: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl panscreen_shared::worker::Handler for SlowEcho {
    fn stage(&self) -> panscreen_shared::contracts::Stage {
        self.stage
    }

    async fn handle_batch(
        &self,
        payloads: Vec<bytes::Bytes>,
    ) -> Vec<Result<panscreen_shared::worker::Outcome, panscreen_shared::error::StageError>> {
        tokio::time::sleep(self.delay).await;
        self.batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        payloads
            .into_iter()
            .map(|payload| {
                let id = String::from_utf8_lossy(&payload).to_string();
                Ok(panscreen_shared::worker::Outcome::Publish {
                    subject: "panscreen.slow.out".into(),
                    message_id: id,
                    payload,
                })
            })
            .collect()
    }
}

pub mod servers;
