//! Getting live runs into the store: the flusher (output every [`FLUSH_EVERY`]), the end of a
//! run (its last output and its final state), the purger (retention), and what happens while
//! the store cannot write.
//!
//! A store outage (a full disk, a read-only file system, a locked database, an I/O error, a
//! database that cannot be reached) is an operating condition, not a crash:
//! - the registry's [`StoreHealth`] says so (readiness reports it, and a new run is refused
//!   with 503 by the store itself);
//! - live runs keep their output in memory, bounded: past the usual backlog, lines are counted,
//!   not kept, and a marker line says how many when writing works again (their children keep
//!   running: readers do not pause during an outage);
//! - a run whose process ends is seen to end at once (in memory); its last output and its final
//!   state are written as soon as the store takes writes again, and only then is it retired;
//! - while nothing else writes, a probe write every [`PROBE_EVERY`] finds out when the store
//!   is back. Nothing needs a restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::Registry;
use crate::output::OutputLog;
use crate::run::{RunId, RunState};
use crate::store::{Expect, Outage, Retention, RunStore, StoreError};

/// How often live output is persisted.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// How often live output is persisted on a store that several nodes share: an SSE client on
/// another node sees a line only once it is in the store, so this bounds that latency (half of
/// it on average). An idle round costs no store call.
pub const CLUSTER_FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Lines per append batch.
const FLUSH_BATCH: usize = 8192;
/// A flush round that moved this much text is followed by another at once: output is arriving
/// faster than [`FLUSH_EVERY`] (and pipe readers may be paused on a full backlog).
const BUSY_BYTES: usize = 256 * 1024;
/// How often retention runs.
const PURGE_EVERY: Duration = Duration::from_secs(1);
/// How often, during an outage, the flusher tries the store again (pending run ends, a probe).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Attempts at a run's end before it is left to the flusher: the first, then one after
/// [`QUICK_RETRY`] (a busy store may pass at once).
const QUICK_RETRY: Duration = Duration::from_millis(50);

/// Whether the store takes writes, as the last write found. A std mutex: each section reads or
/// sets one field.
#[derive(Debug, Default)]
pub struct StoreHealth {
    outage: Mutex<Option<(Outage, Instant)>>,
}

impl StoreHealth {
    /// The outage in progress, if there is one.
    pub fn outage(&self) -> Option<Outage> {
        self.lock().map(|(o, _)| o)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Outage, Instant)>> {
        self.outage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take in the result of a write: an outage begins, ends, or goes on (each change is
    /// logged once).
    pub fn note<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Err(StoreError::Unavailable(o, detail)) => {
                let mut s = self.lock();
                if s.is_none() {
                    tracing::error!(outage = %o, detail = %detail, "the run store cannot be written: new runs get 503 until it recovers");
                }
                *s = Some((*o, s.map_or_else(Instant::now, |(_, since)| since)));
            }
            Ok(_) => {
                let mut s = self.lock();
                if let Some((o, since)) = s.take() {
                    tracing::warn!(outage = %o, lasted_ms = since.elapsed().as_millis() as u64, "the run store takes writes again");
                }
            }
            Err(_) => {}
        }
    }
}

impl Registry {
    /// Persist one log's pending lines, keeping the health and the log's outage mode in step.
    async fn flush_one(&self, id: RunId, log: &OutputLog) -> Result<usize, StoreError> {
        let _turn = log.flush_turn().await;
        let result = flush_log(&*self.store, id, log).await;
        self.health.note(&result);
        match &result {
            Ok(_) => log.set_outage(false),
            Err(StoreError::Unavailable(..)) => log.set_outage(true),
            Err(e) => tracing::warn!(run_id = %id, error = %e, "cannot persist output; will retry"),
        }
        result
    }

