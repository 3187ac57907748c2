//! `execute_module`: run one script to completion and collect its output, on the same spawn and
//! supervision code as the service's runs.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::process::{self, ProcEvents, ProcSpec, Sink, Supervision};
use super::program::{SpawnError, SpawnReason, command_line};
use crate::run::{RunMode, Stream};

const TARGET: &str = "modrun::execute";

/// What a finished script produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModuleOutput {
    /// The exit code; negative for a death by signal (`-9` for SIGKILL). `0` for a dry run.
    pub exit_code: i32,
    /// Everything written to stdout, decoded lossily.
    pub stdout: String,
    /// Everything written to stderr, decoded lossily.
    pub stderr: String,
}

impl ModuleOutput {
    /// True when the exit code is 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

impl From<ModuleOutput> for (i32, String, String) {
    fn from(o: ModuleOutput) -> Self {
        (o.exit_code, o.stdout, o.stderr)
    }
}

/// Why a script could not be run. Every message names the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// The script does not exist.
    #[error("script not found: {}", path.display())]
    NotFound {
        /// The script.
        path: PathBuf,
    },
    /// The script (or its folder) is not readable, or not executable where it must be.
    #[error("permission denied: {} ({detail})", path.display())]
    PermissionDenied {
        /// The script.
        path: PathBuf,
        /// What was refused.
        detail: String,
    },
    /// Anything else the OS refused, such as a missing interpreter or working directory.
    #[error("cannot run {}: {detail}", path.display())]
    Spawn {
        /// The script.
        path: PathBuf,
        /// The OS's reason.
        detail: String,
    },
}

/// Collects both pipes in memory, logging each line at DEBUG when that level is on.
#[derive(Default)]
struct Collect {
    /// One buffer per stream; each has a single writer, so the locks are uncontended.
    out: [Mutex<Vec<u8>>; 2],
    /// Unfinished line per stream, only used when DEBUG logging is on.
    partial: [Mutex<Vec<u8>>; 2],
}

