//! The registry: live runs in memory in front of the store.
//!
//! A run is *live* from creation until its final status and all its output are persisted: its
//! record and its [`OutputLog`] sit in a map here, so that the hot path (pipe readers, SSE
//! readers, status reads) never waits on the store. Everything else comes from the store.
//!
//! - Record changes go to the store first and are applied here once durable, so whatever a
//!   client is shown survives a crash.
//! - Output is persisted by a flusher task every [`FLUSH_EVERY`] (and at the end of each run),
//!   in batches; a log then keeps only a window of persisted lines, and readers that fall
//!   behind it read from the store. A crash loses at most the last flush interval of output.
//! - A purger task applies retention in batches.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::output::{Evicted, OutputLimits, OutputLog, Redactor};
use crate::run::{Line, Run, RunId, RunState};
use crate::store::{
    Created, Expect, IdempotencyKey, ListQuery, NewRun, Page, Retention, RunStore, StoreError,
};

/// How often live output is persisted.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Lines per append batch.
const FLUSH_BATCH: usize = 8192;
/// A flush round that moved this much text is followed by another at once: output is arriving
/// faster than [`FLUSH_EVERY`] (and pipe readers may be paused on a full backlog).
const BUSY_BYTES: usize = 256 * 1024;
/// How often retention runs.
const PURGE_EVERY: Duration = Duration::from_secs(1);

/// Live runs in front of a store.
pub struct Registry {
    store: Arc<dyn RunStore>,
    /// Live runs. A std mutex: sections are map operations and clones, never I/O or `.await`.
    /// Bounded: queued runs (at most `max_queued`) plus runs holding a slot.
    live: Mutex<HashMap<RunId, Live>>,
    /// Runs retired lately, newest last: most reads of a finished run come right after it
    /// finished (`?wait`, the SSE `end`, pollers), and this spares them a store read. Bounded:
    /// [`RECENT`] entries, the oldest dropped first. A std mutex, like `live`.
    recent: Mutex<(HashMap<RunId, Run>, VecDeque<RunId>)>,
    limits: OutputLimits,
}

/// Finished runs kept in the registry's recent cache.
const RECENT: usize = 1024;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Live {
    run: Run,
    log: Arc<OutputLog>,
}

impl Live {
    fn snapshot(&self) -> Run {
        let mut run = self.run.clone();
        run.output_lines = self.log.last_seq();
        run
    }
}

