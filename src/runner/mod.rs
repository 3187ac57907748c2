//! The [`ModuleRunner`]: queues runs, starts them when a slot is free (a global limit plus
//! per-module limits, FIFO within a module, no head-of-line blocking across modules), supervises
//! each one in its own tracked task, and cancels them. The HTTP service is built on it, and a
//! Rust program can embed it directly.
//!
//! ```
//! use std::time::Duration;
//! use futures_util::StreamExt;
//! use modrun::runner::{ModuleRunner, RunRequest, RunnerSettings};
//! use modrun::run::RunStatus;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runner = ModuleRunner::new(RunnerSettings {
//!     kill_grace: Duration::from_secs(1),
//!     ..RunnerSettings::default()
//! });
//! let mut request = RunRequest::new("greet", ["sh", "-c", "echo hello; echo oops >&2"]);
//! request.timeout = Duration::from_secs(10);
//! let handle = runner.submit(request)?.into_handle();
//!
//! // Every line from the start (replay), then live, until the output is complete.
//! let lines: Vec<String> = handle.lines(0).map(|l| format!("{}:{}", l.stream.as_str(), l.text)).collect().await;
//! assert_eq!(lines.len(), 2);
//!
//! let run = handle.wait().await.expect("retained");
//! assert_eq!(run.status(), RunStatus::Succeeded);
//! assert_eq!(run.exit_code(), Some(0));
//!
//! // Cancel: SIGTERM to the process group, SIGKILL after kill_grace.
//! let long = runner.submit(RunRequest::new("sleep", ["sleep", "30"]))?.into_handle();
//! long.cancel()?;
//! assert_eq!(long.wait().await.expect("retained").status(), RunStatus::Cancelled);
//! # Ok(()) }
//! ```

mod execute;
pub(crate) mod process;

pub use execute::{ExecError, ModuleOutput, execute_module};

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use futures_util::Stream as FuturesStream;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::module::{Module, ValidParams};
use crate::output::{Cursor, OutputLimits, OutputLog};
use crate::run::{CancelReason, Line, Outcome, Run, RunId, RunMode, RunState, Stream};
use crate::store::{
    Created, Expect, IdempotencyKey, ListQuery, MemoryStore, Page, RunStore, StoreError,
};
use process::{ProcEvents, ProcSpec, Stopped, Supervision};

/// Limits of a [`ModuleRunner`].
#[derive(Debug, Clone, Copy)]
pub struct RunnerSettings {
    /// Runs executing at once, all modules together.
    pub max_concurrent: NonZeroUsize,
    /// Runs waiting for a slot; past it [`ModuleRunner::submit`] refuses.
    pub max_queued: usize,
    /// SIGTERM -> wait this long -> SIGKILL, on cancel and timeout.
    pub kill_grace: Duration,
    /// Per-run output limits.
    pub output: OutputLimits,
    /// Finished runs kept by the default in-memory store.
    pub keep_runs: usize,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self {
            max_concurrent: NonZeroUsize::new(4).expect("not zero"),
            max_queued: 1000,
            kill_grace: Duration::from_secs(5),
            output: OutputLimits {
                max_line_bytes: 65536,
                max_run_bytes: 64 << 20,
            },
            keep_runs: 10_000,
        }
    }
}

/// One run to submit. Build it with [`RunRequest::new`] (a command line) or
/// [`RunRequest::for_module`] (a declared module and valid parameters), then adjust the fields.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The module's id (any label for ad-hoc runs); per-module limits apply by this id.
    pub module_id: String,
    /// Display name.
    pub module_name: String,
    /// Program then arguments. A bare program name is looked up on the child's `PATH`; a
    /// relative path resolves against `cwd`.
    pub argv: Vec<String>,
    /// Parameters to record with the run (informational).
    pub parameters: Map<String, Value>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The child's whole environment (nothing else is inherited).
    pub env: Vec<(String, String)>,
    /// Text written to the child's stdin, then closed; `None` for a null stdin.
    pub stdin: Option<String>,
    /// Stop the run (TERM, grace, KILL) after this long.
    pub timeout: Duration,
    /// How to spawn it.
    pub mode: RunMode,
    /// Per-module limit on runs executing at once.
    pub max_concurrent: Option<NonZeroUsize>,
    /// Deduplicates submissions: a known key with an equal fingerprint returns the first run.
    pub idempotency: Option<IdempotencyKey>,
}

