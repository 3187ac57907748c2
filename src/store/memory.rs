//! The in-memory store (`storage.path = ""`): records in an ordered map (UUID v7 ids sort by
//! creation), output beside them, retention by count and age. Nothing survives a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use super::{
    Created, DeliveryResult, DeliveryState, DeliveryStatus, DueDelivery, Expect, IdempotencyKey,
    ListQuery, NewRun, Page, Recovered, Retention, RunStore, StoreError, StoreFuture,
};
use crate::run::{Line, Run, RunId, RunState};

/// Everything in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// Records, output and keys under one lock, so that check-and-transition is atomic. A std
    /// mutex: critical sections are map operations and clones, never I/O or `.await`.
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Boxed: ids only grow, so the map's nodes split at the right and stay about half full;
    /// a slot of a half-empty node costs a pointer, not a whole record.
    runs: BTreeMap<RunId, Box<Entry>>,
    /// The finished runs by when they finished, oldest first: retention takes what it removes
    /// from the front instead of sorting every finished run each time it looks (every second).
    finished: BTreeSet<(SystemTime, RunId)>,
    keys: HashMap<String, (u64, RunId)>,
    /// Completion callbacks by delivery id. Bounded like the runs: one per callback URL of a
    /// retained run (purged with it).
    deliveries: BTreeMap<String, Delivery>,
}

#[derive(Debug, Clone)]
struct Delivery {
    run_id: RunId,
    url: String,
    state: DeliveryState,
    created_at: SystemTime,
    /// When it is due (or the held attempt lapses).
    next_at: SystemTime,
}

#[derive(Debug)]
struct Entry {
    run: Run,
    /// Bounded by the run's output budget (`output.max_run_bytes`), enforced upstream.
    lines: Vec<Line>,
    key: Option<String>,
}

impl Entry {
    fn snapshot(&self) -> Run {
        let mut run = self.run.clone();
        run.output_lines = self.lines.len() as u64;
        run
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn transition(&mut self, id: RunId, expect: Expect, next: RunState) -> Result<(), StoreError> {
        let Some(entry) = self.runs.get_mut(&id) else {
            return Err(StoreError::NotFound(id));
        };
        if !expect.allows(&entry.run.state) {
            return Err(StoreError::WrongState(Box::new(entry.snapshot())));
        }
        let ends = !entry.run.state.is_finished() && next.is_finished();
        if let Some(t) = entry.run.finished_at() {
            self.finished.remove(&(t, id));
        }
        entry.run.state = next;
        if let Some(t) = entry.run.finished_at() {
            self.finished.insert((t, id));
        }
        if !ends || entry.run.callbacks.is_empty() {
            return Ok(());
        }
        // With the final status, under the same lock: a run never ends without them.
        let at = entry.run.finished_at().unwrap_or_else(SystemTime::now);
        let urls = entry.run.callbacks.clone();
        for (n, url) in urls.into_iter().enumerate() {
            let key = format!("msg_{}_{}", id.as_uuid().simple(), n + 1);
            self.deliveries.entry(key.clone()).or_insert(Delivery {
                run_id: id,
                url: url.clone(),
                state: DeliveryState {
                    id: key,
                    url,
                    status: DeliveryStatus::Pending,
                    attempts: 0,
                    last_status: None,
                    last_error: None,
                    next_at: Some(at),
                    done_at: None,
                },
                created_at: at,
                next_at: at,
            });
        }
        Ok(())
    }

    /// Lines at or below a seq already stored are skipped (a retried batch).
    fn append(&mut self, id: RunId, mut lines: Vec<Line>) -> Result<(), StoreError> {
        let Some(entry) = self.runs.get_mut(&id) else {
            return Err(StoreError::NotFound(id));
        };
        let have = entry.lines.len() as u64;
        lines.retain(|l| l.seq > have);
        if entry.lines.is_empty() {
            // The run's first batch (for most runs, all of their output, which comes with
            // their end) is kept as it came: no copy of its lines.
            entry.lines = lines;
        } else {
            entry.lines.append(&mut lines);
        }
        Ok(())
    }

    fn by_key(&self, key: &IdempotencyKey) -> Result<Option<Run>, StoreError> {
        match self.keys.get(&key.key) {
            None => Ok(None),
            Some((fp, _)) if *fp != key.fingerprint => Err(StoreError::IdempotencyConflict),
            Some((_, id)) => Ok(self.runs.get(id).map(|e| e.snapshot())),
        }
    }

    fn remove(&mut self, id: RunId) {
        let Some(entry) = self.runs.remove(&id) else {
            return;
        };
        if let Some(t) = entry.run.finished_at() {
            self.finished.remove(&(t, id));
        }
        if let Some(key) = entry.key {
            self.keys.remove(&key);
        }
    }
}

fn ready<T: Send + 'static>(r: Result<T, StoreError>) -> StoreFuture<'static, T> {
    Box::pin(std::future::ready(r))
}

impl RunStore for MemoryStore {
    fn create(&self, new: NewRun) -> StoreFuture<'_, Created> {
        let mut inner = self.lock();
        if let Some(k) = &new.key {
            match inner.by_key(k) {
                Err(e) => return ready(Err(e)),
                Ok(Some(existing)) => return ready(Ok(Created::Existing(existing))),
                Ok(None) => {
                    inner
                        .keys
                        .insert(k.key.clone(), (k.fingerprint, new.run.id));
                }
            }
        }
        let id = new.run.id;
        let entry = Box::new(Entry {
            run: new.run,
            lines: Vec::new(),
            key: new.key.map(|k| k.key),
        });
        let snapshot = entry.snapshot();
        if let Some(t) = entry.run.finished_at() {
            inner.finished.insert((t, id));
        }
        inner.runs.insert(id, entry);
        ready(Ok(Created::New(snapshot)))
    }

