//! The runner as one node of a cluster (a store that several nodes share): it claims queued
//! runs when it has free slots, renews its lease, reaps the runs of nodes whose lease lapsed,
//! and stops the runs it is asked to cancel or that another node took over.
//!
//! Every input is a hint plus a poll: a `Queued` notification or a free slot wakes the claimer,
//! which also looks every second; a `Cancel` notification wakes the heartbeat, which also reads
//! the durable cancel flags every third of a lease; so a lost notification costs latency, never
//! a run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::request::RunRequest;
use super::sched::{Inner, Pending};
use crate::output::Redactor;
use crate::run::{CancelReason, Outcome, Run, RunState};
use crate::store::{Claimed, Cluster, ClusterSignal, Expect, Held};

/// Turns a claimed run (its record and what it holds) into the request that starts it, from
/// this node's module catalog; `Err` says why it cannot start here (its module is gone, its
/// parameters no longer valid).
pub type RequestBuilder = dyn Fn(&Run, Held) -> Result<RunRequest, String> + Send + Sync;

/// How often the claimer looks without being woken.
const CLAIM_POLL: Duration = Duration::from_secs(1);

/// Run the node's loops until `stop` fires.
pub(super) async fn run(
    inner: Arc<Inner>,
    cluster: Arc<dyn Cluster>,
    builder: Arc<RequestBuilder>,
    stop: CancellationToken,
) {
    let beat_now = Arc::new(tokio::sync::Notify::new());
    tokio::join!(
        claimer(&inner, &cluster, &builder, &stop),
        heartbeat(&inner, &cluster, &beat_now, &stop),
        signals(&inner, &cluster, &beat_now, &stop),
    );
}

/// Claim while a slot is free and a run may be queued; woken by a freed slot, a queued run, a
/// resync, or the poll (which always looks).
async fn claimer(
    inner: &Arc<Inner>,
    cluster: &Arc<dyn Cluster>,
    builder: &Arc<RequestBuilder>,
    stop: &CancellationToken,
) {
    loop {
        // A little jitter keeps the nodes' polls apart.
        let poll = CLAIM_POLL + Duration::from_millis(u64::from(rand_ms()) % 250);
        tokio::select! {
            () = inner.claim_wake.notified() => {}
            () = tokio::time::sleep(poll) => inner.claim_hint.store(true, Ordering::SeqCst),
            () = stop.cancelled() => return,
        }
        // Cleared before the claim: a run queued meanwhile sets it again (and wakes us).
        if !inner.claim_hint.swap(false, Ordering::SeqCst) {
            continue;
        }
        loop {
            if !inner.reserve_claim() {
                // No slot free: claim when one is.
                inner.claim_hint.store(true, Ordering::SeqCst);
                break;
            }
            let claimed = cluster.claim().await;
            inner.registry.health().note(&claimed);
            match claimed {
                Ok(Some(c)) => start_claimed(inner, cluster, builder, c).await,
                Ok(None) => {
                    inner.unreserve_claim();
                    break;
                }
                Err(e) => {
                    inner.unreserve_claim();
                    tracing::debug!(error = %e, "cannot claim a run");
                    break;
                }
            }
        }
    }
}

/// Start a run this node claimed (its slot is reserved), or record why it cannot start here.
async fn start_claimed(
    inner: &Arc<Inner>,
    cluster: &Arc<dyn Cluster>,
    builder: &Arc<RequestBuilder>,
    c: Claimed,
) {
    let id = c.run.id;
    let started_at = c.run.started_at();
    if !inner.is_open() {
        // This node began to stop while the claim was in flight: the run waits for another.
        inner.unreserve_claim();
        if let Err(e) = cluster.unclaim(id, c.held).await {
            tracing::warn!(run_id = %id, error = %e, "cannot put a claimed run back in the queue");
        }
        return;
    }
    match builder(&c.run, c.held) {
        Ok(req) => {
            tracing::info!(run_id = %id, attempt = c.run.attempt, module = %req.module_id, "run claimed");
            let redactor = Redactor::new(&req.secrets).map(Arc::new);
            inner.registry.adopt(c.run, redactor, c.after_seq);
            let ctl = inner.take_reserved_slot(id, &req);
            inner.start(Pending { id, req }, ctl, started_at);
        }
        Err(why) => {
            inner.unreserve_claim();
            tracing::warn!(run_id = %id, error = %why, "claimed run cannot start on this node");
            let next = RunState::Finished {
                started_at,
                pid: None,
                finished_at: std::time::SystemTime::now(),
                outcome: Outcome::SpawnFailed(why),
            };
            if let Err(e) = inner
                .registry
                .store()
                .transition(id, Expect::Running, next)
                .await
            {
                tracing::warn!(run_id = %id, error = %e, "cannot record why the run cannot start");
                cluster.release(id);
            }
        }
    }
}

