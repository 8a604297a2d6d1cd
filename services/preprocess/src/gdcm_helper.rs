//! JPEG-LS and 12-bit JPEG frames are decoded by GDCM in helper processes.
//!
//! GDCM is C++ and throws exceptions on some corrupt streams; an exception that reaches
//! Rust across the FFI boundary aborts the whole process, and with it every study in
//! flight (in an embedded run, the run). So those frames go to a small pool of helper
//! processes (`panscreen gdcm-decoder`, hidden): a helper that dies on a frame takes only
//! that frame with it. The frame's study is quarantined with the reason on its first
//! attempt, and the next frame gets a fresh helper.
//!
//! The protocol on the helper's stdin and stdout, all integers little-endian: a request
//! is `PSGD`, the transfer syntax (u8: 1 JPEG extended, 2 JPEG-LS lossless, 3 JPEG-LS
//! near-lossless), rows and columns (u32), bits allocated, bits stored and pixel
//! representation (u16), the compressed length (u64) and the bytes; a response is a
//! status (u8: 0 decoded, 1 GDCM refused the frame), a length (u64) and the pixels or
//! GDCM's message.

use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// Whether this build has GDCM (the `gdcm` feature). Without it, frames of the syntaxes
/// GDCM decodes are refused before any helper starts
/// ([`crate::PreprocessError::CodecLeftOut`]).
pub const WITH_GDCM: bool = cfg!(feature = "gdcm");

/// The hidden subcommand of `panscreen` that serves as a helper.
pub const SUBCOMMAND: &str = "gdcm-decoder";

/// The environment variable naming the helper program when it is not set in code.
pub const PROGRAM_ENV: &str = "PANSCREEN_GDCM_HELPER";

/// A helper's address space is capped (a corrupt frame cannot exhaust the host).
const HELPER_MEMORY_LIMIT: u64 = 4 << 30;

/// A helper that has not answered one frame after this long is killed, and the frame's
/// study quarantined (a CT frame decodes in milliseconds; a hang in GDCM would otherwise
/// hold a blocking thread and a core until the process ends). `PANSCREEN_GDCM_FRAME_SECONDS`
/// sets another limit.
const FRAME_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// The environment variable that overrides [`FRAME_DEADLINE`] (whole seconds).
pub const FRAME_DEADLINE_ENV: &str = "PANSCREEN_GDCM_FRAME_SECONDS";

fn frame_deadline() -> std::time::Duration {
    std::env::var(FRAME_DEADLINE_ENV)
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|seconds| *seconds > 0)
        .map(std::time::Duration::from_secs)
        .unwrap_or(FRAME_DEADLINE)
}

/// Compressed frames larger than this are not sent (a CT frame is far smaller).
const MAX_FRAME_BYTES: u64 = 1 << 30;

static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Names the program to run as `PROGRAM gdcm-decoder` (the `panscreen` binary sets itself).
pub fn set_program(path: PathBuf) {
    let _ = PROGRAM.set(path);
}

fn program() -> Result<PathBuf, String> {
    if let Some(path) = PROGRAM.get() {
        return Ok(path.clone());
    }
    for variable in [PROGRAM_ENV, "PANSCREEN_BIN"] {
        if let Some(path) = std::env::var_os(variable) {
            return Ok(PathBuf::from(path));
        }
    }
    Err(format!("no helper program is set: set {PROGRAM_ENV} to the panscreen binary"))
}

/// What one frame needs besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpec {
    pub transfer_syntax: u8,
    pub rows: u32,
    pub columns: u32,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub pixel_representation: u16,
}

/// Why a frame did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelperError {
    /// GDCM refused the frame and said why.
    Refused(String),
    /// The helper died on the frame (a C++ exception, a crash, the memory cap).
    Crashed(String),
    /// No helper could be started or talked to.
    Unavailable(String),
}

/// The transfer syntax code of the protocol for a UID GDCM decodes here.
pub fn syntax_code(uid: &str) -> Option<u8> {
    match uid {
        "1.2.840.10008.1.2.4.51" => Some(1),
        "1.2.840.10008.1.2.4.80" => Some(2),
        "1.2.840.10008.1.2.4.81" => Some(3),
        _ => None,
    }
}

/// The transfer syntax's name, for people.
pub fn syntax_name(code: u8) -> &'static str {
    match code {
        1 => "JPEG extended (12-bit lossy)",
        2 => "JPEG-LS lossless",
        3 => "JPEG-LS near-lossless",
        _ => "an unknown syntax",
    }
}

