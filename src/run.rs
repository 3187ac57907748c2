//! Domain types of a run, free of I/O: identifiers, run modes, output lines, the run's state
//! machine and how it ended.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifier of a run: a UUID v7, so that ids sort in creation order (within one process the
/// `uuid` crate guarantees monotonic ids even inside one millisecond).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(Uuid);

impl RunId {
    /// A new id, later than every id this process made before.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// From the 16 bytes of a UUID.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Uuid::from_slice(bytes).ok().map(Self)
    }

    /// The UUID inside.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for RunId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// How a run's process is spawned and supervised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunMode {
    /// Pick the best mode for the platform: [`RunMode::Async`] on Unix.
    #[default]
    Auto,
    /// `tokio::process`, pipes read by async tasks.
    Async,
    /// `std::process`, pipes read on blocking threads.
    Threaded,
    /// `std::process` on blocking threads; the output is collected and delivered when the process
    /// ends (for debugging).
    Local,
    /// Nothing is spawned: the command line that would run is reported as the output.
    DryRun,
}

impl RunMode {
    /// All modes, in documentation order.
    pub const ALL: [RunMode; 5] = [
        RunMode::Auto,
        RunMode::Async,
        RunMode::Threaded,
        RunMode::Local,
        RunMode::DryRun,
    ];

    /// The wire name (`auto`, `async`, `threaded`, `local`, `dry_run`).
    pub fn as_str(&self) -> &'static str {
        match self {
            RunMode::Auto => "auto",
            RunMode::Async => "async",
            RunMode::Threaded => "threaded",
            RunMode::Local => "local",
            RunMode::DryRun => "dry_run",
        }
    }

    /// The concrete mode `self` stands for on this platform (`Auto` becomes `Async`).
    pub fn resolve(self) -> RunMode {
        match self {
            RunMode::Auto => RunMode::Async,
            other => other,
        }
    }
}

impl fmt::Display for RunMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The error of parsing an unknown run mode name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown run mode `{0}` (expected one of auto, async, threaded, local, dry_run)")]
pub struct UnknownRunMode(pub String);

impl FromStr for RunMode {
    type Err = UnknownRunMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownRunMode(s.to_owned()))
    }
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// The child's standard output.
    Stdout,
    /// The child's standard error.
    Stderr,
}

impl Stream {
    /// `stdout` or `stderr`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One captured output line. `seq` is per run, from 1, contiguous across both streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Position in the run's output, from 1.
    pub seq: u64,
    /// The pipe it came from.
    pub stream: Stream,
    /// When it was captured.
    pub ts: SystemTime,
    /// The text, without its line ending; invalid UTF-8 replaced by U+FFFD.
    pub text: Text,
    /// The line's bytes as the program wrote them, kept only when they are not valid UTF-8
    /// (then `text` is their lossy decoding); `None` means `text` is the bytes.
    pub raw: Option<Arc<[u8]>>,
}

impl Line {
    /// The line's bytes as the program wrote them (without the line ending).
    pub fn bytes(&self) -> &[u8] {
        self.raw.as_deref().unwrap_or(self.text.as_bytes())
    }
}

/// A line's text: a `str` that may share its allocation with other lines (the lines of one
/// pipe read, or of one stored chunk, are slices of one buffer: one allocation for them all,
/// not one per line). Cheap to clone; derefs to `str`. A buffer lives as long as any of its
/// lines: lines that are kept or dropped in order (as output logs do) hold at most one more
/// buffer than their own text.
#[derive(Clone)]
pub struct Text {
    buf: Arc<str>,
    start: usize,
    end: usize,
}

impl Text {
    /// `buf[range]`, sharing `buf`; `None` if the range is out of bounds or not on character
    /// boundaries.
    pub fn slice(buf: &Arc<str>, range: std::ops::Range<usize>) -> Option<Self> {
        buf.get(range.clone())?;
        Some(Self {
            buf: buf.clone(),
            start: range.start,
            end: range.end,
        })
    }

    /// Whether the two texts are slices of one buffer.
    pub fn shares_buffer_with(&self, other: &Text) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // In bounds and on character boundaries: checked when made.
        self.buf.get(self.start..self.end).unwrap_or_default()
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<Arc<str>> for Text {
    fn from(buf: Arc<str>) -> Self {
        Self {
            start: 0,
            end: buf.len(),
            buf,
        }
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Arc::<str>::from(s).into()
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Arc::<str>::from(s).into()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a process ended, as the OS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl Exit {
    /// Convert the OS's status.
    pub fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            // Stopped/continued statuses are never returned by wait(); treat as failure.
            (None, None) => Exit::Code(-1),
        }
    }

    /// The exit code, negative for a death by signal (`-9` for SIGKILL).
    pub fn code_or_negative_signal(&self) -> i32 {
        match *self {
            Exit::Code(c) => c,
            Exit::Signal(s) => -s,
        }
    }
}

/// Why a run was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// A client asked for it (`DELETE /runs/{id}` or `RunHandle::cancel`).
    Request,
    /// The server is shutting down.
    Shutdown,
}