/// Renew the lease every third of it (or at once when woken), then act on what it says: runs
/// to cancel, runs taken over. While the store cannot be reached past the lease, runs that opt
/// into `retry_on_lost` are stopped here (another node may start them again); the reaper runs
/// every half lease once this node has been connected for a whole one (so that a database that
/// was away does not make every node's runs look lost before their nodes could renew).
async fn heartbeat(
    inner: &Arc<Inner>,
    cluster: &Arc<dyn Cluster>,
    beat_now: &tokio::sync::Notify,
    stop: &CancellationToken,
) {
    let ttl = cluster.lease_ttl();
    let every = ttl / 3;
    let mut last_ok = Instant::now();
    let mut connected_since: Option<Instant> = Some(Instant::now());
    let mut last_reap = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = beat_now.notified() => {}
            () = stop.cancelled() => return,
        }
        let beat = cluster.heartbeat().await;
        inner.registry.health().note(&beat);
        match beat {
            Ok(hb) => {
                last_ok = Instant::now();
                connected_since.get_or_insert_with(Instant::now);
                for (id, by) in hb.cancels {
                    inner.cancel_active(id, CancelReason::Request, by);
                }
                for id in hb.gone {
                    tracing::warn!(run_id = %id, "another node took the run over: stopping it here");
                    inner.cancel_active(id, CancelReason::Request, None);
                }
            }
            Err(e) => {
                connected_since = None;
                tracing::debug!(error = %e, "cannot renew the lease");
                // Our lease is as good as gone: a run that may be retried elsewhere must not
                // go on here at the same time.
                if last_ok.elapsed() + every >= ttl {
                    for id in inner.retryable_active() {
                        tracing::warn!(run_id = %id, "lease lapsing while the store is away: giving a retryable run up");
                        inner.abandon(id);
                    }
                }
            }
        }
        if connected_since.is_some_and(|t| t.elapsed() >= ttl) && last_reap.elapsed() >= ttl / 2 {
            last_reap = Instant::now();
            match cluster.reap().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(runs = n, "reaped the runs of lost nodes"),
                Err(e) => tracing::debug!(error = %e, "cannot reap"),
            }
        }
    }
}

/// Act on the store's hints.
async fn signals(
    inner: &Arc<Inner>,
    cluster: &Arc<dyn Cluster>,
    beat_now: &tokio::sync::Notify,
    stop: &CancellationToken,
) {
    let mut rx = cluster.signals();
    loop {
        let signal = tokio::select! {
            s = rx.recv() => s,
            () = stop.cancelled() => return,
        };
        match signal {
            Ok(ClusterSignal::Queued) => inner.hint_claim(),
            Ok(ClusterSignal::Cancel(id)) => {
                if inner.is_active(id) {
                    beat_now.notify_one();
                }
            }
            Ok(ClusterSignal::Fenced(id)) => {
                tracing::warn!(run_id = %id, "another node took the run over: stopping it here");
                inner.cancel_active(id, CancelReason::Request, None);
            }
            Ok(ClusterSignal::Resync) | Err(RecvError::Lagged(_)) => {
                inner.hint_claim();
                beat_now.notify_one();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// A few random bits for jitter (no RNG crate needed for that).
fn rand_ms() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id()
}
