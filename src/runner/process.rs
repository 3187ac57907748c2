//! Supervising one child process: the only code in modrun that starts (through [`spawn`]) or
//! signals a process. One path for every caller (the service's runs and `execute_module`) and
//! every mode.
//!
//! Every child gets its own process group (so that the group can be signalled as a whole,
//! grandchildren included) and a parent-death signal (so that it never outlives a crashed
//! server). Both pipes are pumped concurrently with the wait. A stop (cancel or timeout) sends
//! SIGTERM to the group, waits `kill_grace`, then SIGKILL. When the leader has exited, whatever
//! is left of its group is killed, and the run ends only once those processes are dead, so that
//! no process outlives its run. Dropping the future of
//! [`run_process`] kills the whole group at once (SIGKILL) and leaves the reaping to a
//! background waiter (the spawner's reaper thread, or the blocking thread that waits in the
//! threaded and local modes).

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe::{Receiver as PipeReader, Sender as PipeWriter};
use tokio_util::sync::CancellationToken;

use super::spawn;
use crate::run::{Exit, RunMode, Stream};

/// Where a process's output goes, as raw byte chunks per pipe.
pub(crate) trait Sink: Send + Sync + 'static {
    /// Bytes read from a pipe.
    fn write(&self, stream: Stream, data: &[u8]);
    /// The pipe reached EOF.
    fn eof(&self, stream: Stream);
    /// False while the sink cannot take more for now: pipe readers pause (and so does the
    /// child, once the pipe buffer is full) until it can.
    fn has_room(&self) -> bool {
        true
    }
    /// The most line text the sink keeps (`None`: no limit). A driver that holds output back
    /// before handing it over (local mode) holds no more than about this much.
    fn keep_limit(&self) -> Option<u64> {
        None
    }
    /// Output that a driver held back had to be discarded past [`Sink::keep_limit`]: this
    /// many lines and bytes of text were not kept.
    fn discarded(&self, _lines: u64, _bytes: u64) {}
}

impl Sink for crate::output::OutputLog {
    fn write(&self, stream: Stream, data: &[u8]) {
        crate::output::OutputLog::write(self, stream, data);
    }
    fn eof(&self, stream: Stream) {
        self.finish_stream(stream);
    }
    fn has_room(&self) -> bool {
        crate::output::OutputLog::has_room(self)
    }
    fn keep_limit(&self) -> Option<u64> {
        Some(self.limits().max_run_bytes)
    }
    fn discarded(&self, lines: u64, bytes: u64) {
        self.count_dropped(lines, bytes);
    }
}

/// How often a paused pipe reader checks for room again.
const ROOM_POLL: Duration = Duration::from_millis(2);

/// What [`ProcEvents`] hooks return.
pub(crate) type EventFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Hooks called while a process runs.
pub(crate) trait ProcEvents: Send + Sync {
    /// The process started with this pid (also its process-group id).
    fn spawned(&self, pid: u32) -> EventFuture<'_>;
    /// A stop (cancel or timeout) has begun: SIGTERM was sent.
    fn stopping(&self) -> EventFuture<'_> {
        Box::pin(async {})
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct ProcSpec {
    /// Program as declared (bare name, relative or absolute path).
    pub program: OsString,
    /// Arguments after the program.
    pub args: Vec<OsString>,
    /// Working directory.
    pub cwd: PathBuf,
    /// `None`: inherit the parent's environment. `Some`: exactly these variables.
    pub env: Option<Vec<(OsString, OsString)>>,
    /// Bytes written to stdin, then closed; `None` for a null stdin.
    pub stdin: Option<Vec<u8>>,
}

/// How a process was stopped by modrun, if it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// The cancel token fired.
    Cancelled,
    /// The timeout expired.
    TimedOut,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcEnd {
    /// As the OS reported it.
    pub exit: Exit,
    /// Set when modrun stopped it.
    pub stopped: Option<Stopped>,
}

/// Why a process could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SpawnError {
    /// The program does not exist (or is not on PATH).
    #[error("cannot start `{program}`: {detail}")]
    NotFound {
        /// The program as resolved or declared.
        program: String,
        /// Why.
        detail: String,
    },
    /// The program is not executable or not readable.
    #[error("cannot start `{program}`: permission denied ({detail})")]
    PermissionDenied {
        /// The program.
        program: String,
        /// Why.
        detail: String,
    },
    /// Anything else the OS refused.
    #[error("cannot start `{program}`: {detail}")]
    Other {
        /// The program.
        program: String,
        /// The OS error.
        detail: String,
    },
}