struct Helper {
    process: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    fn start() -> Result<Helper, HelperError> {
        Self::start_program(&program().map_err(HelperError::Unavailable)?)
    }

    fn start_program(program: &std::path::Path) -> Result<Helper, HelperError> {
        let mut process = Command::new(program)
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| {
                HelperError::Unavailable(format!("cannot start {}: {error}", program.display()))
            })?;
        let stdin = process.stdin.take().expect("piped");
        let stdout = BufReader::new(process.stdout.take().expect("piped"));
        Ok(Helper { process, stdin, stdout })
    }

    fn decode(
        &mut self,
        spec: &FrameSpec,
        compressed: &[u8],
    ) -> std::io::Result<Result<Vec<u8>, String>> {
        let mut request = Vec::with_capacity(27 + compressed.len());
        request.extend_from_slice(b"PSGD");
        request.push(spec.transfer_syntax);
        request.extend_from_slice(&spec.rows.to_le_bytes());
        request.extend_from_slice(&spec.columns.to_le_bytes());
        for value in [spec.bits_allocated, spec.bits_stored, spec.pixel_representation] {
            request.extend_from_slice(&value.to_le_bytes());
        }
        request.extend_from_slice(&(compressed.len() as u64).to_le_bytes());
        request.extend_from_slice(compressed);
        self.stdin.write_all(&request)?;
        self.stdin.flush()?;
        let mut status = [0u8; 9];
        self.stdout.read_exact(&mut status)?;
        let length = u64::from_le_bytes(status[1..9].try_into().expect("8 bytes"));
        let expected = u64::from(spec.rows)
            * u64::from(spec.columns)
            * u64::from(spec.bits_allocated.div_ceil(8));
        if length > expected.max(64 * 1024) {
            return Err(std::io::Error::other(format!(
                "the helper answered {length} bytes for a {expected}-byte frame"
            )));
        }
        let mut body = vec![0u8; length as usize];
        self.stdout.read_exact(&mut body)?;
        Ok(match status[0] {
            0 => Ok(body),
            _ => Err(String::from_utf8_lossy(&body).to_string()),
        })
    }

    /// [`Helper::decode`] under a deadline: a watchdog thread kills the helper when it
    /// has not answered in time. Returns whether the watchdog fired (the helper is then
    /// dead, whatever `decode` returned).
    fn decode_within(
        &mut self,
        deadline: std::time::Duration,
        spec: &FrameSpec,
        compressed: &[u8],
    ) -> (std::io::Result<Result<Vec<u8>, String>>, bool) {
        let pid = self.process.id() as libc::pid_t;
        let (answered, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let fired = matches!(
                wait.recv_timeout(deadline),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if fired {
                // SAFETY: kill only sends a signal to the helper's own process id.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            fired
        });
        let outcome = self.decode(spec, compressed);
        drop(answered);
        (outcome, watchdog.join().unwrap_or(true))
    }

    /// How the helper ended, once it has (for the quarantine reason).
    fn ending(mut self) -> String {
        drop(self.stdin);
        match self.process.wait() {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                match status.signal() {
                    Some(6) => "it aborted (an uncaught C++ exception in GDCM)".to_string(),
                    Some(9) => "it was killed (the memory cap, or the system)".to_string(),
                    Some(signal) => format!("it died of signal {signal}"),
                    None => format!("it exited with {status}"),
                }
            }
            Err(error) => format!("its end is unknown: {error}"),
        }
    }
}

/// Idle helpers, reused across frames.
static IDLE: Mutex<Vec<Helper>> = Mutex::new(Vec::new());

/// Decodes one frame in a helper process. Blocking: call it on a blocking thread.
pub fn decode(spec: &FrameSpec, compressed: &[u8]) -> Result<Vec<u8>, HelperError> {
    let idle = IDLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
    let mut helper = match idle {
        Some(helper) => helper,
        None => Helper::start()?,
    };
    let deadline = frame_deadline();
    match helper.decode_within(deadline, spec, compressed) {
        (Ok(result), false) => {
            IDLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(helper);
            result.map_err(HelperError::Refused)
        }
        (_, true) => {
            let _ = helper.ending();
            Err(HelperError::Crashed(format!(
                "the GDCM helper did not finish this frame within {} s and was killed (GDCM hangs on it)",
                deadline.as_secs()
            )))
        }
        (Err(error), false) => {
            let _ = helper.process.kill();
            let ending = helper.ending();
            Err(HelperError::Crashed(format!(
                "the GDCM helper died on this frame: {ending} ({error})"
            )))
        }
    }
}

