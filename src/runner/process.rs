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
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe::{Receiver as PipeReader, Sender as PipeWriter};
use tokio_util::sync::CancellationToken;

use super::jail::{self, Jail};
use super::program::{SpawnError, command_line, program_to_spawn, spawn_error};
use super::spawn::{self, Setup, Step};
use crate::module::Limits;
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
    /// The run's id: its processes are held by a cgroup or found by their marker (see
    /// `jail`); `None` (one-shot runs) holds them by process group only.
    pub run_id: Option<String>,
    /// Resource limits set in the child.
    pub limits: Limits,
    /// (gid, uid) the child switches to.
    pub creds: Option<(u32, u32)>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcEnd {
    /// As the OS reported it.
    pub exit: Exit,
    /// Set when modrun stopped it.
    pub stopped: Option<Stopped>,
    /// The resource limit it ran into, when that is what ended it (`cpu (60s)`).
    pub limit: Option<String>,
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

/// How long the asynchronous driver waits for a child's pipes to close before it also waits
/// for the child's exit through a pidfd (see `Driver::asynchronous`).
const PIDFD_AFTER: Duration = Duration::from_millis(20);

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
        // The command line goes to the run's output (where secrets are masked), not the log.
        let line = command_line(spec);
        tracing::info!("dry run: nothing spawned");
        sink.write(Stream::Stdout, format!("{line}\n").as_bytes());
        sink.eof(Stream::Stdout);
        sink.eof(Stream::Stderr);
        return Ok(ProcEnd {
            exit: Exit::Code(0),
            stopped: None,
            limit: None,
        });
    }
    let program = program_to_spawn(spec)?;
    let mut jail = Jail::for_run(spec.run_id.as_deref());
    let mut setup = Setup {
        cgroup: None,
        rlimits: jail::rlimits(&spec.limits),
        creds: spec.creds,
    };
    let child = loop {
        setup.cgroup = jail.cgroup_fds();
        match spawn::spawn(&program, spec, &setup) {
            Ok(child) => break child,
            Err(f) if f.step == Step::Cgroup && setup.cgroup.is_some() => {
                // No cgroup after all: this run (and the next ones) without one.
                jail = jail.join_failed(spec.run_id.as_deref(), &f.error);
            }
            Err(f) => return Err(spawn_error(&program, &f.error, f.step)),
        }
    };
    let pid = child.pid;
    // Kills the run if this future is dropped before the run is over (the child itself
    // does the same when dropped unreaped; the threaded mode's wait thread holds it, though).
    let mut guard = KillGuard {
        jail: &jail,
        pgid: pid,
        armed: true,
    };
    events.spawned(pid).await;
    let run = Driver {
        spec,
        sink: &sink,
        sup: &sup,
        events,
        jail: &jail,
    };
    let result = match mode.resolve() {
        RunMode::Threaded => run.threaded(child).await,
        RunMode::Local => run.local(child).await,
        _ => run.asynchronous(child).await,
    };
    guard.armed = false;
    let (status, stopped) = result.map_err(|e| spawn_error(&program, &e, Step::Exec))?;
    let exit = Exit::from_status(status);
    let limit = match stopped {
        None => jail.limit_hit(exit, &spec.limits),
        Some(_) => None,
    };
    Ok(ProcEnd {
        exit,
        stopped,
        limit,
    })
}

/// SIGKILLs the whole run when dropped while armed: the safety net that makes dropping a
/// running [`run_process`] future leave no process behind.
struct KillGuard<'a> {
    jail: &'a Jail,
    pgid: u32,
    armed: bool,
}

impl Drop for KillGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.jail.kill_now(self.pgid);
        }
    }
}

/// What a driver works with.
struct Driver<'a> {
    spec: &'a ProcSpec,
    sink: &'a Arc<dyn Sink>,
    sup: &'a Supervision<'a>,
    events: &'a dyn ProcEvents,
    jail: &'a Jail,
}

/// How a driver's wait ended: the OS status, and whether modrun stopped the process.
type Waited = std::io::Result<(std::process::ExitStatus, Option<Stopped>)>;