    /// Persist every live run's pending output, once; returns how many bytes of text went.
    pub async fn flush_all(&self) -> usize {
        let logs: Vec<(RunId, Arc<OutputLog>)> = self
            .lock()
            .iter()
            .map(|(id, l)| (*id, l.log.clone()))
            .collect();
        let mut flushed = 0;
        for (id, log) in logs {
            match self.flush_one(id, &log).await {
                Ok(n) => flushed += n,
                // The store is away: the other logs would fail the same way.
                Err(StoreError::Unavailable(..)) => {
                    self.outage_for_all();
                    break;
                }
                Err(_) => {}
            }
        }
        flushed
    }

    /// Every live log holds its output in memory (and its readers stop pausing) until the store
    /// takes writes again.
    fn outage_for_all(&self) {
        for live in self.lock().values() {
            live.log.set_outage(true);
        }
    }

    /// A run's process has ended and its log is closed: persist its last output and its final
    /// state, then retire it. If the store cannot take them now, the run ends in memory at once
    /// (its readers see it end) and stays live until the flusher has written both.
    pub async fn finish(&self, id: RunId, next: RunState) {
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let r = async {
                if let Some(live) = self.lock().get(&id)
                    && !Expect::Active.allows(&live.run.state)
                {
                    return Err(StoreError::WrongState(Box::new(live.snapshot())));
                }
                self.persist_end(id, next.clone()).await?;
                self.apply_transition(id, next.clone()).await
            }
            .await;
            match r {
                Err(e) if e.is_failure() && attempt < 2 => tokio::time::sleep(QUICK_RETRY).await,
                r => break r,
            }
        };
        match result {
            Ok(run) => {
                let duration_ms = run
                    .started_at()
                    .zip(run.finished_at())
                    .and_then(|(a, b)| b.duration_since(a).ok())
                    .map(crate::telemetry::millis);
                tracing::info!(
                    status = %run.status(),
                    exit_code = run.exit_code(),
                    signal = run.signal(),
                    duration_ms,
                    "run finished"
                );
                self.retire(id);
                self.ended.notify_one();
            }
            Err(StoreError::Fenced(_)) => {
                // Another node runs it now: its end is that node's to write.
                tracing::warn!(
                    "the run was taken over by another node; its end here is not recorded"
                );
                self.finish_in_memory(id, next);
                self.retire(id);
            }
            Err(e) if e.is_failure() => {
                tracing::warn!(error = %e, "the run's end cannot be written now; it will be once the store takes writes");
                self.finish_in_memory(id, next.clone());
                self.pending_lock().push((id, next));
            }
            Err(e) => {
                tracing::error!(error = %e, "the store refused the run's end");
                self.finish_in_memory(id, next);
                self.retire(id);
            }
        }
    }

    /// Write a run's last output and its final state: in one store write when the output left
    /// fits one batch (the usual case), so a run's end costs one commit. Keeps the health and
    /// the log's outage mode in step, as a flush round does.
    async fn persist_end(&self, id: RunId, next: RunState) -> Result<(), StoreError> {
        let Some(log) = self.live_log(id) else {
            let r = self.store.transition(id, Expect::Active, next).await;
            self.health.note(&r);
            return r;
        };
        let _turn = log.flush_turn().await;
        let result = async {
            loop {
                let batch = log.unflushed(FLUSH_BATCH);
                let last = batch.last().map(|l| l.seq);
                if batch.len() < FLUSH_BATCH {
                    let ended = self.store.finish(id, batch, Expect::Active, next).await;
                    if let Err(e) = &ended
                        && !e.is_failure()
                        && !matches!(e, StoreError::Fenced(_))
                    {
                        // A refused end writes nothing: the run's last lines go all the same.
                        let rest = log.unflushed(FLUSH_BATCH);
                        let last = rest.last().map(|l| l.seq);
                        if self.store.append_output(id, rest).await.is_ok()
                            && let Some(last) = last
                        {
                            log.mark_flushed(last);
                        }
                        return ended;
                    }
                    ended?;
                    if let Some(last) = last {
                        log.mark_flushed(last);
                    }
                    return Ok(());
                }
                self.store.append_output(id, batch).await?;
                if let Some(last) = last {
                    log.mark_flushed(last);
                }
            }
        }
        .await;
        self.health.note(&result);
        match &result {
            Ok(()) => log.set_outage(false),
            Err(StoreError::Unavailable(..)) => log.set_outage(true),
            Err(_) => {}
        }
        result
    }

    fn pending_lock(&self) -> std::sync::MutexGuard<'_, Vec<(RunId, RunState)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs whose end is not written yet.
    pub fn pending_ends(&self) -> usize {
        self.pending_lock().len()
    }

    /// Write the ends that an outage held back (their output first), oldest first; stop at the
    /// first that still fails.
    async fn settle_pending(&self) {
        let pending: Vec<(RunId, RunState)> = self.pending_lock().clone();
        for (id, state) in pending {
            match self.persist_end(id, state).await {
                Err(e) if e.is_failure() => return,
                Err(e) => {
                    tracing::error!(run_id = %id, error = %e, "the store refused the run's end")
                }
                Ok(()) => {
                    tracing::info!(run_id = %id, "run's end written after the store came back")
                }
            }
            self.pending_lock().retain(|(p, _)| *p != id);
            self.retire(id);
            self.ended.notify_one();
        }
    }

    /// Flush every [`FLUSH_EVERY`] (`CLUSTER_FLUSH_EVERY` on a shared store) until `stop`
    /// fires, then once more. While output arrives
    /// faster than that, flush again at once (pipe readers may be paused on a full backlog).
    /// During an outage, also write held-back run ends and probe the store every
    /// [`PROBE_EVERY`].
    pub async fn flush_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut busy = false;
        let mut last_try = Instant::now();
        let every = if self.cluster().is_some() {
            CLUSTER_FLUSH_EVERY
        } else {
            FLUSH_EVERY
        };
        loop {
            let pause = if busy { Duration::ZERO } else { every };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => break,
            }
            let degraded = self.health.outage().is_some();
            if degraded && last_try.elapsed() < PROBE_EVERY {
                continue;
            }
            last_try = Instant::now();
            busy = self.flush_all().await >= BUSY_BYTES;
            if self.pending_ends() > 0 {
                self.settle_pending().await;
            } else if self.health.outage().is_some() {
                let r = self.store.probe().await;
                self.health.note(&r);
            }
        }
        self.flush_all().await;
        self.settle_pending().await;
        let left = self.pending_ends();
        if left > 0 {
            tracing::error!(
                runs = left,
                "stopping with run ends the store never took: those runs will show as lost"
            );
        }
    }

    /// Apply retention every second until `stop` fires.
    pub async fn purge_loop(self: Arc<Self>, policy: Retention, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(PURGE_EVERY) => {}
                () = stop.cancelled() => return,
            }
            if self.health.outage().is_some() {
                continue;
            }
            loop {
                let r = self.store.purge(policy, SystemTime::now()).await;
                self.health.note(&r);
                match r {
                    Ok(0) => break,
                    Ok(n) => {
                        self.forget_recent();
                        tracing::debug!(removed = n, "retention purge");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "retention purge failed");
                        break;
                    }
                }
                if stop.is_cancelled() {
                    return;
                }
            }
        }
    }
}

/// Persist a log's pending lines; returns how many bytes of text went.
async fn flush_log(store: &dyn RunStore, id: RunId, log: &OutputLog) -> Result<usize, StoreError> {
    let mut flushed = 0;
    loop {
        let batch = log.unflushed(FLUSH_BATCH);
        let Some(last) = batch.last().map(|l| l.seq) else {
            return Ok(flushed);
        };
        let n = batch.len();
        let bytes: usize = batch.iter().map(|l| l.text.len()).sum();
        store.append_output(id, batch).await?;
        log.mark_flushed(last);
        flushed += bytes;
        if n < FLUSH_BATCH {
            return Ok(flushed);
        }
    }
}
