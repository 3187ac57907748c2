//! Reading a run's output: a cursor that replays from any seq (from the live log's memory or
//! from the store) and then follows live, with no gap and no duplicate.

use std::sync::Arc;

use tokio::sync::watch;

use super::Registry;
use crate::output::{Evicted, OutputLog};
use crate::run::{Line, RunId};
use crate::store::StoreError;

/// How often a reader of a run that executes on another node looks again without a
/// notification.
const REMOTE_POLL: std::time::Duration = std::time::Duration::from_millis(500);

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
        // A run live here signals through its log; one that runs on another node through the
        // shared store's notifications (hints: `changed` also polls).
        let changes = match (&log, registry.cluster()) {
            (Some(l), _) => Some(l.subscribe()),
            (None, Some(c)) => Some(c.watch(id)),
            (None, None) => None,
        };
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
        self.follow_moves();
        if let Some(c) = &mut self.changes {
            c.borrow_and_update();
        }
    }

    /// In a cluster a run moves: claimed here after the cursor was made (read its live log
    /// from now on), or retired here (ended, or taken over by another node: read the store).
    fn follow_moves(&mut self) {
        let Some(cluster) = self.registry.cluster() else {
            return;
        };
        let live = self.registry.live_log(self.id);
        match (&self.log, live) {
            (None, Some(now)) => {
                self.changes = Some(now.subscribe());
                self.log = Some(now);
            }
            (Some(old), now)
                if old.is_closed() && now.as_ref().is_none_or(|n| !Arc::ptr_eq(n, old)) =>
            {
                // Everything it had is in the store (it was retired) or never will be (it was
                // taken over): the store has the run's output from here on.
                self.changes = Some(match &now {
                    Some(l) => l.subscribe(),
                    None => cluster.watch(self.id),
                });
                self.log = now;
            }
            _ => {}
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
        let remote = self.log.is_none();
        match &mut self.changes {
            // A run of another node: its notifications are hints; poll too.
            Some(c) if remote => {
                tokio::select! {
                    _ = c.changed() => {}
                    () = tokio::time::sleep(REMOTE_POLL) => {}
                }
            }
            // The sender lives in the log, which this cursor keeps alive: this cannot fail.
            Some(c) => {
                let _ = c.changed().await;
            }
            None => std::future::pending().await,
        }
    }

    /// True once every line of the run is in: its log is closed, or (not live here) the run
    /// has finished.
    async fn complete(&self) -> bool {
        match &self.log {
            Some(l) => l.is_closed(),
            None if self.registry.cluster().is_none() => true,
            None => match self.registry.get(self.id).await {
                Ok(Some(run)) => run.state.is_finished(),
                _ => true,
            },
        }
    }

    /// The next batch of lines, waiting for them; `None` once all output has been read (or the
    /// store failed).
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<Line>> {
        loop {
            self.mark_seen();
            let closed = self.complete().await;
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