/// The helper's side: decodes requests from `input` until it ends. Any failure to read
/// a well-formed request ends the helper.
pub fn serve(mut input: impl Read, mut output: impl Write) -> std::io::Result<()> {
    limit_memory();
    loop {
        let mut header = [0u8; 27];
        match input.read_exact(&mut header) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(error),
        }
        if &header[..4] != b"PSGD" {
            return Err(std::io::Error::other("not a gdcm-decoder request"));
        }
        let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
        let u32_at =
            |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let spec = FrameSpec {
            transfer_syntax: header[4],
            rows: u32_at(5),
            columns: u32_at(9),
            bits_allocated: u16_at(13),
            bits_stored: u16_at(15),
            pixel_representation: u16_at(17),
        };
        let length = u64::from_le_bytes(header[19..27].try_into().expect("8 bytes"));
        if length > MAX_FRAME_BYTES {
            return Err(std::io::Error::other("frame too large"));
        }
        let mut compressed = vec![0u8; length as usize];
        input.read_exact(&mut compressed)?;
        let (status, body) = match decode_here(&spec, &compressed) {
            Ok(pixels) => (0u8, pixels),
            Err(message) => (1u8, message.into_bytes()),
        };
        output.write_all(&[status])?;
        output.write_all(&(body.len() as u64).to_le_bytes())?;
        output.write_all(&body)?;
        output.flush()?;
    }
}

#[cfg(not(feature = "gdcm"))]
fn decode_here(_spec: &FrameSpec, _compressed: &[u8]) -> Result<Vec<u8>, String> {
    Err("this build of panscreen leaves GDCM out (build with --features gdcm)".to_string())
}

#[cfg(feature = "gdcm")]
fn decode_here(spec: &FrameSpec, compressed: &[u8]) -> Result<Vec<u8>, String> {
    use gdcm_rs::GDCMTransferSyntax::*;
    let syntax = match spec.transfer_syntax {
        1 => JPEGExtendedProcess2_4,
        2 => JPEGLSLossless,
        3 => JPEGLSNearLossless,
        other => return Err(format!("unknown transfer syntax code {other}")),
    };
    gdcm_rs::decode_single_frame_compressed(
        compressed,
        spec.columns,
        spec.rows,
        gdcm_rs::GDCMPhotometricInterpretation::MONOCHROME2,
        syntax,
        1,
        spec.bits_allocated,
        spec.bits_stored,
        spec.bits_stored.saturating_sub(1),
        spec.pixel_representation,
    )
    .map(|pixels| pixels.data().to_vec())
    .map_err(|error| format!("GDCM: {error}"))
}

fn limit_memory() {
    let limit = libc::rlimit { rlim_cur: HELPER_MEMORY_LIMIT, rlim_max: HELPER_MEMORY_LIMIT };
    // SAFETY: setrlimit only reads the struct it is given.
    unsafe {
        libc::setrlimit(libc::RLIMIT_AS, &limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A helper that takes a frame and never answers (as GDCM looping on a corrupt
    /// stream would) is killed at the deadline, and says so.
    #[test]
    fn a_helper_that_hangs_is_killed_at_the_deadline() {
        let directory = tempfile::tempdir().unwrap();
        let program = directory.path().join("hanging-helper");
        std::fs::write(&program, "#!/bin/sh\nexec sleep 600\n").unwrap();
        let mut permissions = std::fs::metadata(&program).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        std::fs::set_permissions(&program, permissions).unwrap();
        let spec = FrameSpec {
            transfer_syntax: 2,
            rows: 4,
            columns: 4,
            bits_allocated: 16,
            bits_stored: 12,
            pixel_representation: 0,
        };
        // A fork elsewhere in this test process may briefly hold the new file open for
        // writing ("text file busy"): try again.
        let mut helper = (0..20)
            .find_map(|_| match Helper::start_program(&program) {
                Ok(helper) => Some(helper),
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    None
                }
            })
            .expect("the stand-in helper starts");
        let started = std::time::Instant::now();
        let (outcome, fired) =
            helper.decode_within(std::time::Duration::from_secs(1), &spec, &[0u8; 64]);
        assert!(fired, "{outcome:?}");
        assert!(outcome.is_err(), "a killed helper gives no answer");
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
        assert_eq!(helper.ending(), "it was killed (the memory cap, or the system)");
    }
}
