//! Persistence of run records and their output, behind a trait, so that the engine can change
//! (memory, embedded SQLite, a shared PostgreSQL later) without touching the runner or HTTP.
//!
//! The operations are the ones a *shared* store also needs: create (with an idempotency key),
//! transition with a check of the expected current state, append an output batch, read output
//! after a seq, list with filters and a cursor, purge, and recovery at start-up. They are async
//! so that an implementation may do I/O; none of them may block an async thread.

mod chunk;
#[cfg(test)]
mod contract;
mod memory;
mod metered;
#[cfg(feature = "postgres")]
mod postgres;
mod record;
mod segments;
mod sqlite;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

pub use memory::MemoryStore;
pub use metered::Metered;
#[cfg(feature = "postgres")]
pub use postgres::{PG_SCHEMA_VERSION, PgOpenError, PgSettings, PgStore};
pub use sqlite::{OpenError, SCHEMA_VERSION, SqliteStore};

use crate::auth::ModulePattern;
use crate::run::{Line, Run, RunId, RunState, RunStatus};

/// What store methods return.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A client's idempotency key with a fingerprint of the request body it came with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// The `Idempotency-Key` header value.
    pub key: String,
    /// A hash of the canonical JSON of the request body.
    pub fingerprint: u64,
}

/// A run to record.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// The record (state `queued`).
    pub run: Run,
    /// Its idempotency key, if the client sent one.
    pub key: Option<IdempotencyKey>,
    /// What it needs to start that its record does not show.
    pub held: Held,
    /// How a shared store schedules it.
    pub policy: RunPolicy,
}

/// How a shared store schedules a run (a single-node store has its runner for that).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunPolicy {
    /// Its module's `max_concurrent`, held across the cluster.
    pub module_limit: Option<usize>,
    /// Queue it again (as a new attempt) when the node that ran it is lost.
    pub retry_on_lost: bool,
    /// Attempts at most, the first included.
    pub max_attempts: u32,
}

/// What a queued run needs to start and its record does not show: kept by the store only while
/// the run is queued (so that a queued run survives a restart), dropped when it leaves the
/// queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Held {
    /// Text for the child's stdin.
    pub stdin: Option<String>,
    /// Secret parameter values (the record shows them as `***`).
    pub secrets: serde_json::Map<String, serde_json::Value>,
}

/// What [`RunStore::create`] did.
#[derive(Debug, Clone)]
pub enum Created {
    /// The run was recorded.
    New(Run),
    /// A run with the same idempotency key and body exists; nothing was created.
    Existing(Run),
}

/// Which states a transition may start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Only `queued`.
    Queued,
    /// Only `running`.
    Running,
    /// `queued` or `running`.
    Active,
}

impl Expect {
    /// True if `state` may be left by such a transition.
    pub fn allows(self, state: &RunState) -> bool {
        self.allows_status(state.status())
    }

    /// True if a run in `status` may be left by such a transition.
    pub fn allows_status(self, status: RunStatus) -> bool {
        matches!(
            (self, status),
            (Expect::Queued | Expect::Active, RunStatus::Queued)
                | (Expect::Running | Expect::Active, RunStatus::Running)
        )
    }
}

/// Filters and page of a listing: newest first.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only these statuses (any of them); `None` for all.
    pub statuses: Option<Vec<RunStatus>>,
    /// Only this module.
    pub module_id: Option<String>,
    /// Only modules matching one of these patterns (what an API token may see); `None` for
    /// all.
    pub modules: Option<Vec<ModulePattern>>,
    /// Only runs created before this one (the cursor of the previous page).
    pub before: Option<RunId>,
    /// Page size.
    pub limit: usize,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page {
    /// Newest first.
    pub runs: Vec<Run>,
    /// Pass as `before` for the next page; `None` on the last page.
    pub next_cursor: Option<RunId>,
}

/// How long finished runs are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// At most this many finished runs; the oldest finished go first.
    pub keep_runs: usize,
    /// Finished runs older than this go.
    pub keep_for: Duration,
}

/// What a store held for runs that were active when modrun last stopped.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Runs that were `running`: now `lost` (with their pid, for cleaning up their group).
    pub lost: Vec<Run>,
    /// Runs still `queued`, oldest first, with what they hold.
    pub queued: Vec<(Run, Held)>,
}

/// A completion callback due to be sent. The store writes one per callback URL of a run in the
/// same transaction as the run's final status (so a run cannot end without them), and hands it
/// out again until it is delivered or given up (at least once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    /// `msg_<run id>_<n>`: the `webhook-id`, the same at every attempt.
    pub id: String,
    /// The run it tells of.
    pub run_id: RunId,
    /// Where it goes.
    pub url: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// When the run ended (the delivery's retries are bounded from here).
    pub created_at: SystemTime,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    /// A 2xx answer.
    Delivered {
        /// Its status.
        status: u16,
    },
    /// Try again at `next_at`.
    Retry {
        /// When.
        next_at: SystemTime,
        /// The answer's status, if there was one.
        status: Option<u16>,
        /// What went wrong, for the run's record.
        error: String,
    },
    /// Given up.
    Failed {
        /// The last answer's status, if there was one.
        status: Option<u16>,
        /// Why.
        error: String,
    },
}

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Not delivered yet; it will be tried (again).
    Pending,
    /// Answered with a 2xx.
    Delivered,
    /// Given up after `callbacks.retry_for`.
    Failed,
}

