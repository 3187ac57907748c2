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
//! let handle = runner.submit(request).await?.into_handle();
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
//! let long = runner.submit(RunRequest::new("sleep", ["sleep", "30"])).await?.into_handle();
//! long.cancel().await?;
//! assert_eq!(long.wait().await.expect("retained").status(), RunStatus::Cancelled);
//! # Ok(()) }
//! ```

mod execute;
mod group;
pub mod jail;
pub(crate) mod process;
mod program;
mod spawn;

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

use crate::module::{Limits, Module, RunAs, ValidParams};
use crate::output::{OutputLimits, OutputLog, Redactor};
use crate::registry::{Cursor, Registry};
use crate::run::{CancelReason, Exit, Line, Outcome, Run, RunId, RunMode, RunState, Stream};
use crate::store::{
    Created, Expect, Held, IdempotencyKey, ListQuery, MemoryStore, NewRun, Page, StoreError,
};
use process::{ProcEvents, ProcSpec, Stopped, Supervision};

/// The system's limit on a child's argv and environment together, in the terms of
/// [`crate::module::exec_size`] (the run marker comes on top: [`RUN_MARKER_BYTES`]).
pub fn arg_max() -> usize {
    program::arg_max()
}

/// What the run marker (`MODRUN_RUN_ID=<uuid>`, see [`RUN_MARKER`]) adds to a child's
/// environment, in the terms of [`crate::module::exec_size`].
pub const RUN_MARKER_BYTES: usize = RUN_MARKER.len() + 36 + 2 + std::mem::size_of::<usize>();

/// The environment variable that marks every process of a run with the run's id (inherited by
/// grandchildren): what proves, after a crash or an escape from the process group, that a
/// process belongs to the run.
pub const RUN_MARKER: &str = "MODRUN_RUN_ID";

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
}

impl Default for RunnerSettings {
    /// The defaults of `[runner]` and `[output]` in the config file (which takes them from
    /// here).
    fn default() -> Self {
        Self {
            max_concurrent: NonZeroUsize::new(4).expect("not zero"),
            max_queued: 1000,
            kill_grace: Duration::from_secs(5),
            output: OutputLimits::default(),
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
    /// The name of the API token that asked for it (recorded as the run's `created_by`).
    pub created_by: Option<String>,
    /// Values masked as `***` in the run's argv and output (a module's secrets, secret
    /// parameter values).
    pub secrets: Vec<String>,
    /// The secret parameters' values (`parameters` shows them as `***`), kept by the store
    /// while the run is queued.
    pub secret_params: Map<String, Value>,
    /// Resource limits set in the child.
    pub limits: Limits,
    /// The user the child runs as (`None`: modrun's own).
    pub run_as: Option<RunAs>,
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
            created_by: None,
            secrets: Vec::new(),
            secret_params: Map::new(),
            limits: Limits::default(),
            run_as: None,
        }
    }