/// Stop conditions for [`run_process`].
pub(crate) struct Supervision<'a> {
    /// Fires to cancel: TERM, grace, KILL.
    pub cancel: &'a CancellationToken,
    /// Stop after this long (TERM, grace, KILL).
    pub timeout: Option<Duration>,
    /// SIGTERM -> this long -> SIGKILL.
    pub kill_grace: Duration,
}

/// How long the pipes may stay open after the group was killed (a process that left the group
/// with `setsid` can hold them); then the output is cut off with a note.
const PIPE_DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long a run's end waits for the SIGKILLed rest of its process group to die (a process in
/// uninterruptible sleep dies only when its I/O returns).
const GROUP_EXIT_LIMIT: Duration = Duration::from_secs(2);

/// The system's limit on a child's argv and environment together (`sysconf(_SC_ARG_MAX)`), less
/// a page for what `execve` adds (the program's path, the auxiliary vector). Read once.
pub(crate) fn arg_max() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let raw = nix::unistd::sysconf(nix::unistd::SysconfVar::ARG_MAX)
            .ok()
            .flatten()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(128 * 1024);
        raw.saturating_sub(4096)
    })
}

/// Resolve the program as the child would: a name with a `/` is a path (relative to `cwd`), a
/// bare name is looked up on the child's `PATH`.
pub(crate) fn resolve_program(spec: &ProcSpec) -> Result<PathBuf, SpawnError> {
    let program = Path::new(&spec.program);
    let shown = program.display().to_string();
    if spec.program.is_empty() {
        return Err(SpawnError::NotFound {
            program: shown,
            detail: "empty program name".into(),
        });
    }
    let candidate = if program.as_os_str().as_encoded_bytes().contains(&b'/') {
        let p = spec.cwd.join(program);
        check_executable(&p)?;
        p
    } else {
        let path_var: Option<OsString> = match &spec.env {
            Some(env) => env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone()),
            None => std::env::var_os("PATH"),
        };
        let path_var = path_var.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let mut denied = None;
        let mut found = None;
        for dir in std::env::split_paths(&path_var) {
            let dir = if dir.is_relative() {
                spec.cwd.join(dir)
            } else {
                dir
            };
            let p = dir.join(program);
            match check_executable(&p) {
                Ok(()) => {
                    found = Some(p);
                    break;
                }
                Err(e @ SpawnError::PermissionDenied { .. }) => {
                    denied.get_or_insert(e);
                }
                Err(_) => {}
            }
        }
        match (found, denied) {
            (Some(p), _) => p,
            (None, Some(e)) => return Err(e),
            (None, None) => {
                return Err(SpawnError::NotFound {
                    program: shown,
                    detail: format!("not found on PATH ({})", path_var.to_string_lossy()),
                });
            }
        }
    };
    Ok(candidate)
}

/// Check that `p` is an existing regular file with an execute bit.
pub(crate) fn check_executable(p: &Path) -> Result<(), SpawnError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = p.display().to_string();
    match std::fs::metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SpawnError::NotFound {
            program: shown,
            detail: "no such file".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(SpawnError::PermissionDenied {
                program: shown,
                detail: e.to_string(),
            })
        }
        Err(e) => Err(SpawnError::Other {
            program: shown,
            detail: e.to_string(),
        }),
        Ok(m) if m.is_dir() => Err(SpawnError::PermissionDenied {
            program: shown,
            detail: "it is a directory".into(),
        }),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(SpawnError::PermissionDenied {
            program: shown,
            detail: "the file is not executable".into(),
        }),
        Ok(_) => Ok(()),
    }
}

fn spawn_error(program: &Path, e: &std::io::Error) -> SpawnError {
    let program = program.display().to_string();
    match e.kind() {
        std::io::ErrorKind::NotFound => SpawnError::NotFound {
            program,
            detail: format!("{e} (is its interpreter installed?)"),
        },
        std::io::ErrorKind::PermissionDenied => SpawnError::PermissionDenied {
            program,
            detail: e.to_string(),
        },
        _ => SpawnError::Other {
            program,
            detail: e.to_string(),
        },
    }
}