impl DeliveryStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// From the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// A delivery as its run shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryState {
    /// The `webhook-id`.
    pub id: String,
    /// Where it goes.
    pub url: String,
    /// Where it is.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: u32,
    /// The last answer's status.
    pub last_status: Option<u16>,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When the next attempt is due (pending only).
    pub next_at: Option<SystemTime>,
    /// When it was delivered or given up.
    pub done_at: Option<SystemTime>,
}

/// Deliveries in the order of their run's URLs (`msg_<run>_<n>`: by `n`).
pub(crate) fn sort_deliveries(list: &mut [DeliveryState]) {
    list.sort_by_key(|d| {
        d.id.rsplit('_')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
}

/// Store failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No such run (never existed, or purged by retention).
    #[error("run {0} not found")]
    NotFound(RunId),
    /// The run is not in a state the transition may start from.
    #[error("run {} is {}", .0.id, .0.status())]
    WrongState(Box<Run>),
    /// The idempotency key was used with a different request body.
    #[error("the idempotency key was already used with a different request")]
    IdempotencyConflict,
    /// Another node took the run over (its lease lapsed): this node's writes for it are
    /// refused, and its process must stop.
    #[error("run {0} was taken over by another node")]
    Fenced(RunId),
    /// `max_queued` runs are queued (counted by a shared store, cluster-wide).
    #[error("the queue is full ({0} runs waiting)")]
    QueueFull(usize),
    /// The store cannot be used for now: an operating condition that passes (a full disk, a
    /// read-only file system, a database locked by someone else, an I/O error, a database
    /// server that cannot be reached). The text is for the log; clients are told the outage
    /// only.
    #[error("the run store {0}: {1}")]
    Unavailable(Outage, String),
    /// The engine failed in a way that is not expected to pass (corrupt data, a bug).
    #[error("run store: {0}")]
    Backend(String),
}

impl StoreError {
    /// True for a failure of the engine (an outage or worse), as opposed to a refusal of the
    /// request (not found, wrong state, key conflict).
    pub fn is_failure(&self) -> bool {
        matches!(self, StoreError::Unavailable(..) | StoreError::Backend(_))
    }
}

/// Why a store cannot be used for now, in words a client may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// The disk (or the quota) is full.
    DiskFull,
    /// The file system is read-only.
    ReadOnly,
    /// The database is locked by someone else.
    Busy,
    /// The disk or file system reported an error.
    Io,
    /// The database server cannot be reached.
    Unreachable,
}

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outage::DiskFull => "cannot write: disk full",
            Outage::ReadOnly => "cannot write: read-only file system",
            Outage::Busy => "is busy: the database is locked",
            Outage::Io => "has an I/O error",
            Outage::Unreachable => "cannot be reached",
        })
    }
}

/// Persistence of run records and their output.
pub trait RunStore: Send + Sync + 'static {
    /// Record a new run. With a key already known for an equal body, return that run instead;
    /// with a different body, [`StoreError::IdempotencyConflict`]. Durable when it returns.
    fn create(&self, new: NewRun) -> StoreFuture<'_, Created>;

    /// The run a key was used for, if it is still retained.
    fn find_idempotent(&self, key: &IdempotencyKey) -> StoreFuture<'_, Option<Run>>;

    /// A run by id.
    fn get(&self, id: RunId) -> StoreFuture<'_, Option<Run>>;

    /// Move a run to `next` if its state is one `expect` allows, atomically. Durable when it
    /// returns. (The caller knows the rest of the record; a refusal carries the run as stored.)
    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> StoreFuture<'_, ()>;

    /// Append output lines (in seq order). Lines at or below a seq already stored are ignored,
    /// so a batch can be retried safely.
    fn append_output(&self, id: RunId, lines: Vec<Line>) -> StoreFuture<'_, ()>;

    /// A run's end: append its last output `lines` (as [`RunStore::append_output`]), then
    /// move it to `next` (as [`RunStore::transition`]). A store that can write both at once
    /// does (one commit, one round trip at the end of every run); the default writes them in
    /// turn (for a store whose `append_output` refuses a run that is not its to write). A
    /// refused end writes no output.
    fn finish(
        &self,
        id: RunId,
        lines: Vec<Line>,
        expect: Expect,
        next: RunState,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.append_output(id, lines).await?;
            self.transition(id, expect, next).await
        })
    }

    /// Up to `limit` stored lines with `seq > after`, in order.
    fn read_output(&self, id: RunId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Line>>;

    /// A page of runs, newest first.
    fn list(&self, query: ListQuery) -> StoreFuture<'_, Page>;

    /// Delete finished runs (with their output) past the policy, oldest finished first, in
    /// batches; returns how many went.
    fn purge(&self, policy: Retention, now: SystemTime) -> StoreFuture<'_, usize>;

    /// At start-up: mark runs that were `running` as `lost`, and return them with the runs that
    /// are still `queued`.
    fn recover(&self) -> StoreFuture<'_, Recovered>;

    /// A small real write, to find out whether the store takes writes again after an outage
    /// (nothing else may be writing then).
    fn probe(&self) -> StoreFuture<'_, ()>;

    /// Note that a cancel was asked for run `id` at `at`, if it is running and none was
    /// before (the run's `cancel_requested_at`; kept after it ends). The default keeps
    /// nothing: a store that does not implement it shows the time only while the run is live
    /// in memory.
    fn cancel_requested(&self, id: RunId, at: SystemTime) -> StoreFuture<'_, ()> {
        let _ = (id, at);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Up to `limit` deliveries due at `now`, each held (not handed out again) until
    /// `now + hold`, when an attempt that never reported is retried. Default: none (a store
    /// without completion callbacks).
    fn claim_deliveries(
        &self,
        now: SystemTime,
        hold: Duration,
        limit: usize,
    ) -> StoreFuture<'_, Vec<DueDelivery>> {
        let _ = (now, hold, limit);
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// Record what an attempt of delivery `id` came to.
    fn record_delivery(&self, id: String, result: DeliveryResult) -> StoreFuture<'_, ()> {
        let _ = (id, result);
        Box::pin(std::future::ready(Ok(())))
    }

    /// The deliveries of a run, in URL order (none before the run has ended).
    fn deliveries(&self, run: RunId) -> StoreFuture<'_, Vec<DeliveryState>> {
        let _ = run;
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// What a store shared by several nodes adds; `None` for a store of one node.
    fn cluster(self: Arc<Self>) -> Option<Arc<dyn Cluster>> {
        None
    }
}