impl RunRequest {
    /// An ad-hoc run of `argv` in the current directory, with the parent's environment, a one
    /// hour timeout and the automatic mode.
    pub fn new<I, S>(module_id: impl Into<String>, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let module_id = module_id.into();
        Self {
            module_name: module_id.clone(),
            module_id,
            argv: argv.into_iter().map(Into::into).collect(),
            parameters: Map::new(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            env: std::env::vars().collect(),
            stdin: None,
            timeout: Duration::from_secs(3600),
            mode: RunMode::Auto,
            max_concurrent: None,
            idempotency: None,
        }
    }

    /// A run of a declared module with parameters that passed [`Module::validate`]. The child's
    /// environment is `base_env` (the variables the operator allows it to inherit), then the
    /// module's env, then env parameters.
    pub fn for_module(
        module: &Module,
        params: ValidParams,
        base_env: &[(String, String)],
        timeout: Duration,
        mode: RunMode,
    ) -> Self {
        let inv = module.invocation(&params);
        let mut env: Vec<(String, String)> = base_env.to_vec();
        for (k, v) in inv.env {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        }
        Self {
            module_id: module.id.clone(),
            module_name: module.name.clone(),
            argv: inv.argv,
            parameters: params.into_map(),
            cwd: module.cwd.clone(),
            env,
            stdin: None,
            timeout,
            mode,
            max_concurrent: module.max_concurrent,
            idempotency: None,
        }
    }
}

/// Why a submission was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// `max_queued` runs are waiting.
    #[error("the queue is full ({0} runs waiting)")]
    QueueFull(usize),
    /// The runner is shutting down.
    #[error("modrun is shutting down")]
    ShuttingDown,
    /// The request has no program.
    #[error("argv is empty: a run needs a program")]
    EmptyArgv,
    /// The idempotency key was used with a different request.
    #[error("the idempotency key was already used with a different request")]
    IdempotencyConflict,
    /// The store refused.
    #[error("the run store failed: {0}")]
    Store(String),
}

/// Why a cancel did nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CancelError {
    /// No such run.
    #[error("run {0} not found")]
    NotFound(RunId),
    /// It already finished.
    #[error("run {} already finished ({})", .0.id, .0.status())]
    AlreadyFinished(Box<Run>),
}

/// What [`ModuleRunner::submit`] did.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// A new run was created.
    New(RunHandle),
    /// The idempotency key matched an existing run.
    Existing(RunHandle),
}

impl Submitted {
    /// The handle, whichever it was.
    pub fn into_handle(self) -> RunHandle {
        match self {
            Submitted::New(h) | Submitted::Existing(h) => h,
        }
    }
}

/// Runs queued runs when slots free up, and supervises them. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct ModuleRunner {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ModuleRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleRunner")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: RunnerSettings,
    store: Arc<dyn RunStore>,
    /// Queue, slots and cancel tokens. A std mutex: sections are queue and map operations only
    /// (the store is never called while it is held), never across `.await`.
    sched: Mutex<Sched>,
    /// Owns every run task, so that shutdown can wait for them.
    tasks: TaskTracker,
}

struct Sched {
    /// Runs waiting for a slot, in creation order. Bounded: `submit` refuses at `max_queued`
    /// (counting `reserved`).
    queue: VecDeque<Pending>,
    /// Submissions that passed the queue check and are being recorded.
    reserved: usize,
    /// Runs holding a slot (from dispatch until their final status is recorded).
    active: HashMap<RunId, Control>,
    /// Slots held per module id.
    per_module: HashMap<String, usize>,
    /// False after shutdown: nothing new starts.
    open: bool,
}

struct Pending {
    id: RunId,
    req: RunRequest,
}

/// Cancellation handle of a run holding a slot.
#[derive(Clone)]
struct Control {
    cancel: CancellationToken,
    /// Why it was cancelled; the first reason wins.
    reason: Arc<OnceLock<CancelReason>>,
}

impl ModuleRunner {
    /// A runner with an in-memory store.
    pub fn new(settings: RunnerSettings) -> Self {
        Self::with_store(settings, Arc::new(MemoryStore::new(settings.keep_runs)))
    }