/// Shell-quote one word so that `sh` would read it back verbatim.
pub(crate) fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&c));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The command line of `spec`, shell-quoted.
pub(crate) fn command_line(spec: &ProcSpec) -> String {
    std::iter::once(&spec.program)
        .chain(&spec.args)
        .map(|w| shell_quote(&w.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Signal a whole process group; a group that is already gone is not an error. True when the
/// group had a member to signal (zombies count until they are reaped).
pub(crate) fn signal_group(pgid: u32, sig: Signal) -> bool {
    let Some(pgid) = group_pid(pgid) else {
        return false;
    };
    match killpg(pgid, sig) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => {
            tracing::warn!(pgid = pgid.as_raw(), signal = %sig, error = %e, "cannot signal process group");
            false
        }
    }
}

/// `pgid` as a group that modrun may signal: never 0 or 1 (ourselves, init).
fn group_pid(pgid: u32) -> Option<Pid> {
    i32::try_from(pgid)
        .ok()
        .filter(|raw| *raw > 1)
        .map(Pid::from_raw)
}

/// After the leader of group `pgid` exited: SIGKILL what is left of the group and wait until it
/// is really dead (gone, or zombies that only wait for their reaper), at most
/// [`GROUP_EXIT_LIMIT`], so that a run is never reported finished while a process of it still
/// runs. Free when the group is already empty (the usual case): one `killpg` that finds nobody.
async fn kill_rest(pgid: u32) {
    let Some(group) = group_pid(pgid) else { return };
    if !signal_group(pgid, Signal::SIGKILL) {
        return;
    }
    let deadline = tokio::time::Instant::now() + GROUP_EXIT_LIMIT;
    let mut pause = Duration::from_millis(1);
    loop {
        // Signal 0 probes: ESRCH once every member is reaped.
        if killpg(group, None) == Err(nix::errno::Errno::ESRCH) {
            return;
        }
        // Members left: dying, or zombies whose reaper (init, a subreaper) has not come yet.
        let live = tokio::task::spawn_blocking(move || group_has_live_member(pgid))
            .await
            .unwrap_or(false);
        if !live {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(pgid, "process group still alive after SIGKILL");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// True while a process of group `pgid` exists and is not a zombie. Blocking: scans `/proc`.
fn group_has_live_member(pgid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        let mut fields = stat_fields(&stat);
        let state = fields.next();
        let group = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
        group == Some(pgid) && is_live_state(state)
    })
}

/// The fields of a `/proc/PID/stat` after the ")" that closes the command name (which may hold
/// spaces and parentheses): state, ppid, pgrp, ...
fn stat_fields(stat: &str) -> impl Iterator<Item = &str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace())
        .into_iter()
        .flatten()
}

/// A process state from `/proc/PID/stat` that is still running code (not a zombie, not dead).
fn is_live_state(state: Option<&str>) -> bool {
    !matches!(state, Some("Z" | "X" | "x") | None)
}

/// After a crash: SIGKILL what is left of the lost runs `run_ids`: the processes that prove they
/// belong to one of them by its `MODRUN_RUN_ID` in their environment (PIDs and process groups
/// are reused; the marker is not, and it also finds processes that left the group). One scan of
/// `/proc` for all runs. Blocks until every signalled process has died (is gone or a zombie),
/// at most `limit`, so that start-up goes on only once they are really dead. Returns how many
/// processes were signalled per run, in the order of `run_ids`.
///
/// Blocking (reads `/proc`, sleeps while it waits): call it from a blocking thread.
pub(crate) fn kill_leftovers(run_ids: &[String], limit: Duration) -> Vec<usize> {
    let mut killed = vec![0; run_ids.len()];
    if run_ids.is_empty() {
        return killed;
    }
    let markers: Vec<Vec<u8>> = run_ids
        .iter()
        .map(|id| format!("{}={id}", super::RUN_MARKER).into_bytes())
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return killed;
    };
    let mut signalled = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let Some(run) = environ
            .split(|b| *b == 0)
            .find_map(|v| markers.iter().position(|m| v == m.as_slice()))
        else {
            continue;
        };
        if nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            killed[run] += 1;
            signalled.push(pid);
        }
    }
    let deadline = std::time::Instant::now() + limit;
    while !signalled.is_empty() && std::time::Instant::now() < deadline {
        signalled.retain(|pid| is_alive(*pid));
        if !signalled.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    if !signalled.is_empty() {
        tracing::warn!(pids = ?signalled, "leftover processes still alive after SIGKILL");
    }
    killed
}