/// A hint from a shared store: something may have changed elsewhere. Hints may be lost or
/// repeated; nothing correct may depend on one arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterSignal {
    /// A run was queued (or queued again).
    Queued,
    /// A cancel of this run was asked for.
    Cancel(RunId),
    /// A write of this node's for this run was refused: another node took it over.
    Fenced(RunId),
    /// Notifications may have been missed: look at everything again.
    Resync,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    /// Runs of this node whose cancel was asked for (and by which token).
    pub cancels: Vec<(RunId, Option<String>)>,
    /// Runs this node holds that are no longer its own (another node took them over).
    pub gone: Vec<RunId>,
}

/// A queued run this node took.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Its record, now `running` here.
    pub run: Run,
    /// What it needs to start.
    pub held: Held,
    /// The last seq of the attempts before this one (its output goes on after it).
    pub after_seq: u64,
}

/// What a cancel asked of a shared store did.
#[derive(Debug, Clone)]
pub enum CancelAck {
    /// No such run.
    NotFound,
    /// It was queued: now cancelled.
    CancelledQueued(Run),
    /// It runs (on some node): that node was asked to stop it.
    RequestedRunning(Run),
    /// It had already finished.
    AlreadyFinished(Run),
}

/// What a store shared by several nodes adds: claims, leases, the reaper, cancel across nodes,
/// and change hints for readers.
pub trait Cluster: Send + Sync + 'static {
    /// This node's id (new at each start).
    fn node_id(&self) -> uuid::Uuid;
    /// A node that has not renewed its lease for this long is dead.
    fn lease_ttl(&self) -> Duration;
    /// Renew this node's lease; report the runs to cancel and the runs taken over.
    fn heartbeat(&self) -> StoreFuture<'_, Heartbeat>;
    /// Take the oldest queued run this node may start (its module under its cluster-wide
    /// limit).
    fn claim(&self) -> StoreFuture<'_, Option<Claimed>>;
    /// Put a run this node claimed back in the queue, unstarted (this node is stopping):
    /// `held` is what it needs to start, as the claim gave it.
    fn unclaim(&self, id: RunId, held: Held) -> StoreFuture<'_, ()>;
    /// The runs of nodes whose lease lapsed become `lost`, or queued again; how many.
    fn reap(&self) -> StoreFuture<'_, usize>;
    /// Ask for a run's cancel wherever it is.
    fn request_cancel(&self, id: RunId, by: Option<String>) -> StoreFuture<'_, CancelAck>;
    /// Hints for the runner.
    fn signals(&self) -> broadcast::Receiver<ClusterSignal>;
    /// A counter that changes when run `id` may have changed (a hint, as [`ClusterSignal`]).
    fn watch(&self, id: RunId) -> watch::Receiver<u64>;
    /// This node no longer holds run `id`.
    fn release(&self, id: RunId);
    /// The runs this node holds.
    fn holds(&self) -> HashSet<RunId>;
    /// This node stops: its row goes.
    fn leave(&self) -> StoreFuture<'_, ()>;
    /// The runs waiting in the shared queue, by module id (for the metrics).
    fn queued_by_module(&self) -> StoreFuture<'_, Vec<(String, usize)>>;
    /// The notification listener, until `stop` fires.
    fn listen(self: Arc<Self>, stop: CancellationToken) -> BoxFuture<'static, ()>;
}

/// The error sentence of a lost run.
pub const LOST_MESSAGE: &str = "modrun stopped while the run was executing";