    /// A runner over the given store.
    pub fn with_store(settings: RunnerSettings, store: Arc<dyn RunStore>) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                store,
                sched: Mutex::new(Sched {
                    queue: VecDeque::new(),
                    reserved: 0,
                    active: HashMap::new(),
                    per_module: HashMap::new(),
                    open: true,
                }),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &RunnerSettings {
        &self.inner.settings
    }

    /// The store holding its runs.
    pub fn store(&self) -> &Arc<dyn RunStore> {
        &self.inner.store
    }

    /// Queue a run; it starts as soon as its limits allow. Must be called inside a Tokio
    /// runtime.
    pub fn submit(&self, req: RunRequest) -> Result<Submitted, SubmitError> {
        if req.argv.is_empty() {
            return Err(SubmitError::EmptyArgv);
        }
        let store = &self.inner.store;
        if let Some(key) = &req.idempotency {
            match store.find_idempotent(key) {
                Ok(Some(run)) => return Ok(Submitted::Existing(self.handle(run.id))),
                Ok(None) => {}
                Err(StoreError::IdempotencyConflict) => {
                    return Err(SubmitError::IdempotencyConflict);
                }
                Err(e) => return Err(SubmitError::Store(e.to_string())),
            }
        }
        {
            let mut s = self.inner.lock();
            if !s.open {
                return Err(SubmitError::ShuttingDown);
            }
            if s.queue.len() + s.reserved >= self.inner.settings.max_queued {
                return Err(SubmitError::QueueFull(s.queue.len()));
            }
            s.reserved += 1;
        }
        let run = Run {
            id: RunId::new(),
            module_id: req.module_id.clone(),
            module_name: req.module_name.clone(),
            parameters: req.parameters.clone(),
            argv: req.argv.clone(),
            mode: req.mode.resolve(),
            timeout: req.timeout,
            created_at: SystemTime::now(),
            state: RunState::Queued,
            output_lines: 0,
        };
        let id = run.id;
        let log = Arc::new(OutputLog::new(self.inner.settings.output));
        let created = store.create(run, log, req.idempotency.clone());
        let mut s = self.inner.lock();
        s.reserved -= 1;
        match created {
            Ok(Created::New(_)) => {
                s.queue.push_back(Pending { id, req });
                drop(s);
                tracing::debug!(run_id = %id, "run queued");
                self.inner.dispatch(&self.inner);
                Ok(Submitted::New(self.handle(id)))
            }
            Ok(Created::Existing(run)) => Ok(Submitted::Existing(self.handle(run.id))),
            Err(StoreError::IdempotencyConflict) => Err(SubmitError::IdempotencyConflict),
            Err(e) => Err(SubmitError::Store(e.to_string())),
        }
    }

    /// A handle on a run by id (whether or not it exists).
    pub fn handle(&self, id: RunId) -> RunHandle {
        RunHandle {
            id,
            runner: self.clone(),
        }
    }

    /// A run's current record.
    pub fn get(&self, id: RunId) -> Option<Run> {
        self.inner.store.get(id)
    }

    /// A page of runs, newest first.
    pub fn list(&self, query: &ListQuery) -> Page {
        self.inner.store.list(query)
    }

    /// Runs waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Cancel a run: a queued run becomes `cancelled` at once; a running one gets SIGTERM on
    /// its process group, then SIGKILL after `kill_grace`. Returns the run as it is now (it may
    /// still be `running` while its processes stop).
    pub fn cancel(&self, id: RunId) -> Result<Run, CancelError> {
        self.cancel_with(id, CancelReason::Request)
    }

    fn cancel_with(&self, id: RunId, reason: CancelReason) -> Result<Run, CancelError> {
        let store = &self.inner.store;
        let was_queued = {
            let mut s = self.inner.lock();
            if let Some(pos) = s.queue.iter().position(|p| p.id == id) {
                s.queue.remove(pos);
                true
            } else {
                if let Some(ctl) = s.active.get(&id) {
                    let _ = ctl.reason.set(reason);
                    ctl.cancel.cancel();
                }
                false
            }
        };
        if was_queued {
            if let Some(log) = store.output(id) {
                log.close();
            }
            let next = RunState::Finished {
                started_at: None,
                pid: None,
                finished_at: SystemTime::now(),
                outcome: Outcome::Cancelled { reason, exit: None },
            };
            return match store.transition(id, Expect::Queued, next) {
                Ok(run) => Ok(run),
                Err(StoreError::WrongState(run)) => Ok(*run),
                Err(_) => Err(CancelError::NotFound(id)),
            };
        }
        match store.get(id) {
            None => Err(CancelError::NotFound(id)),
            Some(run) if run.state.is_finished() => {
                Err(CancelError::AlreadyFinished(Box::new(run)))
            }
            Some(run) => Ok(run),
        }
    }

