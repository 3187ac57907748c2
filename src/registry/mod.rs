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
//! - A store that cannot write (`persist`) makes live runs hold their output in bounded memory
//!   and their end in `pending`, until the flusher finds the store writable again.
//!
//! `cursor` is a reader's position in a run's output (replay, then live); `events` is the
//! feed of run changes (`GET /events`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::metrics::Metrics;
use crate::output::{Evicted, OutputLimits, OutputLog, Redactor};
use crate::run::{Line, Run, RunId, RunState};
use crate::store::{
    Cluster, Created, Expect, IdempotencyKey, ListQuery, NewRun, Page, RunStore, StoreError,
};

mod cursor;
pub mod events;
mod persist;

pub use cursor::Cursor;
pub use events::RunFeed;
pub use persist::{FLUSH_EVERY, PROBE_EVERY, StoreHealth};

/// Live runs in front of a store.
pub struct Registry {
    store: Arc<dyn RunStore>,
    /// What the store adds when several nodes share it.
    cluster: Option<Arc<dyn Cluster>>,
    /// Live runs. A std mutex: sections are map operations and clones, never I/O or `.await`.
    /// Bounded: queued runs (at most `max_queued`), runs holding a slot, and runs whose end an
    /// outage held back (see `pending`).
    live: Mutex<HashMap<RunId, Live>>,
    /// Runs retired lately, newest last: most reads of a finished run come right after it
    /// finished (`?wait`, the SSE `end`, pollers), and this spares them a store read. Bounded:
    /// [`RECENT`] entries, the oldest dropped first. A std mutex, like `live`.
    recent: Mutex<(HashMap<RunId, Run>, VecDeque<RunId>)>,
    limits: OutputLimits,
    /// Whether the store takes writes.
    health: StoreHealth,
    /// Runs that ended while the store could not write: their final state, written (and the
    /// run retired) by the flusher once it can. A std mutex, like `live`. Bounded: runs end
    /// only after holding a slot, and no run starts while its start cannot be recorded.
    pending: Mutex<Vec<(RunId, RunState)>>,
    /// The server's metrics (runs, output, store writes).
    metrics: Arc<Metrics>,
    /// Every creation and status change of a run here, for `GET /events`.
    feed: RunFeed,
    /// Fired when a run's end is written (its completion callbacks are due). A `Notify` keeps
    /// at most one wake-up: nothing queues.
    ended: Arc<tokio::sync::Notify>,
}

/// Finished runs kept in the registry's recent cache.
const RECENT: usize = 1024;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub(crate) struct Live {
    run: Run,
    pub(crate) log: Arc<OutputLog>,
}

impl Live {
    fn snapshot(&self) -> Run {
        let mut run = self.run.clone();
        run.output_lines = self.log.last_seq();
        run
    }

    /// The run as [`Live::snapshot`] shows it, without a copy.
    fn into_run(self) -> Run {
        let mut run = self.run;
        run.output_lines = self.log.last_seq();
        run
    }
}

impl Registry {
    /// A registry over `store`, with output `limits` for new runs.
    pub fn new(store: Arc<dyn RunStore>, limits: OutputLimits) -> Self {
        Self::with_metrics(store, limits, Arc::new(Metrics::new()))
    }

