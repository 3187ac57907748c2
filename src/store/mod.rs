//! Run records behind a trait, so that the engine can change (memory today; an embedded
//! database and a shared PostgreSQL later) without touching the runner or the HTTP layer.
//!
//! The operations are the ones a *shared* store also needs: create (with an idempotency key),
//! get, check-and-transition, list with filters and a cursor, and retention. Implementations
//! must be quick (no network round trip per call on the hot path) or do their slow work off the
//! async threads; methods never block on one another for long.

mod memory;

use std::sync::Arc;

pub use memory::MemoryStore;

use crate::output::OutputLog;
use crate::run::{Run, RunId, RunState, RunStatus};

/// A client's idempotency key with a fingerprint of the request body it came with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// The `Idempotency-Key` header value.
    pub key: String,
    /// A hash of the canonical JSON of the request body.
    pub fingerprint: u64,
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
    fn allows(self, state: &RunState) -> bool {
        matches!(
            (self, state),
            (Expect::Queued | Expect::Active, RunState::Queued)
                | (Expect::Running | Expect::Active, RunState::Running { .. })
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

/// Store failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No such run (never existed, or evicted by retention).
    #[error("run {0} not found")]
    NotFound(RunId),
    /// The run is not in a state the transition may start from.
    #[error("run {} is {}", .0.id, .0.status())]
    WrongState(Box<Run>),
    /// The idempotency key was used with a different request body.
    #[error("the idempotency key was already used with a different request")]
    IdempotencyConflict,
}

/// Persistence of run records and their output.
pub trait RunStore: Send + Sync + 'static {
    /// Record a new run with its output log. With a key already known for an equal body, return
    /// that run instead; with a different body, [`StoreError::IdempotencyConflict`].
    fn create(
        &self,
        run: Run,
        output: Arc<OutputLog>,
        key: Option<IdempotencyKey>,
    ) -> Result<Created, StoreError>;

    /// The run a key was used for, if it is still retained.
    fn find_idempotent(&self, key: &IdempotencyKey) -> Result<Option<Run>, StoreError>;

    /// A run by id.
    fn get(&self, id: RunId) -> Option<Run>;

    /// A run's output log.
    fn output(&self, id: RunId) -> Option<Arc<OutputLog>>;

    /// Move a run to `next` if its state is one `expect` allows, in one step; wakes the run's
    /// readers. Finishing a run may evict the oldest finished runs past the retention limit.
    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> Result<Run, StoreError>;

    /// A page of runs, newest first.
    fn list(&self, query: &ListQuery) -> Page;
}