    /// Wait until a run has finished; `None` if there is no such run.
    pub async fn wait(&self, id: RunId) -> Option<Run> {
        let log = self.inner.store.output(id)?;
        let mut changes = log.subscribe();
        loop {
            changes.borrow_and_update();
            let run = self.inner.store.get(id)?;
            if run.state.is_finished() {
                return Some(run);
            }
            if changes.changed().await.is_err() {
                return self.inner.store.get(id);
            }
        }
    }

    /// Stop starting runs and cancel the running ones (reason: shutdown). Queued runs stay
    /// queued. Returns at once; see [`ModuleRunner::wait_idle`].
    pub fn shutdown(&self) {
        let mut s = self.inner.lock();
        s.open = false;
        for ctl in s.active.values() {
            let _ = ctl.reason.set(CancelReason::Shutdown);
            ctl.cancel.cancel();
        }
    }

    /// Wait until every run task has finished, at most `limit`; true if they all did.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        self.inner.tasks.close();
        tokio::time::timeout(limit, self.inner.tasks.wait())
            .await
            .is_ok()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start every queued run that fits, oldest first, skipping (not waiting behind) runs whose
    /// module is at its limit.
    fn dispatch(&self, this: &Arc<Inner>) {
        let mut starts = Vec::new();
        {
            let mut s = self.lock();
            if !s.open {
                return;
            }
            let max = self.settings.max_concurrent.get();
            let mut i = 0;
            while i < s.queue.len() && s.active.len() < max {
                let p = &s.queue[i];
                let used = s.per_module.get(&p.req.module_id).copied().unwrap_or(0);
                if p.req.max_concurrent.is_some_and(|l| used >= l.get()) {
                    i += 1;
                    continue;
                }
                let p = s.queue.remove(i).expect("index checked");
                *s.per_module.entry(p.req.module_id.clone()).or_default() += 1;
                let ctl = Control {
                    cancel: CancellationToken::new(),
                    reason: Arc::new(OnceLock::new()),
                };
                s.active.insert(p.id, ctl.clone());
                starts.push((p, ctl));
            }
        }
        for (p, ctl) in starts {
            let span = tracing::info_span!("run", run_id = %p.id, module = %p.req.module_id);
            let inner = this.clone();
            self.tasks.spawn(drive(inner, p, ctl).instrument(span));
        }
    }

    fn release(&self, this: &Arc<Inner>, id: RunId, module_id: &str) {
        {
            let mut s = self.lock();
            s.active.remove(&id);
            if let Some(n) = s.per_module.get_mut(module_id) {
                *n -= 1;
                if *n == 0 {
                    s.per_module.remove(module_id);
                }
            }
        }
        self.dispatch(this);
    }
}

/// Records the run's progress as the process starts and stops.
struct RunEvents {
    store: Arc<dyn RunStore>,
    id: RunId,
    started: Mutex<Option<(SystemTime, Option<u32>)>>,
}

impl RunEvents {
    fn started(&self) -> Option<(SystemTime, Option<u32>)> {
        *self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_running(&self, pid: Option<u32>) {
        let started_at = SystemTime::now();
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some((started_at, pid));
        let next = RunState::Running {
            started_at,
            pid,
            stopping: false,
        };
        if let Err(e) = self.store.transition(self.id, Expect::Queued, next) {
            tracing::warn!(error = %e, "cannot record the run as running");
        }
        tracing::info!(pid, "run started");
    }
}

impl ProcEvents for RunEvents {
    fn spawned(&self, pid: u32) {
        self.mark_running(Some(pid));
    }

