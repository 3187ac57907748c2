//! The in-memory store (`storage.path = ""`): records in an ordered map (UUID v7 ids sort by
//! creation), output beside them, retention by count and age. Nothing survives a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use super::{
    Created, Expect, IdempotencyKey, ListQuery, NewRun, Page, Recovered, Retention, RunStore,
    StoreError, StoreFuture,
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
    runs: BTreeMap<RunId, Entry>,
    keys: HashMap<String, (u64, RunId)>,
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
    fn by_key(&self, key: &IdempotencyKey) -> Result<Option<Run>, StoreError> {
        match self.keys.get(&key.key) {
            None => Ok(None),
            Some((fp, _)) if *fp != key.fingerprint => Err(StoreError::IdempotencyConflict),
            Some((_, id)) => Ok(self.runs.get(id).map(Entry::snapshot)),
        }
    }

    fn remove(&mut self, id: RunId) {
        if let Some(entry) = self.runs.remove(&id)
            && let Some(key) = entry.key
        {
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
        let entry = Entry {
            run: new.run,
            lines: Vec::new(),
            key: new.key.map(|k| k.key),
        };
        let snapshot = entry.snapshot();
        inner.runs.insert(id, entry);
        ready(Ok(Created::New(snapshot)))
    }

    fn find_idempotent(&self, key: &IdempotencyKey) -> StoreFuture<'_, Option<Run>> {
        ready(self.lock().by_key(key))
    }

    fn get(&self, id: RunId) -> StoreFuture<'_, Option<Run>> {
        ready(Ok(self.lock().runs.get(&id).map(Entry::snapshot)))
    }

    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> StoreFuture<'_, ()> {
        let mut inner = self.lock();
        let Some(entry) = inner.runs.get_mut(&id) else {
            return ready(Err(StoreError::NotFound(id)));
        };
        if !expect.allows(&entry.run.state) {
            return ready(Err(StoreError::WrongState(Box::new(entry.snapshot()))));
        }
        entry.run.state = next;
        ready(Ok(()))
    }

    fn append_output(&self, id: RunId, lines: Vec<Line>) -> StoreFuture<'_, ()> {
        let mut inner = self.lock();
        let Some(entry) = inner.runs.get_mut(&id) else {
            return ready(Err(StoreError::NotFound(id)));
        };
        let have = entry.lines.len() as u64;
        entry
            .lines
            .extend(lines.into_iter().filter(|l| l.seq > have));
        ready(Ok(()))
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
        let mut finished: Vec<(SystemTime, RunId)> = inner
            .runs
            .values()
            .filter_map(|e| e.run.finished_at().map(|t| (t, e.run.id)))
            .collect();
        finished.sort_unstable();
        let over = finished.len().saturating_sub(policy.keep_runs);
        let cutoff = now.checked_sub(policy.keep_for);
        let doomed: Vec<RunId> = finished
            .iter()
            .enumerate()
            .filter(|(i, (t, _))| *i < over || cutoff.is_some_and(|c| *t < c))
            .map(|(_, (_, id))| *id)
            .collect();
        for id in &doomed {
            inner.remove(*id);
        }
        ready(Ok(doomed.len()))
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        ready(Ok(()))
    }

    fn recover(&self) -> StoreFuture<'_, Recovered> {
        ready(Ok(Recovered::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{Outcome, RunMode, RunStatus, Stream};
    use std::sync::Arc;
    use std::time::Duration;

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
            created_by: None,
        }
    }

    fn new(run: Run, key: Option<&str>) -> NewRun {
        NewRun {
            run,
            key: key.map(|k| IdempotencyKey {
                key: k.into(),
                fingerprint: 1,
            }),
            held: Default::default(),
        }
    }

    fn finished_at(t: SystemTime) -> RunState {
        RunState::Finished {
            started_at: None,
            pid: None,
            finished_at: t,
            outcome: Outcome::Lost,
        }
    }

    #[tokio::test]
    async fn transitions_check_the_current_state() {
        let s = MemoryStore::new();
        let r = run("a");
        let id = r.id;
        s.create(new(r, None)).await.unwrap();
        let err = s
            .transition(id, Expect::Running, finished_at(SystemTime::now()))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::WrongState(_)));
        s.transition(id, Expect::Active, finished_at(SystemTime::now()))
            .await
            .unwrap();
        let err = s
            .transition(id, Expect::Active, finished_at(SystemTime::now()))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::WrongState(r) if r.status() == RunStatus::Lost));
    }

    #[tokio::test]
    async fn output_appends_are_idempotent() {
        let s = MemoryStore::new();
        let r = run("a");
        let id = r.id;
        s.create(new(r, None)).await.unwrap();
        let line = |seq| Line {
            seq,
            stream: Stream::Stdout,
            ts: SystemTime::now(),
            text: Arc::from(format!("l{seq}")),
        };
        s.append_output(id, vec![line(1), line(2)]).await.unwrap();
        s.append_output(id, vec![line(2), line(3)]).await.unwrap();
        let got: Vec<u64> = s
            .read_output(id, 1, 10)
            .await
            .unwrap()
            .iter()
            .map(|l| l.seq)
            .collect();
        assert_eq!(got, [2, 3]);
        assert_eq!(s.get(id).await.unwrap().unwrap().output_lines, 3);
    }

    #[tokio::test]
    async fn purge_by_count_and_age_keeps_active_runs() {
        let s = MemoryStore::new();
        let now = SystemTime::now();
        let mut ids = vec![];
        for _ in 0..5 {
            let r = run("a");
            ids.push(r.id);
            s.create(new(r, Some(&format!("k{}", ids.len()))))
                .await
                .unwrap();
        }
        // ids[0] stays queued; the others finished 40, 30, 20, 10 s ago.
        for (i, id) in ids[1..].iter().enumerate() {
            let t = now - Duration::from_secs(40 - 10 * i as u64);
            s.transition(*id, Expect::Active, finished_at(t))
                .await
                .unwrap();
        }
        let policy = Retention {
            keep_runs: 3,
            keep_for: Duration::from_secs(25),
        };
        assert_eq!(s.purge(policy, now).await.unwrap(), 2);
        assert!(s.get(ids[0]).await.unwrap().is_some(), "active runs stay");
        assert!(s.get(ids[1]).await.unwrap().is_none());
        assert!(s.get(ids[2]).await.unwrap().is_none());
        assert!(s.get(ids[3]).await.unwrap().is_some());
        let k2 = IdempotencyKey {
            key: "k2".into(),
            fingerprint: 9,
        };
        assert!(
            s.find_idempotent(&k2).await.unwrap().is_none(),
            "keys go too"
        );
    }

    #[tokio::test]
    async fn listing_pages_newest_first_with_filters() {
        let s = MemoryStore::new();
        let mut ids = vec![];
        for i in 0..7 {
            let r = run(if i % 2 == 0 { "even" } else { "odd" });
            ids.push(r.id);
            s.create(new(r, None)).await.unwrap();
        }
        let q = |before, module: Option<&str>, limit| ListQuery {
            statuses: None,
            module_id: module.map(String::from),
            before,
            limit,
            modules: None,
        };
        let p1 = s.list(q(None, None, 2)).await.unwrap();
        let p1_ids: Vec<RunId> = p1.runs.iter().map(|r| r.id).collect();
        assert_eq!(p1_ids, [ids[6], ids[5]]);
        let p2 = s.list(q(p1.next_cursor, None, 2)).await.unwrap();
        let p2_ids: Vec<RunId> = p2.runs.iter().map(|r| r.id).collect();
        assert_eq!(p2_ids, [ids[4], ids[3]]);
        let odd = s.list(q(None, Some("odd"), 10)).await.unwrap();
        assert_eq!(odd.runs.len(), 3);
        assert!(odd.next_cursor.is_none());
        let last = s.list(q(Some(ids[1]), None, 1)).await.unwrap();
        assert_eq!(last.runs[0].id, ids[0]);
        assert!(last.next_cursor.is_none());
        let pattern = |p: &str| Some(vec![crate::auth::ModulePattern::new(p).unwrap()]);
        let seen = s
            .list(ListQuery {
                modules: pattern("o*"),
                ..q(None, None, 10)
            })
            .await
            .unwrap();
        assert_eq!(seen.runs.len(), 3);
        let none = s
            .list(ListQuery {
                modules: Some(vec![]),
                ..q(None, None, 10)
            })
            .await
            .unwrap();
        assert!(none.runs.is_empty());
    }
}