    /// A run of a declared module with parameters that passed [`Module::validate`]. The child's
    /// environment is `base_env` (the variables the operator allows it to inherit), then the
    /// module's env, then env parameters; its stdin is the stdin parameter's value, if the
    /// module has one. Secret parameters are recorded as `***`, their values kept aside.
    pub fn for_module(
        module: &Module,
        params: ValidParams,
        base_env: &[(String, String)],
        timeout: Duration,
        mode: RunMode,
    ) -> Self {
        let inv = module.invocation(&params);
        let secrets = module.secrets_of(&params);
        let secret_params = params.secret_values(module);
        let parameters = params.shown(module);
        let mut env: Vec<(String, String)> = base_env.to_vec();
        for (k, v) in inv.env {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        }
        Self {
            module_id: module.id.clone(),
            module_name: module.name.clone(),
            argv: inv.argv,
            parameters,
            cwd: module.cwd.clone(),
            env,
            stdin: inv.stdin,
            timeout,
            mode,
            max_concurrent: module.max_concurrent,
            idempotency: None,
            created_by: None,
            secrets,
            secret_params,
            limits: module.limits,
            run_as: module.run_as.clone(),
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
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
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
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
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
    registry: Arc<Registry>,
    /// Queue, slots and cancel tokens. A std mutex: sections are queue and map operations only
    /// (the registry is never called while it is held), never across `.await`.
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
    /// Why it was cancelled, and by which token; the first reason wins.
    reason: Arc<OnceLock<(CancelReason, Option<String>)>>,
}

impl Control {
    /// The outcome of a cancelled run that ended with `exit`.
    fn cancelled(&self, exit: Option<Exit>) -> Outcome {
        let (reason, by) = self
            .reason
            .get()
            .cloned()
            .unwrap_or((CancelReason::Request, None));
        Outcome::Cancelled { reason, exit, by }
    }
}

impl ModuleRunner {
    /// A runner with an in-memory store (nothing survives the process).
    pub fn new(settings: RunnerSettings) -> Self {
        let registry = Registry::new(Arc::new(MemoryStore::new()), settings.output);
        Self::with_registry(settings, Arc::new(registry))
    }

    /// A runner over the given registry (and through it, its store). Output is persisted by the
    /// registry's flusher (see [`Registry::flush_loop`], which the embedding program runs) and
    /// at the end of each run; a run's end that the store could not take is written by the
    /// flusher too, once the store takes writes again.
    pub fn with_registry(settings: RunnerSettings, registry: Arc<Registry>) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                registry,
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

    /// The registry holding its runs.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// Record a run (durably) and queue it; it starts as soon as its limits allow. Must be
    /// called inside a Tokio runtime.
    ///
    /// When a slot is free and nothing waits, the run is recorded as `running` at once (one
    /// commit instead of two). Recording goes on in a task of its own: a caller that stops
    /// waiting (an HTTP client that hangs up) can never leave a recorded run that nobody
    /// starts.
    pub async fn submit(&self, req: RunRequest) -> Result<Submitted, SubmitError> {
        if req.argv.is_empty() {
            return Err(SubmitError::EmptyArgv);
        }
        if let Some(key) = &req.idempotency {
            match self.inner.registry.find_idempotent(key).await {
                Ok(Some(run)) => return Ok(Submitted::Existing(self.handle(run.id))),
                Ok(None) => {}
                Err(e) => return Err(submit_error(e)),
            }
        }
        let inner = self.inner.clone();
        let span = tracing::debug_span!("submit", module = %req.module_id);
        let recorded = self
            .inner
            .tasks
            .spawn(async move { inner.record(req).await }.instrument(span))
            .await
            .unwrap_or_else(|e| {
                Err(SubmitError::Store(StoreError::Backend(format!(
                    "recording the run failed: {e}"
                ))))
            });
        Ok(match recorded? {
            (id, true) => Submitted::New(self.handle(id)),
            (id, false) => Submitted::Existing(self.handle(id)),
        })
    }

    /// Queue a run that is already recorded (and live in the registry) as `queued`: the runs
    /// found queued at start-up, in their creation order.
    pub fn requeue(&self, id: RunId, req: RunRequest) {
        self.inner.enqueue(Pending { id, req });
    }

    /// A handle on a run by id (whether or not it exists).
    pub fn handle(&self, id: RunId) -> RunHandle {
        RunHandle {
            id,
            runner: self.clone(),
        }
    }

    /// A run's current record.
    pub async fn get(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        self.inner.registry.get(id).await
    }

    /// A page of runs, newest first.
    pub async fn list(&self, query: ListQuery) -> Result<Page, StoreError> {
        self.inner.registry.list(query).await
    }

    /// Runs waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Cancel a run: a queued run becomes `cancelled` at once; a running one gets SIGTERM on
    /// its process group, then SIGKILL after `kill_grace`. Returns the run as it is now (it may
    /// still be `running` while its processes stop).
    ///
    /// Like [`ModuleRunner::submit`], the work runs in a task of its own: a caller that stops
    /// waiting cannot leave a run taken off the queue but never recorded as cancelled.
    pub async fn cancel(&self, id: RunId) -> Result<Run, CancelError> {
        self.cancel_by(id, None).await
    }

    /// [`ModuleRunner::cancel`] on behalf of the API token named `by` (recorded as the run's
    /// `cancelled_by`).
    pub async fn cancel_by(&self, id: RunId, by: Option<String>) -> Result<Run, CancelError> {
        let this = self.clone();
        let span = tracing::debug_span!("cancel", run_id = %id);
        self.inner
            .tasks
            .spawn(async move { this.cancel_now(id, by).await }.instrument(span))
            .await
            .unwrap_or_else(|e| {
                Err(CancelError::Store(StoreError::Backend(format!(
                    "cancelling failed: {e}"
                ))))
            })
    }

    async fn cancel_now(&self, id: RunId, by: Option<String>) -> Result<Run, CancelError> {
        let registry = &self.inner.registry;
        let (was_queued, signalled) = {
            let mut s = self.inner.lock();
            if let Some(pos) = s.queue.iter().position(|p| p.id == id) {
                s.queue.remove(pos);
                (true, false)
            } else if let Some(ctl) = s.active.get(&id) {
                let _ = ctl.reason.set((CancelReason::Request, by.clone()));
                ctl.cancel.cancel();
                (false, true)
            } else {
                (false, false)
            }
        };
        if was_queued {
            let next = RunState::Finished {
                started_at: None,
                pid: None,
                finished_at: SystemTime::now(),
                outcome: Outcome::Cancelled {
                    reason: CancelReason::Request,
                    exit: None,
                    by,
                },
            };
            if let Some(log) = registry.live_log(id) {
                log.close();
            }
            let result = registry.transition(id, Expect::Queued, next).await;
            registry.retire(id);
            return match result {
                Ok(run) => Ok(run),
                Err(StoreError::WrongState(run)) => Ok(*run),
                Err(StoreError::NotFound(_)) => Err(CancelError::NotFound(id)),
                Err(e) => Err(CancelError::Store(e)),
            };
        }
        match registry.get(id).await {
            Ok(None) => Err(CancelError::NotFound(id)),
            // A run this call stopped may already be finished (a child that exits on SIGTERM
            // at once): that is still a successful cancel, not a conflict.
            Ok(Some(run)) if run.state.is_finished() && !signalled => {
                Err(CancelError::AlreadyFinished(Box::new(run)))
            }
            Ok(Some(run)) => Ok(run),
            Err(e) => Err(CancelError::Store(e)),
        }
    }

    /// Wait until a run has finished; `None` if there is no such run.
    pub async fn wait(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        let registry = &self.inner.registry;
        let Some(log) = registry.live_log(id) else {
            return registry.get(id).await;
        };
        let mut changes = log.subscribe();
        loop {
            changes.borrow_and_update();
            match registry.get(id).await? {
                Some(run) if !run.state.is_finished() => {}
                other => return Ok(other),
            }
            if changes.changed().await.is_err() {
                return registry.get(id).await;
            }
        }
    }

    /// Stop starting runs and cancel the running ones (reason: shutdown). Queued runs stay
    /// queued. Returns at once; see [`ModuleRunner::wait_idle`].
    pub fn shutdown(&self) {
        let mut s = self.inner.lock();
        s.open = false;
        for ctl in s.active.values() {
            let _ = ctl.reason.set((CancelReason::Shutdown, None));
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

/// After a crash: kill what is left in the cgroups of modrun processes that are gone, and every
/// process that carries a lost run's `MODRUN_RUN_ID` marker in its environment, and wait (at
/// most `limit`) until they are dead. Returns how many processes were killed per run, in the order of
/// `runs`. Runs on a blocking thread.
pub async fn kill_leftovers(runs: &[Run], limit: Duration) -> Vec<usize> {
    let ids: Vec<String> = runs.iter().map(|r| r.id.to_string()).collect();
    let n = ids.len();
    tokio::task::spawn_blocking(move || {
        let in_cgroups = jail::sweep(limit);
        if in_cgroups > 0 {
            tracing::warn!(
                processes = in_cgroups,
                "killed what a crashed modrun left in its cgroups"
            );
        }
        group::kill_leftovers(&ids, limit)
    })
    .await
    .unwrap_or_else(|_| vec![0; n])
}

fn submit_error(e: StoreError) -> SubmitError {
    match e {
        StoreError::IdempotencyConflict => SubmitError::IdempotencyConflict,
        other => SubmitError::Store(other),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a run of a module with `limit` may take a slot now.
    fn has_slot(&self, s: &Sched, module_id: &str, limit: Option<NonZeroUsize>) -> bool {
        let used = s.per_module.get(module_id).copied().unwrap_or(0);
        s.active.len() < self.settings.max_concurrent.get() && limit.is_none_or(|l| used < l.get())
    }

    /// Take a slot for run `id` (the caller checked [`Inner::has_slot`]).
    fn take_slot(s: &mut Sched, id: RunId, module_id: &str) -> Control {
        *s.per_module.entry(module_id.to_owned()).or_default() += 1;
        let ctl = Control {
            cancel: CancellationToken::new(),
            reason: Arc::new(OnceLock::new()),
        };
        s.active.insert(id, ctl.clone());
        ctl
    }

    /// The body of [`ModuleRunner::submit`], in its own task. Returns the run's id and whether
    /// it is new (false: an idempotent repeat).
    async fn record(self: &Arc<Self>, req: RunRequest) -> Result<(RunId, bool), SubmitError> {
        let id = RunId::new();
        let now = SystemTime::now();
        // A free slot and nobody waiting: start at once, holding the slot while recording.
        let direct = {
            let mut s = self.lock();
            if !s.open {
                return Err(SubmitError::ShuttingDown);
            }
            if s.queue.len() + s.reserved >= self.settings.max_queued {
                return Err(SubmitError::QueueFull(s.queue.len()));
            }
            if s.queue.is_empty() && self.has_slot(&s, &req.module_id, req.max_concurrent) {
                Some(Self::take_slot(&mut s, id, &req.module_id))
            } else {
                s.reserved += 1;
                None
            }
        };
        let state = match direct {
            Some(_) => RunState::Running {
                started_at: now,
                pid: None,
                stopping: false,
            },
            None => RunState::Queued,
        };
        let redactor = Redactor::new(&req.secrets).map(Arc::new);
        let argv = match &redactor {
            Some(r) => req.argv.iter().map(|a| r.redact_str(a)).collect(),
            None => req.argv.clone(),
        };
        let run = Run {
            id,
            module_id: req.module_id.clone(),
            module_name: req.module_name.clone(),
            parameters: req.parameters.clone(),
            argv,
            mode: req.mode.resolve(),
            timeout: req.timeout,
            created_at: now,
            state,
            output_lines: 0,
            created_by: req.created_by.clone(),
        };
        let created = self
            .registry
            .create(
                NewRun {
                    run,
                    key: req.idempotency.clone(),
                    held: Held {
                        stdin: req.stdin.clone(),
                        secrets: req.secret_params.clone(),
                    },
                },
                redactor,
            )
            .await;
        let not_new = match created {
            Ok(Created::New(_)) => None,
            Ok(Created::Existing(run)) => Some(Ok((run.id, false))),
            Err(e) => Some(Err(submit_error(e))),
        };
        if let Some(result) = not_new {
            // Nothing new to run: give the slot or the queue place back.
            match direct {
                Some(_) => self.release(self, id, &req.module_id),
                None => self.lock().reserved -= 1,
            }
            return result;
        }
        match direct {
            Some(ctl) => {
                tracing::debug!(run_id = %id, "run started at once");
                self.start(Pending { id, req }, ctl, Some(now));
            }
            None => {
                {
                    // One section: the place moves from `reserved` to the queue.
                    let mut s = self.lock();
                    s.reserved -= 1;
                    s.queue.push_back(Pending { id, req });
                }
                tracing::debug!(run_id = %id, "run queued");
                self.dispatch(self);
            }
        }
        Ok((id, true))
    }

    /// Queue a recorded run and start what fits.
    fn enqueue(self: &Arc<Self>, p: Pending) {
        tracing::debug!(run_id = %p.id, "run queued");
        self.lock().queue.push_back(p);
        self.dispatch(self);
    }

    /// Spawn the task that drives a run holding a slot (`started`: when it was recorded as
    /// running, if it already was).
    fn start(self: &Arc<Self>, p: Pending, ctl: Control, started: Option<SystemTime>) {
        let span =
            tracing::info_span!(parent: None, "run", run_id = %p.id, module = %p.req.module_id);
        self.tasks
            .spawn(drive(self.clone(), p, ctl, started).instrument(span));
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
                if !self.has_slot(&s, &p.req.module_id, p.req.max_concurrent) {
                    i += 1;
                    continue;
                }
                let p = s.queue.remove(i).expect("index checked");
                let ctl = Self::take_slot(&mut s, p.id, &p.req.module_id);
                starts.push((p, ctl));
            }
        }
        for (p, ctl) in starts {
            this.start(p, ctl, None);
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
    registry: Arc<Registry>,
    id: RunId,
    started: Mutex<Option<(SystemTime, Option<u32>)>>,
}

impl RunEvents {
    fn started(&self) -> Option<(SystemTime, Option<u32>)> {
        *self.started_mut()
    }

    fn started_mut(&self) -> MutexGuard<'_, Option<(SystemTime, Option<u32>)>> {
        self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record the run as `running` before anything is spawned, so that a crash from here on
    /// leaves it `lost`, never `queued` (a queued run would run a second time after a restart).
    /// While the store cannot write, the run waits for it (holding its slot), since a start
    /// that is not recorded must not happen; `false` if it was cancelled meanwhile.
    async fn mark_running(&self, cancel: &CancellationToken) -> bool {
        let mut pause = Duration::from_millis(50);
        loop {
            let started_at = SystemTime::now();
            let next = RunState::Running {
                started_at,
                pid: None,
                stopping: false,
            };
            match self
                .registry
                .transition(self.id, Expect::Queued, next)
                .await
            {
                Ok(_) => {
                    *self.started_mut() = Some((started_at, None));
                    return true;
                }
                Err(e) if e.is_failure() => {
                    tracing::warn!(error = %e, "cannot record the run as running; it waits for the store");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = cancel.cancelled() => return false,
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record the run as running");
                    *self.started_mut() = Some((started_at, None));
                    return true;
                }
            }
        }
    }

    /// Record that a stop has begun (with the pid, if there is one by then).
    async fn mark_stopping(&self) {
        let (started_at, pid) = *self.started_mut().get_or_insert((SystemTime::now(), None));
        let next = RunState::Running {
            started_at,
            pid,
            stopping: true,
        };
        self.record(Expect::Running, next, "cannot record the run's progress")
            .await;
    }

    /// Move the run to `next`; a failure is logged with `failed` (the run goes on).
    async fn record(&self, expect: Expect, next: RunState, failed: &str) {
        if let Err(e) = self.registry.transition(self.id, expect, next).await {
            tracing::warn!(error = %e, "{failed}");
        }
    }
}

impl ProcEvents for RunEvents {
    fn spawned(&self, pid: u32) -> process::EventFuture<'_> {
        if let Some(started) = self.started_mut().as_mut() {
            started.1 = Some(pid);
        }
        self.registry.set_pid(self.id, pid);
        tracing::debug!(pid, "process started");
        Box::pin(std::future::ready(()))
    }

    fn stopping(&self) -> process::EventFuture<'_> {
        Box::pin(self.mark_stopping())
    }
}

/// One run's task: spawn, supervise, persist the output and the final status, release the slot.
async fn drive(inner: Arc<Inner>, p: Pending, ctl: Control, started: Option<SystemTime>) {
    let Pending { id, req } = p;
    let registry = inner.registry.clone();
    let log = registry.live_log(id).unwrap_or_else(|| {
        // A run holding a slot is live until this task retires it; keep going with a detached
        // log rather than leave the slot held.
        tracing::error!("run is not live in the registry");
        Arc::new(OutputLog::new(inner.settings.output))
    });
    let events = RunEvents {
        registry: registry.clone(),
        id,
        started: Mutex::new(started.map(|t| (t, None))),
    };
    let outcome = if ctl.cancel.is_cancelled()
        || (started.is_none() && !events.mark_running(&ctl.cancel).await)
    {
        ctl.cancelled(None)
    } else {
        let mode = req.mode.resolve();
        let mut env: Vec<(OsString, OsString)> = req
            .env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        // Marks every process of the run (inherited by grandchildren): what proves, after a
        // crash, that a leftover process belongs to this run.
        env.push((RUN_MARKER.into(), id.to_string().into()));
        let spec = ProcSpec {
            program: OsString::from(&req.argv[0]),
            args: req.argv[1..].iter().map(OsString::from).collect(),
            cwd: req.cwd.clone(),
            env: Some(env),
            stdin: req.stdin.clone().map(String::into_bytes),
            run_id: Some(id.to_string()),
            limits: req.limits,
            creds: req.run_as.as_ref().map(|u| (u.gid, u.uid)),
        };
        let sup = Supervision {
            cancel: &ctl.cancel,
            timeout: Some(req.timeout),
            kill_grace: inner.settings.kill_grace,
        };
        let sink: Arc<dyn process::Sink> = log.clone();
        match process::run_process(&spec, mode, sink, sup, &events).await {
            Ok(end) => match end.stopped {
                None => match end.limit {
                    Some(limit) => Outcome::LimitExceeded {
                        exit: end.exit,
                        limit,
                    },
                    None => Outcome::Exited(end.exit),
                },
                Some(Stopped::Cancelled) => ctl.cancelled(Some(end.exit)),
                Some(Stopped::TimedOut) => Outcome::TimedOut {
                    exit: Some(end.exit),
                },
            },
            Err(e) => {
                // The log has the whole story; the run (seen by clients) names no server path.
                tracing::warn!(error = %e, "run could not start");
                let msg = e.public_message(&spec);
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
    // Durable now, or (the store cannot write) seen to end now and written once it can.
    registry.finish(id, next).await;
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

    /// The run as it is now (`None` once purged by retention).
    pub async fn run(&self) -> Option<Run> {
        self.runner.get(self.id).await.ok().flatten()
    }

    /// Every output line with `seq > after`: the retained ones first, then live ones as they
    /// arrive; the stream ends when the run's output is complete.
    pub fn lines(&self, after: u64) -> impl FuturesStream<Item = Line> + Send + 'static {
        let cursor = Cursor::new(self.runner.registry().clone(), self.id, after);
        futures_util::stream::unfold(
            (cursor, VecDeque::<Line>::new()),
            |(mut cursor, mut buf)| async move {
                if buf.is_empty() {
                    buf.extend(cursor.next_batch(1024).await?);
                }
                let line = buf.pop_front()?;
                Some((line, (cursor, buf)))
            },
        )
    }

    /// Cancel it (see [`ModuleRunner::cancel`]).
    pub async fn cancel(&self) -> Result<Run, CancelError> {
        self.runner.cancel(self.id).await
    }

    /// Wait for its final status (`None` if there is no such run).
    pub async fn wait(&self) -> Option<Run> {
        self.runner.wait(self.id).await.ok().flatten()
    }
}
