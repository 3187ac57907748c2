//! The in-memory store: records in an ordered map (UUID v7 ids sort by creation), output logs
//! beside them, and retention by count of finished runs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Created, Expect, IdempotencyKey, ListQuery, Page, RunStore, StoreError};
use crate::output::OutputLog;
use crate::run::{Run, RunId, RunState};

/// Everything in memory; nothing survives a restart.
#[derive(Debug)]
pub struct MemoryStore {
    /// One lock for records, finish order and keys, so that check-and-transition and eviction
    /// are atomic. A std mutex: critical sections are map operations and clones, never I/O or
    /// `.await`.
    inner: Mutex<Inner>,
    keep_runs: usize,
}

#[derive(Debug, Default)]
struct Inner {
    runs: BTreeMap<RunId, Entry>,
    /// Finished runs, oldest finish first. Bounded: trimmed to `keep_runs` on every finish.
    finished: VecDeque<RunId>,
    keys: HashMap<String, (u64, RunId)>,
}

#[derive(Debug)]
struct Entry {
    run: Run,
    output: Arc<OutputLog>,
    key: Option<String>,
}

impl Entry {
    fn snapshot(&self) -> Run {
        let mut run = self.run.clone();
        run.output_lines = self.output.last_seq();
        run
    }
}

impl MemoryStore {
    /// An empty store keeping at most `keep_runs` finished runs.
    pub fn new(keep_runs: usize) -> Self {
        Self {
            inner: Mutex::default(),
            keep_runs,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn evict(&mut self, keep: usize) {
        while self.finished.len() > keep {
            let Some(id) = self.finished.pop_front() else {
                break;
            };
            if let Some(entry) = self.runs.remove(&id)
                && let Some(key) = entry.key
            {
                self.keys.remove(&key);
            }
        }
    }

    fn by_key(&self, key: &IdempotencyKey) -> Result<Option<Run>, StoreError> {
        match self.keys.get(&key.key) {
            None => Ok(None),
            Some((fp, _)) if *fp != key.fingerprint => Err(StoreError::IdempotencyConflict),
            Some((_, id)) => Ok(self.runs.get(id).map(Entry::snapshot)),
        }
    }
}

impl RunStore for MemoryStore {
    fn create(
        &self,
        run: Run,
        output: Arc<OutputLog>,
        key: Option<IdempotencyKey>,
    ) -> Result<Created, StoreError> {
        let mut inner = self.lock();
        if let Some(k) = &key {
            if let Some(existing) = inner.by_key(k)? {
                return Ok(Created::Existing(existing));
            }
            inner.keys.insert(k.key.clone(), (k.fingerprint, run.id));
        }
        let finished = run.state.is_finished();
        let id = run.id;
        let entry = Entry {
            run,
            output,
            key: key.map(|k| k.key),
        };
        let snapshot = entry.snapshot();
        inner.runs.insert(id, entry);
        if finished {
            inner.finished.push_back(id);
            inner.evict(self.keep_runs);
        }
        Ok(Created::New(snapshot))
    }

    fn find_idempotent(&self, key: &IdempotencyKey) -> Result<Option<Run>, StoreError> {
        self.lock().by_key(key)
    }

    fn get(&self, id: RunId) -> Option<Run> {
        self.lock().runs.get(&id).map(Entry::snapshot)
    }

    fn output(&self, id: RunId) -> Option<Arc<OutputLog>> {
        self.lock().runs.get(&id).map(|e| e.output.clone())
    }

    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> Result<Run, StoreError> {
        let (snapshot, output) = {
            let mut inner = self.lock();
            let entry = inner.runs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
            if !expect.allows(&entry.run.state) {
                return Err(StoreError::WrongState(Box::new(entry.snapshot())));
            }
            let finished = next.is_finished();
            entry.run.state = next;
            if finished {
                entry.run.output_lines = entry.output.last_seq();
            }
            let snapshot = entry.snapshot();
            let output = entry.output.clone();
            if finished {
                inner.finished.push_back(id);
                inner.evict(self.keep_runs);
            }
            (snapshot, output)
        };
        output.touch();
        Ok(snapshot)
    }

    fn list(&self, query: &ListQuery) -> Page {
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
            {
                continue;
            }
            if query
                .statuses
                .as_ref()
                .is_some_and(|s| !s.contains(&entry.run.status()))
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
        Page { runs, next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::OutputLimits;
    use crate::run::{Outcome, RunMode, RunStatus};
    use std::time::{Duration, SystemTime};

    fn run(module: &str) -> Run {
        Run {
            id: RunId::new(),
            module_id: module.into(),
            module_name: module.into(),
            parameters: Default::default(),
            argv: vec![],
            mode: RunMode::Async,
            timeout: Duration::from_secs(1),
            created_at: SystemTime::now(),
            state: RunState::Queued,
            output_lines: 0,
        }
    }

    fn log() -> Arc<OutputLog> {
        Arc::new(OutputLog::new(OutputLimits {
            max_line_bytes: 100,
            max_run_bytes: 100,
        }))
    }

    fn finished() -> RunState {
        RunState::Finished {
            started_at: None,
            pid: None,
            finished_at: SystemTime::now(),
            outcome: Outcome::Lost,
        }
    }

    #[test]
    fn transitions_check_the_current_state() {
        let s = MemoryStore::new(10);
        let r = run("a");
        let id = r.id;
        s.create(r, log(), None).unwrap();
        let err = s.transition(id, Expect::Running, finished()).unwrap_err();
        assert!(matches!(err, StoreError::WrongState(_)));
        s.transition(id, Expect::Active, finished()).unwrap();
        let err = s.transition(id, Expect::Active, finished()).unwrap_err();
        assert!(matches!(err, StoreError::WrongState(r) if r.status() == RunStatus::Lost));
    }

    #[test]
    fn oldest_finished_runs_are_evicted_with_their_keys() {
        let s = MemoryStore::new(2);
        let mut ids = vec![];
        for i in 0..4 {
            let r = run("a");
            ids.push(r.id);
            let key = IdempotencyKey {
                key: format!("k{i}"),
                fingerprint: 1,
            };
            s.create(r, log(), Some(key)).unwrap();
        }
        let queued = ids[0];
        for id in &ids[1..] {
            s.transition(*id, Expect::Active, finished()).unwrap();
        }
        assert!(s.get(queued).is_some(), "active runs are never evicted");
        assert!(s.get(ids[1]).is_none());
        assert!(s.get(ids[2]).is_some() && s.get(ids[3]).is_some());
        let k1 = IdempotencyKey {
            key: "k1".into(),
            fingerprint: 2,
        };
        assert!(s.find_idempotent(&k1).unwrap().is_none());
    }

    #[test]
    fn listing_pages_newest_first_with_filters() {
        let s = MemoryStore::new(100);
        let mut ids = vec![];
        for i in 0..7 {
            let r = run(if i % 2 == 0 { "even" } else { "odd" });
            ids.push(r.id);
            s.create(r, log(), None).unwrap();
        }
        let q = |before, module: Option<&str>| ListQuery {
            statuses: None,
            module_id: module.map(String::from),
            before,
            limit: 2,
        };
        let p1 = s.list(&q(None, None));
        assert_eq!(
            p1.runs.iter().map(|r| r.id).collect::<Vec<_>>(),
            [ids[6], ids[5]]
        );
        let p2 = s.list(&q(p1.next_cursor, None));
        assert_eq!(
            p2.runs.iter().map(|r| r.id).collect::<Vec<_>>(),
            [ids[4], ids[3]]
        );
        let odd = s.list(&ListQuery {
            limit: 10,
            ..q(None, Some("odd"))
        });
        assert_eq!(odd.runs.len(), 3);
        assert!(odd.next_cursor.is_none());
        let last = s.list(&ListQuery {
            limit: 1,
            ..q(Some(ids[1]), None)
        });
        assert_eq!(last.runs[0].id, ids[0]);
        assert!(last.next_cursor.is_none());
    }
}