/// How a finished run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process ended on its own.
    Exited(Exit),
    /// The process could not be started; the message says why.
    SpawnFailed(String),
    /// Cancelled; `exit` is how the process ended, if one was started.
    Cancelled {
        /// Why.
        reason: CancelReason,
        /// How the process ended, if one was started.
        exit: Option<Exit>,
        /// The name of the API token that asked, if one did.
        by: Option<String>,
    },
    /// The timeout expired and the process was stopped.
    TimedOut {
        /// How the process ended.
        exit: Option<Exit>,
    },
    /// modrun stopped while the run was executing.
    Lost,
    /// The process ran into one of its module's resource limits (`limit` names it, with its
    /// value: `cpu (1m)`).
    LimitExceeded {
        /// How the process ended.
        exit: Exit,
        /// The limit.
        limit: String,
    },
}

/// The status of a run, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Waiting for a slot.
    Queued,
    /// Its process is running.
    Running,
    /// Exited with code 0.
    Succeeded,
    /// Non-zero exit, death by a signal modrun did not send, or a spawn error.
    Failed,
    /// Cancelled by request or at shutdown.
    Cancelled,
    /// Stopped because its timeout expired.
    TimedOut,
    /// Interrupted by a modrun restart.
    Lost,
}

impl RunStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::TimedOut,
        RunStatus::Lost,
    ];

    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Lost => "lost",
        }
    }

    /// True for every status a run never leaves.
    pub fn is_finished(&self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status `{s}`"))
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Where a run is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// Waiting for a slot.
    Queued,
    /// Executing. `pid` is `None` for a dry run.
    Running {
        /// When the process started.
        started_at: SystemTime,
        /// The process id (and process-group id) of the child.
        pid: Option<u32>,
        /// Set once a cancel or timeout has begun stopping the process.
        stopping: bool,
    },
    /// Done for good.
    Finished {
        /// When the process started, if it ever did.
        started_at: Option<SystemTime>,
        /// The child's pid, if one was spawned.
        pid: Option<u32>,
        /// When the final status was recorded.
        finished_at: SystemTime,
        /// How it ended.
        outcome: Outcome,
    },
}

impl RunState {
    /// The end of a run cancelled before it started (`by`: the token that asked).
    pub fn cancelled_while_queued(by: Option<String>) -> Self {
        RunState::Finished {
            started_at: None,
            pid: None,
            finished_at: SystemTime::now(),
            outcome: Outcome::Cancelled {
                reason: CancelReason::Request,
                exit: None,
                by,
            },
        }
    }

    /// The API status for this state.
    pub fn status(&self) -> RunStatus {
        match self {
            RunState::Queued => RunStatus::Queued,
            RunState::Running { .. } => RunStatus::Running,
            RunState::Finished { outcome, .. } => match outcome {
                Outcome::Exited(Exit::Code(0)) => RunStatus::Succeeded,
                Outcome::Exited(_) | Outcome::SpawnFailed(_) | Outcome::LimitExceeded { .. } => {
                    RunStatus::Failed
                }
                Outcome::Cancelled { .. } => RunStatus::Cancelled,
                Outcome::TimedOut { .. } => RunStatus::TimedOut,
                Outcome::Lost => RunStatus::Lost,
            },
        }
    }

    /// True once the run will never change again.
    pub fn is_finished(&self) -> bool {
        matches!(self, RunState::Finished { .. })
    }
}

/// The record of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Its id.
    pub id: RunId,
    /// The module it runs.
    pub module_id: String,
    /// The module's display name at the time of the run.
    pub module_name: String,
    /// The parameters, with defaults applied.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// The argv that runs (or ran).
    pub argv: Vec<String>,
    /// The concrete mode (never `Auto`).
    pub mode: RunMode,
    /// The effective timeout.
    pub timeout: Duration,
    /// When the run was created.
    pub created_at: SystemTime,
    /// Where it is in its life.
    pub state: RunState,
    /// How many output lines it has kept so far.
    pub output_lines: u64,
    /// The name of the API token that created it; `None` when anonymous.
    pub created_by: Option<String>,
    /// How many times it was started (a run queued again after its node was lost starts
    /// again); 0 while it never started.
    pub attempt: u32,
    /// The URLs told when it ends (the module's, then the request's).
    pub callbacks: Vec<String>,
    /// When a cancel was first asked for while it ran (kept once it has ended); `None` when
    /// none was, or when the cancel found it queued (it ended then).
    pub cancel_requested_at: Option<SystemTime>,
}

impl Run {
    /// A queued run of `module` (`true`, async mode, 60 s), for tests.
    #[cfg(test)]
    pub(crate) fn queued_for_test(module: &str) -> Run {
        Run {
            id: RunId::new(),
            module_id: module.into(),
            module_name: module.into(),
            parameters: Default::default(),
            argv: vec!["true".into()],
            mode: RunMode::Async,
            timeout: Duration::from_secs(60),
            created_at: SystemTime::now(),
            state: RunState::Queued,
            output_lines: 0,
            created_by: None,
            attempt: 0,
            callbacks: Vec::new(),
            cancel_requested_at: None,
        }
    }