    fn stopping(&self) {
        if let Some((started_at, pid)) = self.started() {
            let next = RunState::Running {
                started_at,
                pid,
                stopping: true,
            };
            let _ = self.store.transition(self.id, Expect::Running, next);
        }
    }
}

/// One run's task: spawn, supervise, record the final status, release the slot.
async fn drive(inner: Arc<Inner>, p: Pending, ctl: Control) {
    let Pending { id, req } = p;
    let store = inner.store.clone();
    let log = store.output(id).unwrap_or_else(|| {
        // Active runs are never evicted, so this cannot happen; keep going with a detached log
        // rather than leave the slot held.
        Arc::new(OutputLog::new(inner.settings.output))
    });
    let events = RunEvents {
        store: store.clone(),
        id,
        started: Mutex::new(None),
    };
    let outcome = if ctl.cancel.is_cancelled() {
        Outcome::Cancelled {
            reason: ctl.reason.get().copied().unwrap_or(CancelReason::Request),
            exit: None,
        }
    } else {
        let mode = req.mode.resolve();
        if mode == RunMode::DryRun {
            events.mark_running(None);
        }
        let spec = ProcSpec {
            program: OsString::from(&req.argv[0]),
            args: req.argv[1..].iter().map(OsString::from).collect(),
            cwd: req.cwd.clone(),
            env: Some(
                req.env
                    .iter()
                    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                    .collect(),
            ),
            stdin: req.stdin.clone().map(String::into_bytes),
        };
        let sup = Supervision {
            cancel: &ctl.cancel,
            timeout: Some(req.timeout),
            kill_grace: inner.settings.kill_grace,
        };
        let sink: Arc<dyn process::Sink> = log.clone();
        match process::run_process(&spec, mode, sink, sup, &events).await {
            Ok(end) => match end.stopped {
                None => Outcome::Exited(end.exit),
                Some(Stopped::Cancelled) => Outcome::Cancelled {
                    reason: ctl.reason.get().copied().unwrap_or(CancelReason::Request),
                    exit: Some(end.exit),
                },
                Some(Stopped::TimedOut) => Outcome::TimedOut {
                    exit: Some(end.exit),
                },
            },
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!(error = %msg, "run could not start");
                log.push_line(Stream::Stderr, &msg);
                Outcome::SpawnFailed(msg)
            }
        }
    };
    log.close();
    let (started_at, pid) = match events.started() {
        Some((t, pid)) => (Some(t), pid),
        None => (None, None),
    };
    let next = RunState::Finished {
        started_at,
        pid,
        finished_at: SystemTime::now(),
        outcome,
    };
    match store.transition(id, Expect::Active, next) {
        Ok(run) => {
            tracing::info!(status = %run.status(), exit_code = run.exit_code(), "run finished")
        }
        Err(e) => tracing::error!(error = %e, "cannot record the run's final status"),
    }
    inner.release(&inner, id, &req.module_id);
}

/// A handle on one run of a [`ModuleRunner`].
#[derive(Debug, Clone)]
pub struct RunHandle {
    id: RunId,
    runner: ModuleRunner,
}

impl RunHandle {
    /// The run's id.
    pub fn id(&self) -> RunId {
        self.id
    }

    /// The run as it is now (`None` once evicted by retention).
    pub fn run(&self) -> Option<Run> {
        self.runner.get(self.id)
    }

    /// Its current status.
    pub fn status(&self) -> Option<crate::run::RunStatus> {
        self.run().map(|r| r.status())
    }

    /// Its output log.
    pub fn output(&self) -> Option<Arc<OutputLog>> {
        self.runner.store().output(self.id)
    }

    /// Every output line with `seq > after`: the retained ones first, then live ones as they
    /// arrive; the stream ends when the run's output is complete.
    pub fn lines(&self, after: u64) -> impl FuturesStream<Item = Line> + Send + 'static {
        let cursor = self.output().map(|log| Cursor::new(log, after));
        futures_util::stream::unfold(
            (cursor, VecDeque::<Line>::new()),
            |(cursor, mut buf)| async move {
                let mut cursor = cursor?;
                if buf.is_empty() {
                    buf.extend(cursor.next_batch(1024).await?);
                }
                let line = buf.pop_front()?;
                Some((line, (Some(cursor), buf)))
            },
        )
    }

    /// Cancel it (see [`ModuleRunner::cancel`]).
    pub fn cancel(&self) -> Result<Run, CancelError> {
        self.runner.cancel(self.id)
    }

    /// Wait for its final status.
    pub async fn wait(&self) -> Option<Run> {
        self.runner.wait(self.id).await
    }
}