impl Driver<'_> {
    /// Wait for `exit` while honouring cancel and timeout; on a stop, TERM the run (its group
    /// and its cgroup), wait the grace, KILL it, and wait for `exit` again.
    async fn supervise<F>(&self, pgid: u32, exit: F) -> Waited
    where
        F: std::future::Future<Output = std::io::Result<std::process::ExitStatus>>,
    {
        let sup = self.sup;
        tokio::pin!(exit);
        let stopped = tokio::select! {
            status = &mut exit => return status.map(|s| (s, None)),
            () = sup.cancel.cancelled() => Stopped::Cancelled,
            () = sleep_or_forever(sup.timeout) => Stopped::TimedOut,
        };
        self.jail.signal(pgid, Signal::SIGTERM);
        self.events.stopping().await;
        tokio::select! {
            status = &mut exit => return status.map(|s| (s, Some(stopped))),
            () = tokio::time::sleep(sup.kill_grace) => {}
        }
        self.jail.signal(pgid, Signal::SIGKILL);
        exit.await.map(|s| (s, Some(stopped)))
    }

    /// After the leader exited: kill what is left of the run so the pipes close, then wait for
    /// the pumps, at most [`PIPE_DRAIN_LIMIT`], and for the run's processes to be dead.
    async fn finish_pumps<P: std::future::Future<Output = ()>>(&self, pgid: u32, pumps: P) {
        let sink = &**self.sink;
        let pumped = tokio::join!(
            tokio::time::timeout(PIPE_DRAIN_LIMIT, pumps),
            self.jail.finish(pgid)
        )
        .0;
        if pumped.is_err() {
            sink.write(
                Stream::Stderr,
                b"\n[modrun] output pipes stayed open after the run's processes were killed; output cut off\n",
            );
            sink.eof(Stream::Stderr);
        }
    }

    /// Pipes pumped by async tasks of this future; the exit taken when they close, or awaited
    /// through a pidfd.
    async fn asynchronous(&self, mut child: spawn::Child) -> Waited {
        let sink = self.sink;
        let pid = child.pid;
        // Our ends of the pipes that `spawn` made (so no need for tokio's checks of what they
        // are: three calls each), made non-blocking for the reactor.
        let open = |fd: Option<OwnedFd>| {
            fd.filter(|fd| spawn::set_nonblocking(fd).is_ok())
                .and_then(|fd| PipeReader::from_owned_fd_unchecked(fd).ok())
        };
        let stdout = open(child.stdout.take());
        let stderr = open(child.stderr.take());
        let stdin = child
            .stdin
            .take()
            .filter(|fd| spawn::set_nonblocking(fd).is_ok())
            .and_then(|fd| PipeWriter::from_owned_fd_unchecked(fd).ok());
        let input = self.spec.stdin.clone();
        let pumps = async {
            let feed = async move {
                if let (Some(mut w), Some(data)) = (stdin, input) {
                    // A child that exits without reading its stdin gives EPIPE: not an error.
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
        let pumps_done = AtomicBool::new(false);
        let exit = async {
            // Most children end by exiting, which closes their pipes: once the pumps are done
            // the status is there to take, and no pidfd is needed (its open, two registrations
            // with the reactor and its close are a run's largest share of those calls). A child
            // that is still running after `PIDFD_AFTER`, or whose pipes closed before it ended,
            // is waited for through a pidfd.
            let closed = tokio::select! {
                () = &mut pumps => true,
                () = tokio::time::sleep(PIDFD_AFTER) => false,
            };
            if closed {
                pumps_done.store(true, Ordering::Relaxed);
                // The pipes close a moment before the exited child can be reaped: one turn of
                // the scheduler is usually enough for that moment to pass.
                for _ in 0..2 {
                    if let Some(status) = child.try_reap()? {
                        return Ok(status);
                    }
                    tokio::task::yield_now().await;
                }
            }
            let wait = child.wait();
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    r = &mut wait => return r,
                    () = &mut pumps, if !pumps_done.load(Ordering::Relaxed) => {
                        pumps_done.store(true, Ordering::Relaxed);
                    }
                }
            }
        };
        let result = self.supervise(pid, exit).await;
        if pumps_done.load(Ordering::Relaxed) {
            self.jail.finish(pid).await;
        } else {
            self.finish_pumps(pid, &mut pumps).await;
        }
        result
    }

    /// Pipes read on blocking threads; exit awaited on a blocking thread that owns the child.
    async fn threaded(&self, mut child: spawn::Child) -> Waited {
        let pid = child.pid;
        let mut pumps = Vec::new();
        for (fd, stream) in [
            (child.stdout.take(), Stream::Stdout),
            (child.stderr.take(), Stream::Stderr),
        ] {
            if let Some(fd) = fd {
                let s = self.sink.clone();
                pumps.push(tokio::task::spawn_blocking(move || {
                    blocking_pump(std::fs::File::from(fd), stream, s)
                }));
            }
        }
        if let (Some(fd), Some(data)) = (child.stdin.take(), self.spec.stdin.clone()) {
            pumps.push(tokio::task::spawn_blocking(move || {
                write_all_blocking(fd, &data)
            }));
        }
        // The blocking wait owns the child: if this future is dropped, the guard kills the run
        // and that thread still reaps the child.
        let wait = tokio::task::spawn_blocking(move || child.wait_blocking());
        let exit = async {
            match wait.await {
                Ok(r) => r,
                Err(e) => Err(std::io::Error::other(e)),
            }
        };
        let result = self.supervise(pid, exit).await;
        let all_pumps = async {
            for p in pumps {
                let _ = p.await;
            }
        };
        self.finish_pumps(pid, all_pumps).await;
        result
    }

    /// The threaded driver with the output collected and delivered when the process has
    /// ended (on a blocking thread: splitting it into lines is no work for an async thread).
    async fn local(&self, child: spawn::Child) -> Waited {
        let collected = Arc::new(Collected::new(self.sink.keep_limit()));
        let into: Arc<dyn Sink> = collected.clone();
        let threaded = Driver {
            sink: &into,
            ..*self
        };
        let result = threaded.threaded(child).await;
        let to = self.sink.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || collected.deliver(&*to)).await {
            tracing::warn!(error = %e, "delivering the output failed");
        }
        result
    }
}