/// True while `pid` exists and is not a zombie (a killed process whose parent has not reaped it
/// yet is dead for our purposes).
fn is_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    is_live_state(stat_fields(&stat).next())
}

/// SIGKILLs the group when dropped while armed: the safety net that makes dropping a running
/// [`run_process`] future leave no process behind.
struct GroupGuard {
    pgid: u32,
    armed: bool,
}

impl GroupGuard {
    fn new(pgid: u32) -> Self {
        Self { pgid, armed: true }
    }
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Run `spec` in `mode` to completion, feeding output to `sink`. Returns how it ended, or why it
/// could not start. `RunMode::DryRun` spawns nothing and writes the shell-quoted command line to
/// stdout.
pub(crate) async fn run_process(
    spec: &ProcSpec,
    mode: RunMode,
    sink: Arc<dyn Sink>,
    sup: Supervision<'_>,
    events: &dyn ProcEvents,
) -> Result<ProcEnd, SpawnError> {
    if mode == RunMode::DryRun {
        let line = command_line(spec);
        tracing::info!(command = %line, "dry run: nothing spawned");
        sink.write(Stream::Stdout, format!("{line}\n").as_bytes());
        sink.eof(Stream::Stdout);
        sink.eof(Stream::Stderr);
        return Ok(ProcEnd {
            exit: Exit::Code(0),
            stopped: None,
        });
    }
    let program = resolve_program(spec)?;
    let child = spawn::spawn(&program, spec).map_err(|e| spawn_error(&program, &e))?;
    let pid = child.pid;
    // Kills the group if this future is dropped before the run is over (the child itself
    // does the same when dropped unreaped; the threaded mode's wait thread holds it, though).
    let mut guard = GroupGuard::new(pid);
    events.spawned(pid).await;
    let result = match mode.resolve() {
        RunMode::Threaded => drive_threaded(child, spec, &sink, &sup, events).await,
        RunMode::Local => drive_local(child, spec, &sink, &sup, events).await,
        _ => drive_async(child, spec, &sink, &sup, events).await,
    };
    guard.disarm();
    let (status, stopped) = result.map_err(|e| spawn_error(&program, &e))?;
    Ok(ProcEnd {
        exit: Exit::from_status(status),
        stopped,
    })
}

/// How a driver's wait ended: the OS status, and whether modrun stopped the process.
type Waited = std::io::Result<(std::process::ExitStatus, Option<Stopped>)>;

/// Wait for `exit` while honouring cancel and timeout; on a stop, TERM the group, wait the grace,
/// KILL it, and wait for `exit` again.
async fn supervise<F>(pgid: u32, exit: F, sup: &Supervision<'_>, events: &dyn ProcEvents) -> Waited
where
    F: std::future::Future<Output = std::io::Result<std::process::ExitStatus>>,
{
    tokio::pin!(exit);
    let stopped = tokio::select! {
        status = &mut exit => return status.map(|s| (s, None)),
        () = sup.cancel.cancelled() => Stopped::Cancelled,
        () = sleep_or_forever(sup.timeout) => Stopped::TimedOut,
    };
    let _ = signal_group(pgid, Signal::SIGTERM);
    events.stopping().await;
    tokio::select! {
        status = &mut exit => return status.map(|s| (s, Some(stopped))),
        () = tokio::time::sleep(sup.kill_grace) => {}
    }
    let _ = signal_group(pgid, Signal::SIGKILL);
    exit.await.map(|s| (s, Some(stopped)))
}

/// After the leader exited: kill what is left of its group so the pipes close, then wait for
/// the pumps, at most [`PIPE_DRAIN_LIMIT`], and for the group to be dead.
async fn finish_pumps<P: std::future::Future<Output = ()>>(pgid: u32, pumps: P, sink: &dyn Sink) {
    let pumped = tokio::join!(
        tokio::time::timeout(PIPE_DRAIN_LIMIT, pumps),
        kill_rest(pgid)
    )
    .0;
    if pumped.is_err() {
        sink.write(
            Stream::Stderr,
            b"\n[modrun] output pipes stayed open after the process group was killed (a process left the group); output cut off\n",
        );
        sink.eof(Stream::Stderr);
    }
}

async fn pump<R: AsyncRead + Unpin>(mut r: R, stream: Stream, sink: &dyn Sink) {
    // Reused read buffer (reads go into its spare capacity: nothing to zero per run).
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        while !sink.has_room() {
            tokio::time::sleep(ROOM_POLL).await;
        }
        buf.clear();
        match r.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => sink.write(stream, &buf),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(stream = stream.as_str(), error = %e, "pipe read failed");
                break;
            }
        }
    }
    sink.eof(stream);
}

