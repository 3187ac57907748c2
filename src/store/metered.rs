//! A store that times its writes into the metrics (`modrun_store_write_duration_seconds`,
//! `modrun_store_errors_total`) and passes everything to the engine behind it.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::{
    Cluster, Created, DeliveryResult, DeliveryState, DueDelivery, Expect, IdempotencyKey,
    ListQuery, NewRun, Page, Recovered, Retention, RunStore, StoreFuture,
};
use crate::metrics::Metrics;
use crate::run::{Line, Run, RunId, RunState};

/// `inner`, with its writes timed into `metrics`.
pub struct Metered {
    inner: Arc<dyn RunStore>,
    metrics: Arc<Metrics>,
}

impl Metered {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn RunStore>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { inner, metrics })
    }

    /// Time one write; only a failure of the store counts as an error (a refused transition
    /// or a full queue are answers, not errors).
    fn timed<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        write: StoreFuture<'a, T>,
    ) -> StoreFuture<'a, T> {
        Box::pin(async move {
            let start = Instant::now();
            let r = write.await;
            let failed = matches!(&r, Err(e) if e.is_failure());
            self.metrics.store_write(op, start.elapsed(), !failed);
            r
        })
    }
}

impl RunStore for Metered {
    fn create(&self, new: NewRun) -> StoreFuture<'_, Created> {
        self.timed("create", self.inner.create(new))
    }
    fn find_idempotent(&self, key: &IdempotencyKey) -> StoreFuture<'_, Option<Run>> {
        self.inner.find_idempotent(key)
    }
    fn get(&self, id: RunId) -> StoreFuture<'_, Option<Run>> {
        self.inner.get(id)
    }
    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> StoreFuture<'_, ()> {
        self.timed("transition", self.inner.transition(id, expect, next))
    }
    fn cancel_requested(&self, id: RunId, at: SystemTime) -> StoreFuture<'_, ()> {
        self.timed("cancel_requested", self.inner.cancel_requested(id, at))
    }
    fn append_output(&self, id: RunId, lines: Vec<Line>) -> StoreFuture<'_, ()> {
        self.timed("append_output", self.inner.append_output(id, lines))
    }
    fn finish(
        &self,
        id: RunId,
        lines: Vec<Line>,
        expect: Expect,
        next: RunState,
    ) -> StoreFuture<'_, ()> {
        self.timed("finish", self.inner.finish(id, lines, expect, next))
    }
    fn read_output(&self, id: RunId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Line>> {
        self.inner.read_output(id, after, limit)
    }
    fn list(&self, query: ListQuery) -> StoreFuture<'_, Page> {
        self.inner.list(query)
    }
    fn purge(&self, policy: Retention, now: SystemTime) -> StoreFuture<'_, usize> {
        self.timed("purge", self.inner.purge(policy, now))
    }
    fn recover(&self) -> StoreFuture<'_, Recovered> {
        self.inner.recover()
    }
    fn probe(&self) -> StoreFuture<'_, ()> {
        self.inner.probe()
    }
    fn claim_deliveries(
        &self,
        now: SystemTime,
        hold: std::time::Duration,
        limit: usize,
    ) -> StoreFuture<'_, Vec<DueDelivery>> {
        self.inner.claim_deliveries(now, hold, limit)
    }
    fn record_delivery(&self, id: String, result: DeliveryResult) -> StoreFuture<'_, ()> {
        self.inner.record_delivery(id, result)
    }
    fn deliveries(&self, run: RunId) -> StoreFuture<'_, Vec<DeliveryState>> {
        self.inner.deliveries(run)
    }
    fn cluster(self: Arc<Self>) -> Option<Arc<dyn Cluster>> {
        self.inner.clone().cluster()
    }
}
