//! The scheduler: the queue (FIFO, bounded), the slots (a global limit plus per-module
//! limits, no head-of-line blocking across modules), recording a submission, starting what
//! fits, and cancelling.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::request::{RunRequest, RunnerSettings, SubmitError};
use super::supervise::drive;
use crate::output::Redactor;
use crate::registry::Registry;
use crate::run::{CancelReason, Exit, Outcome, Run, RunId, RunState};
use crate::store::{Created, Held, NewRun, StoreError};

pub(super) struct Inner {
    pub(super) settings: RunnerSettings,
    pub(super) registry: Arc<Registry>,
    /// Queue, slots and cancel tokens. A std mutex: sections are queue and map operations only
    /// (the registry is never called while it is held), never across `.await`.
    pub(super) sched: Mutex<Sched>,
    /// Owns every run task, so that shutdown can wait for them.
    pub(super) tasks: TaskTracker,
    /// In a cluster: wakes the claimer (a slot was freed, a run was queued). A `Notify` keeps
    /// at most one wake-up: nothing queues.
    pub(super) claim_wake: tokio::sync::Notify,
    /// In a cluster: a run may be waiting in the shared queue (a queued notification, a resync,
    /// the poll, or a claim that found one). A freed slot asks the database only while this is
    /// set, so that a node whose runs come and go does not query an empty queue after each.
    pub(super) claim_hint: std::sync::atomic::AtomicBool,
}

pub(super) struct Sched {
    /// Runs waiting for a slot, in creation order. Bounded: `submit` refuses at `max_queued`
    /// (counting `reserved`).
    pub(super) queue: VecDeque<Pending>,
    /// Submissions that passed the queue check and are being recorded.
    pub(super) reserved: usize,
    /// Runs holding a slot (from dispatch until their final status is recorded).
    pub(super) active: HashMap<RunId, Control>,
    /// Slots held per module id.
    pub(super) per_module: HashMap<String, usize>,
    /// False after shutdown: nothing new starts.
    pub(super) open: bool,
    /// In a cluster: slots reserved by claims in progress.
    pub(super) claiming: usize,
}

pub(super) struct Pending {
    pub(super) id: RunId,
    pub(super) req: RunRequest,
}

/// Cancellation handle of a run holding a slot.
#[derive(Clone)]
pub(super) struct Control {
    pub(super) cancel: CancellationToken,
    /// Why it was cancelled, and by which token; the first reason wins.
    pub(super) reason: Arc<OnceLock<(CancelReason, Option<String>)>>,
    /// In a cluster, the run is queued again if this node is lost.
    pub(super) retryable: bool,
    /// Set when this node gives the run up (its lease lapsed while the store was away): its
    /// end is recorded as `lost` (which queues a retryable run again).
    pub(super) abandoned: Arc<std::sync::atomic::AtomicBool>,
}

impl Control {
    /// The outcome of a cancelled run that ended with `exit`.
    pub(super) fn cancelled(&self, exit: Option<Exit>) -> Outcome {
        if self.abandoned.load(std::sync::atomic::Ordering::Relaxed) {
            return Outcome::Lost;
        }
        let (reason, by) = self
            .reason
            .get()
            .cloned()
            .unwrap_or((CancelReason::Request, None));
        Outcome::Cancelled { reason, exit, by }
    }
}

