//! The [`ModuleRunner`]: queues runs, starts them when a slot is free (a global limit plus
//! per-module limits, FIFO within a module, no head-of-line blocking across modules), supervises
//! each one in its own tracked task, and cancels them. The HTTP service is built on it, and a
//! Rust program can embed it directly.
//!
//! ```
//! use std::time::{Duration, SystemTime};
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

mod cluster;
mod execute;
mod fd_table;
mod group;
mod handle;
pub mod jail;
pub(crate) mod process;
mod program;
mod request;
mod sched;
mod spawn;
mod supervise;

pub use cluster::RequestBuilder;
pub use execute::{ExecError, ModuleOutput, execute_module};
pub use handle::RunHandle;
pub use program::check_module_program;
pub use request::{CancelError, RunRequest, RunnerSettings, SubmitError, Submitted};

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::registry::Registry;
use crate::run::{CancelReason, Run, RunId, RunState};
use crate::store::{CancelAck, Expect, ListQuery, MemoryStore, Page, StoreError};
use sched::{Inner, Pending, Sched, submit_error};

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
        // The low descriptor numbers children's stdio goes through, taken while they are low.
        fd_table::Reserved::get();
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
                    claiming: 0,
                }),
                tasks: TaskTracker::new(),
                claim_wake: tokio::sync::Notify::new(),
                claim_hint: std::sync::atomic::AtomicBool::new(true),
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

    /// This node's queued runs and runs holding a slot, by module id (for the metrics; the
    /// catalog's module list is the caller's to add).
    pub fn load(&self) -> crate::metrics::Load {
        let s = self.inner.lock();
        let mut queued: std::collections::HashMap<&str, usize> = Default::default();
        for p in &s.queue {
            *queued.entry(p.req.module_id.as_str()).or_default() += 1;
        }
        let queued = queued.into_iter().map(|(m, n)| (m.to_owned(), n)).collect();
        let running = s
            .per_module
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(m, n)| (m.clone(), *n))
            .collect();
        crate::metrics::Load {
            queued,
            running,
            modules: Vec::new(),
        }
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
        if let Some(cluster) = registry.cluster()
            && !self.inner.is_active(id)
        {
            // Queued in the shared store, or running on another node.
            return match cluster.request_cancel(id, by).await {
                Ok(CancelAck::NotFound) => Err(CancelError::NotFound(id)),
                Ok(CancelAck::CancelledQueued(run) | CancelAck::RequestedRunning(run)) => Ok(run),
                Ok(CancelAck::AlreadyFinished(run)) => {
                    Err(CancelError::AlreadyFinished(Box::new(run)))
                }
                Err(e) => Err(CancelError::Store(e)),
            };
        }
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
            let next = RunState::cancelled_while_queued(by);
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
        if signalled && let Err(e) = registry.cancel_requested(id, SystemTime::now()).await {
            // The run is being stopped all the same; only the time of the request is not kept.
            tracing::warn!(run_id = %id, error = %e, "cannot record the cancel request");
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
            let Some(cluster) = registry.cluster() else {
                return registry.get(id).await;
            };
            // Queued, or running on another node: the store's hints, and a poll.
            let mut changes = cluster.watch(id);
            loop {
                changes.borrow_and_update();
                match registry.get(id).await? {
                    Some(run) if !run.state.is_finished() => {}
                    other => return Ok(other),
                }
                if registry.live_log(id).is_some() {
                    // It was claimed here meanwhile.
                    return Box::pin(self.wait(id)).await;
                }
                tokio::select! {
                    _ = changes.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        };
        let mut changes = log.subscribe();
        loop {
            changes.borrow_and_update();
            // A copy of the run only once it has finished (or left the live runs), not at
            // every change (each line, the pid).
            if registry.live_finished(id) != Some(false) {
                match registry.get(id).await? {
                    Some(run) if !run.state.is_finished() => {}
                    other => return Ok(other),
                }
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

    /// In a cluster (a store several nodes share): claim queued runs, renew this node's lease,
    /// reap lost nodes' runs, and act on cancels, until `stop` fires. `builder` turns a claimed
    /// run into its request. `None` for a store of one node.
    pub fn cluster_loop(
        &self,
        builder: Arc<RequestBuilder>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let cluster = self.inner.registry.cluster()?.clone();
        Some(cluster::run(self.inner.clone(), cluster, builder, stop))
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