/// Pipes pumped by async tasks of this future; exit awaited through a pidfd.
async fn drive_async(
    mut child: spawn::Child,
    spec: &ProcSpec,
    sink: &Arc<dyn Sink>,
    sup: &Supervision<'_>,
    events: &dyn ProcEvents,
) -> Waited {
    let pid = child.pid;
    let open =
        |fd: Option<std::os::fd::OwnedFd>| fd.and_then(|fd| PipeReader::from_owned_fd(fd).ok());
    let stdout = open(child.stdout.take());
    let stderr = open(child.stderr.take());
    let stdin = child
        .stdin
        .take()
        .and_then(|fd| PipeWriter::from_owned_fd(fd).ok());
    let input = spec.stdin.clone();
    let pumps = async {
        let feed = async move {
            if let (Some(mut w), Some(data)) = (stdin, input) {
                // A child that exits without reading its stdin gives EPIPE: not an error here.
                let _ = w.write_all(&data).await;
            }
        };
        let out = async {
            if let Some(o) = stdout {
                pump(o, Stream::Stdout, &**sink).await;
            }
        };
        let err = async {
            if let Some(e) = stderr {
                pump(e, Stream::Stderr, &**sink).await;
            }
        };
        tokio::join!(feed, out, err);
    };
    tokio::pin!(pumps);
    let waiting = supervise(pid, child.wait(), sup, events);
    tokio::pin!(waiting);
    let mut pumps_done = false;
    let result = loop {
        tokio::select! {
            r = &mut waiting => break r,
            () = &mut pumps, if !pumps_done => pumps_done = true,
        }
    };
    if pumps_done {
        kill_rest(pid).await;
    } else {
        finish_pumps(pid, &mut pumps, &**sink).await;
    }
    result
}