pub(super) fn submit_error(e: StoreError) -> SubmitError {
    match e {
        StoreError::IdempotencyConflict => SubmitError::IdempotencyConflict,
        StoreError::QueueFull(n) => SubmitError::QueueFull(n),
        other => SubmitError::Store(other),
    }
}

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a run of a module with `limit` may take a slot now.
    pub(super) fn has_slot(&self, s: &Sched, module_id: &str, limit: Option<NonZeroUsize>) -> bool {
        let used = s.per_module.get(module_id).copied().unwrap_or(0);
        s.active.len() + s.claiming < self.settings.max_concurrent.get()
            && limit.is_none_or(|l| used < l.get())
    }

    /// Take a slot for run `id` (the caller checked [`Inner::has_slot`]).
    pub(super) fn take_slot(s: &mut Sched, id: RunId, req: &RunRequest) -> Control {
        *s.per_module.entry(req.module_id.clone()).or_default() += 1;
        let ctl = Control {
            cancel: CancellationToken::new(),
            reason: Arc::new(OnceLock::new()),
            retryable: req.policy.retry_on_lost,
            abandoned: Arc::default(),
        };
        s.active.insert(id, ctl.clone());
        ctl
    }

    /// The body of [`ModuleRunner::submit`], in its own task. Returns the run's id and whether
    /// it is new (false: an idempotent repeat).
    pub(super) async fn record(
        self: &Arc<Self>,
        req: RunRequest,
    ) -> Result<(RunId, bool), SubmitError> {
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
            // In a cluster a module's limit holds across nodes: only a claim can check it.
            let clustered_limit = self.registry.cluster().is_some() && req.max_concurrent.is_some();
            if s.queue.is_empty()
                && !clustered_limit
                && self.has_slot(&s, &req.module_id, req.max_concurrent)
            {
                Some(Self::take_slot(&mut s, id, &req))
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
            attempt: u32::from(direct.is_some()),
            callbacks: req.callbacks.clone(),
            cancel_requested_at: None,
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
                    policy: req.policy,
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
            None if self.registry.cluster().is_some() => {
                // Queued in the shared store: whichever node has a slot claims it.
                self.lock().reserved -= 1;
                tracing::info!(run_id = %id, module = %req.module_id, request_id = req.request_id.as_deref().unwrap_or("-"), "run queued for the cluster");
                self.hint_claim();
            }
            None => {
                {
                    // One section: the place moves from `reserved` to the queue.
                    let mut s = self.lock();
                    s.reserved -= 1;
                    tracing::info!(run_id = %id, module = %req.module_id, request_id = req.request_id.as_deref().unwrap_or("-"), waiting = s.queue.len(), "run queued");
                    s.queue.push_back(Pending { id, req });
                }
                self.dispatch(self);
            }
        }
        Ok((id, true))
    }

    /// Queue a recorded run and start what fits.
    pub(super) fn enqueue(self: &Arc<Self>, p: Pending) {
        tracing::debug!(run_id = %p.id, "run queued");
        self.lock().queue.push_back(p);
        self.dispatch(self);
    }

    /// Spawn the task that drives a run holding a slot (`started`: when it was recorded as
    /// running, if it already was).
    pub(super) fn start(self: &Arc<Self>, p: Pending, ctl: Control, started: Option<SystemTime>) {
        let span = tracing::info_span!(
            parent: None,
            "run",
            run_id = %p.id,
            module = %p.req.module_id,
            request_id = p.req.request_id.as_deref().unwrap_or("-")
        );
        self.tasks
            .spawn(drive(self.clone(), p, ctl, started).instrument(span));
    }

    /// Start every queued run that fits, oldest first, skipping (not waiting behind) runs whose
    /// module is at its limit.
    pub(super) fn dispatch(&self, this: &Arc<Inner>) {
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
                let ctl = Self::take_slot(&mut s, p.id, &p.req);
                starts.push((p, ctl));
            }
        }
        for (p, ctl) in starts {
            this.start(p, ctl, None);
        }
        if self.registry.cluster().is_some() {
            self.claim_wake.notify_one();
        }
    }

    /// In a cluster: a run may be waiting in the shared queue; wake the claimer.
    pub(super) fn hint_claim(&self) {
        self.claim_hint
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.claim_wake.notify_one();
    }

    /// In a cluster: reserve a slot for a claim, if one is free.
    pub(super) fn reserve_claim(&self) -> bool {
        let mut s = self.lock();
        if !s.open || s.active.len() + s.claiming >= self.settings.max_concurrent.get() {
            return false;
        }
        s.claiming += 1;
        true
    }

    /// A claim found nothing (or failed): its reservation goes.
    pub(super) fn unreserve_claim(&self) {
        let mut s = self.lock();
        s.claiming = s.claiming.saturating_sub(1);
    }

    /// A claim took run `id`: its reservation becomes the run's slot.
    pub(super) fn take_reserved_slot(&self, id: RunId, req: &RunRequest) -> Control {
        let mut s = self.lock();
        s.claiming = s.claiming.saturating_sub(1);
        Self::take_slot(&mut s, id, req)
    }

    /// Stop a run holding a slot here (TERM, grace, KILL), if it does; the first reason wins.
    pub(super) fn cancel_active(&self, id: RunId, reason: CancelReason, by: Option<String>) {
        if let Some(ctl) = self.lock().active.get(&id) {
            let _ = ctl.reason.set((reason, by));
            ctl.cancel.cancel();
        }
    }

    /// Give a run holding a slot here up: stop it, and record it `lost` (see
    /// [`Control::abandoned`]).
    pub(super) fn abandon(&self, id: RunId) {
        if let Some(ctl) = self.lock().active.get(&id) {
            ctl.abandoned
                .store(true, std::sync::atomic::Ordering::Relaxed);
            ctl.cancel.cancel();
        }
    }

    /// False once the runner is shutting down.
    pub(super) fn is_open(&self) -> bool {
        self.lock().open
    }

    /// True if run `id` holds a slot here.
    pub(super) fn is_active(&self, id: RunId) -> bool {
        self.lock().active.contains_key(&id)
    }

    /// The runs holding a slot here that may be retried on another node.
    pub(super) fn retryable_active(&self) -> Vec<RunId> {
        self.lock()
            .active
            .iter()
            .filter(|(_, c)| c.retryable)
            .map(|(id, _)| *id)
            .collect()
    }

    pub(super) fn release(&self, this: &Arc<Inner>, id: RunId, module_id: &str) {
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