    /// Shortcut for `self.state.status()`.
    pub fn status(&self) -> RunStatus {
        self.state.status()
    }

    /// The exit code to report: set when the process exited with a code.
    pub fn exit_code(&self) -> Option<i32> {
        match self.exit() {
            Some(Exit::Code(c)) => Some(c),
            _ => None,
        }
    }

    /// The signal that killed the process, if one did.
    pub fn signal(&self) -> Option<i32> {
        match self.exit() {
            Some(Exit::Signal(s)) => Some(s),
            _ => None,
        }
    }

    fn exit(&self) -> Option<Exit> {
        match &self.state {
            RunState::Finished { outcome, .. } => match outcome {
                Outcome::Exited(e) => Some(*e),
                Outcome::Cancelled { exit, .. } | Outcome::TimedOut { exit } => *exit,
                Outcome::LimitExceeded { exit, .. } => Some(*exit),
                Outcome::SpawnFailed(_) | Outcome::Lost => None,
            },
            _ => None,
        }
    }

    /// A human sentence for every finished status but `succeeded`.
    pub fn error(&self) -> Option<String> {
        let RunState::Finished { outcome, .. } = &self.state else {
            return None;
        };
        Some(match outcome {
            Outcome::Exited(Exit::Code(0)) => return None,
            Outcome::Exited(Exit::Code(c)) => format!("the process exited with code {c}"),
            Outcome::Exited(Exit::Signal(s)) => {
                format!("the process was killed by signal {s} ({})", signal_name(*s))
            }
            Outcome::SpawnFailed(msg) => msg.clone(),
            Outcome::Cancelled {
                reason: CancelReason::Request,
                exit,
                ..
            } => match exit {
                None => "the run was cancelled before it started".to_owned(),
                Some(_) => "the run was cancelled by request".to_owned(),
            },
            Outcome::Cancelled {
                reason: CancelReason::Shutdown,
                ..
            } => "the run was cancelled because modrun was shutting down".to_owned(),
            Outcome::TimedOut { .. } => format!(
                "the run timed out after {}",
                humantime::format_duration(self.timeout)
            ),
            Outcome::Lost => "modrun stopped while the run was executing".to_owned(),
            Outcome::LimitExceeded { exit, limit } => format!(
                "the process exceeded its {limit} limit ({})",
                match exit {
                    Exit::Code(c) => format!("exit code {c}"),
                    Exit::Signal(s) => format!("killed by {}", signal_name(*s)),
                }
            ),
        })
    }

    /// The name of the API token that cancelled it, if a token did.
    pub fn cancelled_by(&self) -> Option<&str> {
        match &self.state {
            RunState::Finished {
                outcome: Outcome::Cancelled { by, .. },
                ..
            } => by.as_deref(),
            _ => None,
        }
    }

    /// When the process started, if it has.
    pub fn started_at(&self) -> Option<SystemTime> {
        match &self.state {
            RunState::Queued => None,
            RunState::Running { started_at, .. } => Some(*started_at),
            RunState::Finished { started_at, .. } => *started_at,
        }
    }

    /// When the run finished, if it has.
    pub fn finished_at(&self) -> Option<SystemTime> {
        match &self.state {
            RunState::Finished { finished_at, .. } => Some(*finished_at),
            _ => None,
        }
    }

    /// The child's pid, once spawned.
    pub fn pid(&self) -> Option<u32> {
        match &self.state {
            RunState::Queued => None,
            RunState::Running { pid, .. } | RunState::Finished { pid, .. } => *pid,
        }
    }
}

/// A readable name for a signal number (`SIGTERM`), or `signal N`.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// RFC 3339 text of a time, in UTC with microseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_mode_round_trips_through_its_name() {
        for m in RunMode::ALL {
            assert_eq!(m.as_str().parse::<RunMode>().unwrap(), m);
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        assert!("AUTO".parse::<RunMode>().is_err());
        assert_eq!(RunMode::default(), RunMode::Auto);
        assert_eq!(RunMode::Auto.resolve(), RunMode::Async);
    }

    #[test]
    fn run_ids_sort_in_creation_order() {
        let ids: Vec<RunId> = (0..1000).map(|_| RunId::new()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn statuses_follow_outcomes() {
        let fin = |outcome| RunState::Finished {
            started_at: None,
            pid: None,
            finished_at: SystemTime::now(),
            outcome,
        };
        assert_eq!(
            fin(Outcome::Exited(Exit::Code(0))).status(),
            RunStatus::Succeeded
        );
        assert_eq!(
            fin(Outcome::Exited(Exit::Code(2))).status(),
            RunStatus::Failed
        );
        assert_eq!(
            fin(Outcome::Exited(Exit::Signal(9))).status(),
            RunStatus::Failed
        );
        assert_eq!(
            fin(Outcome::SpawnFailed("x".into())).status(),
            RunStatus::Failed
        );
        assert_eq!(
            fin(Outcome::TimedOut { exit: None }).status(),
            RunStatus::TimedOut
        );
        assert_eq!(fin(Outcome::Lost).status(), RunStatus::Lost);
        assert_eq!(Exit::Signal(9).code_or_negative_signal(), -9);
    }
}
