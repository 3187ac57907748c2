//! One run's task: record the start, spawn and supervise the process (through
//! `process::run_process`), record its progress, then hand its end to the registry and give the
//! slot back.

use std::ffi::OsString;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::RUN_MARKER;
use super::process::{self, ProcEvents, ProcSpec, Stopped, Supervision};
use super::sched::{Control, Inner, Pending};
use crate::output::OutputLog;
use crate::registry::Registry;
use crate::run::{Outcome, RunId, RunState, Stream};
use crate::store::Expect;

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
        tracing::info!(pid, "run started");
        Box::pin(std::future::ready(()))
    }

    fn stopping(&self) -> process::EventFuture<'_> {
        Box::pin(self.mark_stopping())
    }
}

/// One run's task: spawn, supervise, persist the output and the final status, release the slot.
pub(super) async fn drive(
    inner: Arc<Inner>,
    p: Pending,
    ctl: Control,
    started: Option<SystemTime>,
) {
    let Pending { id, mut req } = p;
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
    let metrics = registry.metrics().module(&req.module_id);
    let created_at = registry.created_at(id);
    let outcome = if ctl.cancel.is_cancelled()
        || (started.is_none() && !events.mark_running(&ctl.cancel).await)
    {
        ctl.cancelled(None)
    } else {
        metrics.started.inc();
        if let (Some(created), Some((started, _))) = (created_at, events.started()) {
            let waited = started.duration_since(created).unwrap_or_default();
            metrics.queue_wait.observe(waited.as_secs_f64());
        }
        let mode = req.mode.resolve();
        // The request's strings move into the process spec (no copy of each).
        let mut env: Vec<(OsString, OsString)> = Vec::with_capacity(req.env.len() + 1);
        env.extend(
            std::mem::take(&mut req.env)
                .into_iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        // Marks every process of the run (inherited by grandchildren): what proves, after a
        // crash, that a leftover process belongs to this run.
        env.push((RUN_MARKER.into(), id.to_string().into()));
        let mut argv = std::mem::take(&mut req.argv)
            .into_iter()
            .map(OsString::from);
        let spec = ProcSpec {
            program: argv.next().unwrap_or_default(),
            args: argv.collect(),
            cwd: std::mem::take(&mut req.cwd),
            env: Some(env),
            stdin: req.stdin.take().map(String::into_bytes),
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
                metrics.spawn_failures.inc();
                Outcome::SpawnFailed(msg)
            }
        }
    };
    log.close();
    let (started_at, pid) = match events.started() {
        Some((t, pid)) => (Some(t), pid),
        None => (None, None),
    };
    let finished_at = SystemTime::now();
    let next = RunState::Finished {
        started_at,
        pid,
        finished_at,
        outcome,
    };
    let ran = started_at.map(|s| finished_at.duration_since(s).unwrap_or_default());
    metrics.finished(next.status(), ran);
    if log.truncated() {
        metrics.truncated.inc();
    }
    // Durable now, or (the store cannot write) seen to end now and written once it can.
    registry.finish(id, next).await;
    inner.release(&inner, id, &req.module_id);
}
