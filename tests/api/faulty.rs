//! A store whose failures a test switches on and off: what a real fault cannot reach (an
//! internal failure of the engine), or cannot reach quickly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use modrun::run::{Line, Run, RunId, RunState};
use modrun::store::{
    Created, Expect, IdempotencyKey, ListQuery, MemoryStore, NewRun, Page, Recovered, Retention,
    RunStore, StoreError, StoreFuture,
};

/// A memory store with switchable failures for writes and for reads.
#[derive(Default)]
pub struct FaultyStore {
    inner: MemoryStore,
    writes: Mutex<Option<StoreError>>,
    reads: Mutex<Option<StoreError>>,
    refuse_ends: AtomicBool,
}

impl FaultyStore {
    /// A store that works until told otherwise.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Every write fails with `e` (or works again with `None`).
    pub fn fail_writes(&self, e: Option<StoreError>) {
        *self.writes.lock().unwrap() = e;
    }

    /// Every read fails with `e` (or works again with `None`).
    pub fn fail_reads(&self, e: Option<StoreError>) {
        *self.reads.lock().unwrap() = e;
    }

    /// Every run's end is refused as if the run had changed state meanwhile (or is taken
    /// again with `false`); a refused end writes nothing, as the engines' ends do.
    pub fn refuse_ends(&self, on: bool) {
        self.refuse_ends.store(on, Ordering::Relaxed);
    }

    fn write_fault<T: Send + 'static>(&self) -> Option<StoreFuture<'_, T>> {
        let e = self.writes.lock().unwrap().clone()?;
        Some(Box::pin(async move { Err(e) }))
    }

    fn read_fault<T: Send + 'static>(&self) -> Option<StoreFuture<'_, T>> {
        let e = self.reads.lock().unwrap().clone()?;
        Some(Box::pin(async move { Err(e) }))
    }
}

impl RunStore for FaultyStore {
    fn create(&self, new: NewRun) -> StoreFuture<'_, Created> {
        self.write_fault().unwrap_or_else(|| self.inner.create(new))
    }
    fn find_idempotent(&self, key: &IdempotencyKey) -> StoreFuture<'_, Option<Run>> {
        self.read_fault()
            .unwrap_or_else(|| self.inner.find_idempotent(key))
    }
    fn get(&self, id: RunId) -> StoreFuture<'_, Option<Run>> {
        self.read_fault().unwrap_or_else(|| self.inner.get(id))
    }
    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> StoreFuture<'_, ()> {
        self.write_fault()
            .unwrap_or_else(|| self.inner.transition(id, expect, next))
    }
    fn append_output(&self, id: RunId, lines: Vec<Line>) -> StoreFuture<'_, ()> {
        self.write_fault()
            .unwrap_or_else(|| self.inner.append_output(id, lines))
    }
    fn finish(
        &self,
        id: RunId,
        lines: Vec<Line>,
        expect: Expect,
        next: RunState,
    ) -> StoreFuture<'_, ()> {
        if let Some(fault) = self.write_fault() {
            return fault;
        }
        if self.refuse_ends.load(Ordering::Relaxed) {
            return Box::pin(async move {
                let run = self.inner.get(id).await?.ok_or(StoreError::NotFound(id))?;
                Err(StoreError::WrongState(Box::new(run)))
            });
        }
        self.inner.finish(id, lines, expect, next)
    }
    fn read_output(&self, id: RunId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Line>> {
        self.read_fault()
            .unwrap_or_else(|| self.inner.read_output(id, after, limit))
    }
    fn list(&self, query: ListQuery) -> StoreFuture<'_, Page> {
        self.read_fault().unwrap_or_else(|| self.inner.list(query))
    }
    fn purge(&self, policy: Retention, now: SystemTime) -> StoreFuture<'_, usize> {
        self.write_fault()
            .unwrap_or_else(|| self.inner.purge(policy, now))
    }
    fn recover(&self) -> StoreFuture<'_, Recovered> {
        self.inner.recover()
    }
    fn probe(&self) -> StoreFuture<'_, ()> {
        self.write_fault().unwrap_or_else(|| self.inner.probe())
    }
}