    fn find_idempotent(&self, key: &IdempotencyKey) -> StoreFuture<'_, Option<Run>> {
        ready(self.lock().by_key(key))
    }

    fn get(&self, id: RunId) -> StoreFuture<'_, Option<Run>> {
        ready(Ok(self.lock().runs.get(&id).map(|e| e.snapshot())))
    }

    fn cancel_requested(&self, id: RunId, at: SystemTime) -> StoreFuture<'_, ()> {
        if let Some(entry) = self.lock().runs.get_mut(&id)
            && matches!(entry.run.state, RunState::Running { .. })
        {
            entry.run.cancel_requested_at.get_or_insert(at);
        }
        ready(Ok(()))
    }

    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> StoreFuture<'_, ()> {
        ready(self.lock().transition(id, expect, next))
    }

    fn append_output(&self, id: RunId, lines: Vec<Line>) -> StoreFuture<'_, ()> {
        ready(self.lock().append(id, lines))
    }

    fn finish(
        &self,
        id: RunId,
        lines: Vec<Line>,
        expect: Expect,
        next: RunState,
    ) -> StoreFuture<'_, ()> {
        // The state first: a refused end writes no output. One lock section for both.
        let mut inner = self.lock();
        ready(
            inner
                .transition(id, expect, next)
                .and_then(|()| inner.append(id, lines)),
        )
    }

    fn read_output(&self, id: RunId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Line>> {
        let inner = self.lock();
        let Some(entry) = inner.runs.get(&id) else {
            return ready(Err(StoreError::NotFound(id)));
        };
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(entry.lines.len());
        let end = start.saturating_add(limit).min(entry.lines.len());
        ready(Ok(entry.lines[start..end].to_vec()))
    }

    fn list(&self, query: ListQuery) -> StoreFuture<'_, Page> {
        let inner = self.lock();
        let upper = match query.before {
            Some(c) => std::ops::Bound::Excluded(c),
            None => std::ops::Bound::Unbounded,
        };
        let mut runs = Vec::with_capacity(query.limit.min(1024));
        let mut more = false;
        for entry in inner
            .runs
            .range((std::ops::Bound::Unbounded, upper))
            .rev()
            .map(|(_, e)| e)
        {
            if query
                .module_id
                .as_ref()
                .is_some_and(|m| *m != entry.run.module_id)
                || query
                    .statuses
                    .as_ref()
                    .is_some_and(|s| !s.contains(&entry.run.status()))
                || query
                    .modules
                    .as_ref()
                    .is_some_and(|ps| !ps.iter().any(|p| p.matches(&entry.run.module_id)))
            {
                continue;
            }
            if runs.len() == query.limit {
                more = true;
                break;
            }
            runs.push(entry.snapshot());
        }
        let next_cursor = if more {
            runs.last().map(|r| r.id)
        } else {
            None
        };
        ready(Ok(Page { runs, next_cursor }))
    }

    fn purge(&self, policy: Retention, now: SystemTime) -> StoreFuture<'_, usize> {
        let mut inner = self.lock();
        // Oldest first: the runs past the count, then those finished before the cutoff.
        let over = inner.finished.len().saturating_sub(policy.keep_runs);
        let cutoff = now.checked_sub(policy.keep_for);
        let doomed: Vec<RunId> = inner
            .finished
            .iter()
            .enumerate()
            .take_while(|(i, (t, _))| *i < over || cutoff.is_some_and(|c| *t < c))
            .map(|(_, (_, id))| *id)
            .collect();
        for id in &doomed {
            inner.remove(*id);
        }
        if !doomed.is_empty() {
            let doomed: HashSet<RunId> = doomed.iter().copied().collect();
            inner.deliveries.retain(|_, d| !doomed.contains(&d.run_id));
        }
        ready(Ok(doomed.len()))
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        ready(Ok(()))
    }

    fn recover(&self) -> StoreFuture<'_, Recovered> {
        ready(Ok(Recovered::default()))
    }

    fn claim_deliveries(
        &self,
        now: SystemTime,
        hold: Duration,
        limit: usize,
    ) -> StoreFuture<'_, Vec<DueDelivery>> {
        let mut inner = self.lock();
        let mut due: Vec<&mut Delivery> = inner
            .deliveries
            .values_mut()
            .filter(|d| d.state.status == DeliveryStatus::Pending && d.next_at <= now)
            .collect();
        due.sort_by_key(|d| d.next_at);
        let out = due
            .into_iter()
            .take(limit)
            .map(|d| {
                d.next_at = now + hold;
                DueDelivery {
                    id: d.state.id.clone(),
                    run_id: d.run_id,
                    url: d.url.clone(),
                    attempts: d.state.attempts,
                    created_at: d.created_at,
                }
            })
            .collect();
        ready(Ok(out))
    }

    fn record_delivery(&self, id: String, result: DeliveryResult) -> StoreFuture<'_, ()> {
        let mut inner = self.lock();
        if let Some(d) = inner.deliveries.get_mut(&id)
            && d.state.status == DeliveryStatus::Pending
        {
            let now = SystemTime::now();
            d.state.attempts += 1;
            match result {
                DeliveryResult::Delivered { status } => {
                    d.state.status = DeliveryStatus::Delivered;
                    d.state.last_status = Some(status);
                    d.state.last_error = None;
                    d.state.done_at = Some(now);
                }
                DeliveryResult::Retry {
                    next_at,
                    status,
                    error,
                } => {
                    d.next_at = next_at;
                    d.state.last_status = status;
                    d.state.last_error = Some(error);
                }
                DeliveryResult::Failed { status, error } => {
                    d.state.status = DeliveryStatus::Failed;
                    d.state.last_status = status;
                    d.state.last_error = Some(error);
                    d.state.done_at = Some(now);
                }
            }
        }
        ready(Ok(()))
    }

    fn deliveries(&self, run: RunId) -> StoreFuture<'_, Vec<DeliveryState>> {
        let inner = self.lock();
        let mut out: Vec<DeliveryState> = inner
            .deliveries
            .values()
            .filter(|d| d.run_id == run)
            .map(|d| {
                let mut s = d.state.clone();
                s.next_at = (s.status == DeliveryStatus::Pending).then_some(d.next_at);
                s
            })
            .collect();
        super::sort_deliveries(&mut out);
        ready(Ok(out))
    }
}