/// The first read of a pipe goes into this much of the stack.
const FIRST_READ: usize = 4096;
/// The read buffer of a pipe that gave more than [`FIRST_READ`] at once.
const READ_BUFFER: usize = 64 * 1024;

async fn pump(mut r: PipeReader, stream: Stream, sink: &dyn Sink) {
    // Most runs write little: the read buffer is allocated only when a first small read (on the
    // stack) came back full. (A 64 KiB block per pipe per run, allocated and freed, also cost
    // glibc a consolidation of its free lists at each free.) Reads go into the buffer's spare
    // capacity: nothing to zero.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        while !sink.has_room() {
            tokio::time::sleep(ROOM_POLL).await;
        }
        let read = if buf.capacity() == 0 {
            match r.readable().await {
                Ok(()) => {
                    let mut first = [0u8; FIRST_READ];
                    r.try_read(&mut first).inspect(|&n| {
                        if n > 0 {
                            sink.write(stream, &first[..n]);
                        }
                        if n == FIRST_READ {
                            buf.reserve_exact(READ_BUFFER);
                        }
                    })
                }
                Err(e) => Err(e),
            }
        } else {
            buf.clear();
            r.read_buf(&mut buf).await.inspect(|&n| {
                if n > 0 {
                    sink.write(stream, &buf);
                }
            })
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => {
                tracing::warn!(stream = stream.as_str(), error = %e, "pipe read failed");
                break;
            }
        }
    }
    sink.eof(stream);
}

fn blocking_pump(r: impl Read + Send + 'static, stream: Stream, sink: Arc<dyn Sink>) {
    let mut r = r;
    let mut buf = vec![0u8; READ_BUFFER];
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