    /// [`Registry::new`], counting into `metrics` (which the store's writes may share).
    pub fn with_metrics(
        store: Arc<dyn RunStore>,
        limits: OutputLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            ended: Arc::default(),
            cluster: store.clone().cluster(),
            store,
            live: Mutex::new(HashMap::new()),
            recent: Mutex::default(),
            limits,
            health: StoreHealth::default(),
            pending: Mutex::default(),
            feed: RunFeed::default(),
        }
    }

    /// The feed of run changes.
    pub fn feed(&self) -> &RunFeed {
        &self.feed
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<RunId, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Fired whenever a run's end has been written.
    pub fn ended(&self) -> Arc<tokio::sync::Notify> {
        self.ended.clone()
    }

    /// The store behind it.
    pub fn store(&self) -> &Arc<dyn RunStore> {
        &self.store
    }

    /// What the store adds when several nodes share it (`None` for a store of one node).
    pub fn cluster(&self) -> Option<&Arc<dyn Cluster>> {
        self.cluster.as_ref()
    }

    /// Whether the store takes writes, as the last write found.
    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    /// Record a new run (durably) and make it live; its output masks the secrets of
    /// `redactor`.
    pub async fn create(
        &self,
        new: NewRun,
        redactor: Option<Arc<Redactor>>,
    ) -> Result<Created, StoreError> {
        let created = self.store.create(new).await;
        self.health.note(&created);
        let created = created?;
        if let Created::New(run) = &created {
            // In a cluster a queued run belongs to whichever node claims it: it becomes live
            // there, not here.
            let queued_elsewhere = self.cluster.is_some() && matches!(run.state, RunState::Queued);
            if !queued_elsewhere {
                self.adopt(run.clone(), redactor, 0);
            }
            if self.feed.watched() {
                self.feed.publish(run.clone());
            }
        }
        Ok(created)
    }

    /// Make a stored run live (a queued run found at start-up, a run claimed in a cluster):
    /// its output goes on after line `after_seq`.
    pub fn adopt(&self, run: Run, redactor: Option<Arc<Redactor>>, after_seq: u64) {
        let log = OutputLog::redacting(self.limits, redactor)
            .starting_after(after_seq)
            .metered(self.metrics.output_meter(&run.module_id));
        let log = Arc::new(log);
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

    /// Whether run `id`, live on this node, has finished (`None`: it is not live here). No copy
    /// of the run is made.
    pub fn live_finished(&self, id: RunId) -> Option<bool> {
        self.lock().get(&id).map(|l| l.run.state.is_finished())
    }

    /// When a live run was created.
    pub fn created_at(&self, id: RunId) -> Option<std::time::SystemTime> {
        self.lock().get(&id).map(|l| l.run.created_at)
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

    /// A cancel was asked for running run `id` at `at`: shown at once (a live run) and
    /// written to the store (kept after the run ends). The first request's time stays.
    pub async fn cancel_requested(&self, id: RunId, at: SystemTime) -> Result<(), StoreError> {
        let live = {
            let mut map = self.lock();
            map.get_mut(&id).map(|live| {
                live.run.cancel_requested_at.get_or_insert(at);
                (live.snapshot(), live.log.clone())
            })
        };
        if let Some((run, log)) = live {
            log.touch();
            self.feed.publish(run);
        }
        let written = self.store.cancel_requested(id, at).await;
        self.health.note(&written);
        written
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
        let written = self.store.transition(id, expect, next.clone()).await;
        self.health.note(&written);
        written?;
        self.apply_transition(id, next).await
    }

    /// A transition to `next` is durable: take it here, wake the run's readers, and return
    /// the run as it is now.
    async fn apply_transition(&self, id: RunId, next: RunState) -> Result<Run, StoreError> {
        let live = {
            let mut map = self.lock();
            map.get_mut(&id).map(|live| {
                live.run.state = next;
                (live.snapshot(), live.log.clone())
            })
        };
        let run = match live {
            Some((run, log)) => {
                log.touch();
                run
            }
            // Not live (a run recovered at start-up): the store has the whole record.
            None => self.store.get(id).await?.ok_or(StoreError::NotFound(id))?,
        };
        if self.feed.watched() {
            self.feed.publish(run.clone());
        }
        Ok(run)
    }

    /// The store refused a run's final state: take it here anyway (memory only), so that the run
    /// is seen to end. Wakes the run's readers.
    pub fn finish_in_memory(&self, id: RunId, state: RunState) {
        self.update_live(id, |s| *s = state);
        let run = self.lock().get(&id).map(Live::snapshot);
        if let Some(run) = run {
            self.feed.publish(run);
        }
    }

    /// A run is finished and its output persisted: serve it from the store from now on.
    /// (Readers holding its log keep it.)
    pub fn retire(&self, id: RunId) {
        let Some(live) = self.lock().remove(&id) else {
            return;
        };
        let run = live.into_run();
        // In a cluster the store is the truth: another node may purge the run, or (a run this
        // node gave up) start it again.
        if !run.state.is_finished() || self.cluster.is_some() {
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
    pub(crate) fn forget_recent(&self) {
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
}