impl Registry {
    /// A registry over `store`, with output `limits` for new runs.
    pub fn new(store: Arc<dyn RunStore>, limits: OutputLimits) -> Self {
        Self {
            store,
            live: Mutex::new(HashMap::new()),
            recent: Mutex::default(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RunId, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store behind it.
    pub fn store(&self) -> &Arc<dyn RunStore> {
        &self.store
    }

    /// Record a new run (durably) and make it live; its output masks the secrets of
    /// `redactor`.
    pub async fn create(
        &self,
        new: NewRun,
        redactor: Option<Arc<Redactor>>,
    ) -> Result<Created, StoreError> {
        let created = self.store.create(new).await?;
        if let Created::New(run) = &created {
            self.adopt(run.clone(), redactor);
        }
        Ok(created)
    }

    /// Make a stored run live again (a queued run found at start-up).
    pub fn adopt(&self, run: Run, redactor: Option<Arc<Redactor>>) {
        let log = Arc::new(OutputLog::redacting(self.limits, redactor));
        self.lock().insert(run.id, Live { run, log });
    }

    /// The run a key was used for.
    pub async fn find_idempotent(&self, key: &IdempotencyKey) -> Result<Option<Run>, StoreError> {
        self.store.find_idempotent(key).await
    }

    /// A run as it is now.
    pub async fn get(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        if let Some(live) = self.lock().get(&id) {
            return Ok(Some(live.snapshot()));
        }
        if let Some(run) = self.recent_lock().0.get(&id) {
            return Ok(Some(run.clone()));
        }
        self.store.get(id).await
    }

    fn recent_lock(&self) -> MutexGuard<'_, (HashMap<RunId, Run>, VecDeque<RunId>)> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The output log of a live run.
    pub fn live_log(&self, id: RunId) -> Option<Arc<OutputLog>> {
        self.lock().get(&id).map(|l| l.log.clone())
    }

    /// A running run's child has its pid. Recorded here only (and shown at once); it reaches
    /// the store with the run's next transition (stop or finish), which spares every run a
    /// commit. (After a crash the lost run's leftovers are found by their environment marker,
    /// not by pid.) Wakes the run's readers.
    pub fn set_pid(&self, id: RunId, pid: u32) {
        self.update_live(id, |state| {
            if let RunState::Running { pid: p, .. } = state {
                *p = Some(pid);
            }
        });
    }

    /// Change a live run's state in memory only, then wake its readers. Nothing for a run that
    /// is not live.
    fn update_live(&self, id: RunId, change: impl FnOnce(&mut RunState)) {
        let log = {
            let mut map = self.lock();
            let Some(live) = map.get_mut(&id) else { return };
            change(&mut live.run.state);
            live.log.clone()
        };
        log.touch();
    }

    /// Move a run to `next` if its state is one `expect` allows: checked here, then in the
    /// store; applied here once durable. Wakes the run's readers.
    pub async fn transition(
        &self,
        id: RunId,
        expect: Expect,
        next: RunState,
    ) -> Result<Run, StoreError> {
        if let Some(live) = self.lock().get(&id)
            && !expect.allows(&live.run.state)
        {
            return Err(StoreError::WrongState(Box::new(live.snapshot())));
        }
        self.store.transition(id, expect, next.clone()).await?;
        let live = {
            let mut map = self.lock();
            map.get_mut(&id).map(|live| {
                live.run.state = next;
                (live.snapshot(), live.log.clone())
            })
        };
        match live {
            Some((run, log)) => {
                log.touch();
                Ok(run)
            }
            // Not live (a run recovered at start-up): the store has the whole record.
            None => self.store.get(id).await?.ok_or(StoreError::NotFound(id)),
        }
    }

    /// The store refused a run's final state: take it here anyway (memory only), so that the run
    /// is seen to end. Wakes the run's readers.
    pub fn finish_in_memory(&self, id: RunId, state: RunState) {
        self.update_live(id, |s| *s = state);
    }

    /// A run is finished and its output persisted: serve it from the store from now on.
    /// (Readers holding its log keep it.)
    pub fn retire(&self, id: RunId) {
        let Some(live) = self.lock().remove(&id) else {
            return;
        };
        let run = live.snapshot();
        if !run.state.is_finished() {
            return;
        }
        let mut recent = self.recent_lock();
        let (map, order) = &mut *recent;
        map.insert(id, run);
        order.push_back(id);
        while order.len() > RECENT {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// Forget cached copies of runs the store no longer has (after a purge).
    fn forget_recent(&self) {
        let mut recent = self.recent_lock();
        recent.0.clear();
        recent.1.clear();
    }

    /// Up to `limit` lines of a run with `seq > after`; `None` if there is no such run.
    pub async fn read_output(
        &self,
        id: RunId,
        after: u64,
        limit: usize,
    ) -> Result<Option<Vec<Line>>, StoreError> {
        if let Some(log) = self.live_log(id) {
            return match log.read_after(after, limit) {
                Ok(lines) => Ok(Some(lines)),
                Err(Evicted) => self.store.read_output(id, after, limit).await.map(Some),
            };
        }
        if self.store.get(id).await?.is_none() {
            return Ok(None);
        }
        self.store.read_output(id, after, limit).await.map(Some)
    }

    /// A page of runs, newest first (live runs show their current line count).
    pub async fn list(&self, query: ListQuery) -> Result<Page, StoreError> {
        let mut page = self.store.list(query).await?;
        let map = self.lock();
        for run in &mut page.runs {
            if let Some(live) = map.get(&run.id) {
                *run = live.snapshot();
            }
        }
        Ok(page)
    }

    /// Persist the output a live run has not persisted yet.
    pub async fn flush(&self, id: RunId) -> Result<(), StoreError> {
        let Some(log) = self.live_log(id) else {
            return Ok(());
        };
        flush_log(&*self.store, id, &log).await.map(drop)
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
            match flush_log(&*self.store, id, &log).await {
                Ok(n) => flushed += n,
                Err(e) => {
                    tracing::warn!(run_id = %id, error = %e, "cannot persist output; will retry")
                }
            }
        }
        flushed
    }

    /// Flush every [`FLUSH_EVERY`] until `stop` fires, then once more. While output arrives
    /// faster than that, flush again at once (pipe readers may be paused on a full backlog).
    pub async fn flush_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut busy = false;
        loop {
            let pause = if busy { Duration::ZERO } else { FLUSH_EVERY };
            tokio::select! {
                () = tokio::time::sleep(pause) => busy = self.flush_all().await >= BUSY_BYTES,
                () = stop.cancelled() => break,
            }
        }
        self.flush_all().await;
    }

    /// Apply retention every second until `stop` fires.
    pub async fn purge_loop(self: Arc<Self>, policy: Retention, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(PURGE_EVERY) => {}
                () = stop.cancelled() => return,
            }
            loop {
                match self.store.purge(policy, SystemTime::now()).await {
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

/// A reader's position in a run's output: replay from any seq (from memory or the store),
/// then live, with no gap and no duplicate.
pub struct Cursor {
    registry: Arc<Registry>,
    id: RunId,
    log: Option<Arc<OutputLog>>,
    changes: Option<watch::Receiver<u64>>,
    after: u64,
}

impl Cursor {
    /// Start reading a run's output after line `after` (0 for the beginning).
    pub fn new(registry: Arc<Registry>, id: RunId, after: u64) -> Self {
        let log = registry.live_log(id);
        let changes = log.as_ref().map(|l| l.subscribe());
        Self {
            registry,
            id,
            log,
            changes,
            after,
        }
    }

    /// Mark every change so far as seen: a following [`Cursor::changed`] fires only for newer
    /// ones. Call it *before* looking at the run's status or lines, then wait.
    pub fn mark_seen(&mut self) {
        if let Some(c) = &mut self.changes {
            c.borrow_and_update();
        }
    }

    /// The next lines available now (at most `max`), without waiting for new ones.
    pub async fn read(&mut self, max: usize) -> Result<Vec<Line>, StoreError> {
        let lines = match &self.log {
            Some(log) => match log.read_after(self.after, max) {
                Ok(lines) => lines,
                Err(Evicted) => {
                    self.registry
                        .store
                        .read_output(self.id, self.after, max)
                        .await?
                }
            },
            None => {
                self.registry
                    .store
                    .read_output(self.id, self.after, max)
                    .await?
            }
        };
        if let Some(last) = lines.last() {
            self.after = last.seq;
        }
        Ok(lines)
    }

    /// Wait for a change after the last [`Cursor::mark_seen`] (never, for a run that was not
    /// live: it will not change).
    pub async fn changed(&mut self) {
        match &mut self.changes {
            // The sender lives in the log, which this cursor keeps alive: this cannot fail.
            Some(c) => {
                let _ = c.changed().await;
            }
            None => std::future::pending().await,
        }
    }

    /// The next batch of lines, waiting for them; `None` once all output has been read (or the
    /// store failed).
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<Line>> {
        loop {
            self.mark_seen();
            let closed = self.log.as_ref().is_none_or(|l| l.is_closed());
            let lines = match self.read(max).await {
                Ok(lines) => lines,
                Err(e) => {
                    tracing::warn!(run_id = %self.id, error = %e, "cannot read output");
                    return None;
                }
            };
            if !lines.is_empty() {
                return Some(lines);
            }
            if closed {
                return None;
            }
            self.changed().await;
        }
    }
}