fn blocking_pump(r: impl Read + Send + 'static, stream: Stream, sink: Arc<dyn Sink>) {
    let mut r = r;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while !sink.has_room() {
            std::thread::sleep(ROOM_POLL);
        }
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => sink.write(stream, &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    sink.eof(stream);
}

fn write_all_blocking(fd: std::os::fd::OwnedFd, data: &[u8]) {
    use std::io::Write;
    // A child that exits without reading its stdin gives EPIPE: not an error here.
    let _ = std::fs::File::from(fd).write_all(data);
}

/// Pipes read on blocking threads; exit awaited on a blocking thread that owns the child.
async fn drive_threaded(
    mut child: spawn::Child,
    spec: &ProcSpec,
    sink: &Arc<dyn Sink>,
    sup: &Supervision<'_>,
    events: &dyn ProcEvents,
) -> Waited {
    let pid = child.pid;
    let mut pumps = Vec::new();
    for (fd, stream) in [
        (child.stdout.take(), Stream::Stdout),
        (child.stderr.take(), Stream::Stderr),
    ] {
        if let Some(fd) = fd {
            let s = sink.clone();
            pumps.push(tokio::task::spawn_blocking(move || {
                blocking_pump(std::fs::File::from(fd), stream, s)
            }));
        }
    }
    if let (Some(fd), Some(data)) = (child.stdin.take(), spec.stdin.clone()) {
        pumps.push(tokio::task::spawn_blocking(move || {
            write_all_blocking(fd, &data)
        }));
    }
    // The blocking wait owns the child: if this future is dropped, the guard kills the group and
    // that thread still reaps the child.
    let wait = tokio::task::spawn_blocking(move || child.wait_blocking());
    let exit = async {
        match wait.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    };
    let result = supervise(pid, exit, sup, events).await;
    let all_pumps = async {
        for p in pumps {
            let _ = p.await;
        }
    };
    finish_pumps(pid, all_pumps, &**sink).await;
    result
}

/// A local-mode child's output, held until the process has ended, then handed over (as
/// `communicate()` does). Bounded: past the sink's [`Sink::keep_limit`] (plus one read) bytes
/// are counted, not kept, so memory never grows with the output size; with no limit (the
/// library's `execute_module`, whose contract is the whole output) everything is kept.
struct Collected {
    limit: Option<u64>,
    /// The buffers and counters. A std mutex: each section appends one read or takes a buffer.
    inner: std::sync::Mutex<CollectedInner>,
}

#[derive(Default)]
struct CollectedInner {
    out: [Vec<u8>; 2],
    /// Text bytes held (line breaks not counted, as the sink counts them).
    text: u64,
    /// Set once a read did not fit: everything after it is counted only.
    full: bool,
    dropped_lines: u64,
    dropped_bytes: u64,
}

/// Bytes of one pipe read: what `Collected` may go past its limit by.
const READ_BYTES: u64 = 64 * 1024;

impl Collected {
    fn new(limit: Option<u64>) -> Self {
        Self {
            limit,
            inner: std::sync::Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CollectedInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hand everything to `sink` on the calling (blocking) thread, a read's worth at a time,
    /// pausing while the sink has no room: stdout, then stderr, then both ends of file, then
    /// what was not kept.
    fn deliver(&self, sink: &dyn Sink) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let data = std::mem::take(&mut self.lock().out[stream_index(stream)]);
            for piece in data.chunks(READ_BYTES as usize) {
                while !sink.has_room() {
                    std::thread::sleep(ROOM_POLL);
                }
                sink.write(stream, piece);
            }
        }
        sink.eof(Stream::Stdout);
        sink.eof(Stream::Stderr);
        let (lines, bytes) = {
            let inner = self.lock();
            (inner.dropped_lines, inner.dropped_bytes)
        };
        if lines > 0 || bytes > 0 {
            sink.discarded(lines, bytes);
        }
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl Sink for Collected {
    fn write(&self, stream: Stream, data: &[u8]) {
        let breaks = memchr::memchr_iter(b'\n', data).count() as u64;
        let text = data.len() as u64 - breaks;
        let mut inner = self.lock();
        if !inner.full
            && self
                .limit
                .is_none_or(|limit| inner.text + text <= limit + READ_BYTES)
        {
            inner.text += text;
            inner.out[stream_index(stream)].extend_from_slice(data);
            return;
        }
        inner.full = true;
        inner.dropped_lines += breaks;
        inner.dropped_bytes += text;
    }
    fn eof(&self, _stream: Stream) {}
}

/// The threaded driver with the output collected and delivered when the process has ended
/// (on a blocking thread: splitting it into lines is no work for an async thread).
async fn drive_local(
    child: spawn::Child,
    spec: &ProcSpec,
    sink: &Arc<dyn Sink>,
    sup: &Supervision<'_>,
    events: &dyn ProcEvents,
) -> Waited {
    let collected = Arc::new(Collected::new(sink.keep_limit()));
    let into: Arc<dyn Sink> = collected.clone();
    let result = drive_threaded(child, spec, &into, sup, events).await;
    let to = sink.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || collected.deliver(&*to)).await {
        tracing::warn!(error = %e, "delivering the output failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_skip_a_command_name_with_parentheses_and_spaces() {
        let stat = "4242 (evil) Z 1 2) S 4200 4242 4200 0 -1";
        let fields: Vec<&str> = stat_fields(stat).take(3).collect();
        assert_eq!(fields, ["S", "4200", "4242"]);
        assert!(is_live_state(Some("S")));
        assert!(!is_live_state(Some("Z")));
        assert!(!is_live_state(None));
    }

    #[test]
    fn shell_quoting_round_trips() {
        assert_eq!(shell_quote("abc-1.txt"), "abc-1.txt");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn bare_names_are_found_on_the_childs_path() {
        let spec = ProcSpec {
            program: "sh".into(),
            args: vec![],
            cwd: "/".into(),
            env: Some(vec![("PATH".into(), "/nonexistent:/bin:/usr/bin".into())]),
            stdin: None,
        };
        assert!(resolve_program(&spec).unwrap().ends_with("sh"));
        let missing = ProcSpec {
            program: "no-such-program-xyz".into(),
            ..spec.clone()
        };
        let err = resolve_program(&missing).unwrap_err();
        assert!(matches!(err, SpawnError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("not found on PATH"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain.txt");
        std::fs::write(&file, "not a program").unwrap();
        let not_exec = ProcSpec {
            program: file.into_os_string(),
            ..spec
        };
        let err = resolve_program(&not_exec).unwrap_err();
        assert!(matches!(err, SpawnError::PermissionDenied { .. }), "{err}");
    }
}