fn idx(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl Sink for Collect {
    fn write(&self, stream: Stream, data: &[u8]) {
        self.out[idx(stream)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(data);
        if tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
            let mut partial = self.partial[idx(stream)]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            partial.extend_from_slice(data);
            let mut start = 0;
            while let Some(i) = memchr::memchr(b'\n', &partial[start..]) {
                let line = String::from_utf8_lossy(&partial[start..start + i]);
                tracing::debug!(target: TARGET, stream = stream.as_str(), "{line}");
                start += i + 1;
            }
            partial.drain(..start);
        }
    }

    fn eof(&self, stream: Stream) {
        let mut partial = self.partial[idx(stream)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !partial.is_empty() {
            let line = String::from_utf8_lossy(&partial);
            tracing::debug!(target: TARGET, stream = stream.as_str(), "{line}");
            partial.clear();
        }
    }
}

impl Collect {
    fn take(&self, stream: Stream) -> String {
        let bytes = std::mem::take(
            &mut *self.out[idx(stream)]
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

struct LogPid;
impl ProcEvents for LogPid {
    fn spawned(&self, pid: u32) -> process::EventFuture<'_> {
        tracing::debug!(target: TARGET, pid, "process started");
        Box::pin(async {})
    }
}

/// Run a script once and collect its exit code, stdout and stderr.
///
/// - A script whose name ends in `.py` runs under the interpreter named by `MODRUN_PYTHON`
///   (read at each call; default `python3`); anything else is executed directly (its shebang is
///   honoured). No shell is involved.
/// - A relative `script_path` is taken relative to the current directory of the calling
///   process; the child runs in `cwd` and inherits the caller's environment; stdin is null.
/// - Both pipes are drained concurrently; output is decoded lossily.
/// - **Cancellation by drop**: if the returned future is dropped before it completes (task
///   aborted, `tokio::time::timeout`, a lost `select!`), the child's whole process group gets
///   SIGKILL at once and is reaped in the background: nothing is left behind.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), modrun::ExecError> {
/// use modrun::{execute_module, RunMode};
///
/// let out = execute_module("/bin/echo", ["hello", "world"], "/", RunMode::default()).await?;
/// assert_eq!(out.exit_code, 0);
/// assert_eq!(out.stdout, "hello world\n");
///
/// let (code, stdout, _stderr): (i32, String, String) =
///     execute_module("/bin/sh", ["-c", "exit 3"], "/", RunMode::Threaded).await?.into();
/// assert_eq!((code, stdout.as_str()), (3, ""));
/// # Ok(()) }
/// ```
pub async fn execute_module<P, I, S, C>(
    script_path: P,
    args: I,
    cwd: C,
    mode: RunMode,
) -> Result<ModuleOutput, ExecError>
where
    P: AsRef<Path>,
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
    C: AsRef<Path>,
{
    let script = std::path::absolute(script_path.as_ref())
        .unwrap_or_else(|_| script_path.as_ref().to_path_buf());
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let cwd = cwd.as_ref().to_path_buf();
    let is_python = script.extension().is_some_and(|e| e == "py");
    let (program, argv) = if is_python {
        let python = std::env::var_os("MODRUN_PYTHON").unwrap_or_else(|| "python3".into());
        let mut argv = vec![script.clone().into_os_string()];
        argv.extend(args);
        (python, argv)
    } else {
        (script.clone().into_os_string(), args)
    };
    let spec = ProcSpec {
        program,
        args: argv,
        cwd,
        env: None,
        stdin: None,
        run_id: None,
        limits: Default::default(),
        creds: None,
    };
    let mode = mode.resolve();
    tracing::info!(target: TARGET, script = %script.display(), %mode, "executing module");
    tracing::debug!(target: TARGET, command = %command_line(&spec), cwd = %spec.cwd.display(), "command line");

    if mode != RunMode::DryRun {
        check_script(&script, is_python).inspect_err(|e| {
            tracing::error!(target: TARGET, error = %e, "cannot execute module");
        })?;
    }
    let sink = Arc::new(Collect::default());
    // Never cancelled: explicit stops belong to the ModuleRunner; here, dropping the future is
    // the way to stop the child.
    let never = CancellationToken::new();
    let sup = Supervision {
        cancel: &never,
        timeout: None,
        kill_grace: Duration::ZERO,
    };
    let started = std::time::Instant::now();
    let result = process::run_process(&spec, mode, sink.clone(), sup, &LogPid).await;
    let end = result
        .map_err(|e| to_exec_error(&script, &spec, e))
        .inspect_err(|e| tracing::error!(target: TARGET, error = %e, "cannot execute module"))?;
    let output = ModuleOutput {
        exit_code: end.exit.code_or_negative_signal(),
        stdout: sink.take(Stream::Stdout),
        stderr: sink.take(Stream::Stderr),
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if output.exit_code == 0 {
        tracing::info!(target: TARGET, script = %script.display(), exit_code = 0, elapsed_ms, "module completed");
    } else {
        tracing::warn!(target: TARGET, script = %script.display(), exit_code = output.exit_code, elapsed_ms, "module exited with a non-zero code");
    }
    Ok(output)
}

/// Checks made before spawning, for errors that name the script rather than the interpreter.
fn check_script(script: &Path, is_python: bool) -> Result<(), ExecError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(script).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ExecError::NotFound {
            path: script.to_owned(),
        },
        std::io::ErrorKind::PermissionDenied => ExecError::PermissionDenied {
            path: script.to_owned(),
            detail: e.to_string(),
        },
        _ => ExecError::Spawn {
            path: script.to_owned(),
            detail: e.to_string(),
        },
    })?;
    if meta.is_dir() {
        return Err(ExecError::PermissionDenied {
            path: script.to_owned(),
            detail: "it is a directory".into(),
        });
    }
    if is_python {
        // The interpreter must be able to read it.
        std::fs::File::open(script).map_err(|e| ExecError::PermissionDenied {
            path: script.to_owned(),
            detail: format!("not readable: {e}"),
        })?;
    } else if meta.permissions().mode() & 0o111 == 0 {
        return Err(ExecError::PermissionDenied {
            path: script.to_owned(),
            detail: "the file is not executable".into(),
        });
    }
    Ok(())
}

fn to_exec_error(script: &Path, spec: &ProcSpec, e: SpawnError) -> ExecError {
    let interpreter = Path::new(&spec.program) != script;
    let SpawnError { program, reason } = e;
    match reason {
        r @ (SpawnReason::NotOnPath { .. } | SpawnReason::NoSuchFile) if interpreter => {
            ExecError::Spawn {
                path: script.to_owned(),
                detail: format!("interpreter `{program}` {r}"),
            }
        }
        SpawnReason::NotOnPath { .. } | SpawnReason::NoSuchFile | SpawnReason::NoInterpreter(_)
            if !script.exists() =>
        {
            ExecError::NotFound {
                path: script.to_owned(),
            }
        }
        r @ (SpawnReason::NotOnPath { .. }
        | SpawnReason::NoSuchFile
        | SpawnReason::NoInterpreter(_)) => ExecError::Spawn {
            path: script.to_owned(),
            detail: format!("its interpreter could not be started: {r}"),
        },
        SpawnReason::PermissionDenied(detail) if !interpreter => ExecError::PermissionDenied {
            path: script.to_owned(),
            detail,
        },
        r @ (SpawnReason::PermissionDenied(_) | SpawnReason::Os(_)) => ExecError::Spawn {
            path: script.to_owned(),
            detail: format!("{program}: {r}"),
        },
    }
}
