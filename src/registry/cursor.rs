//! Reading a run's output: a cursor that replays from any seq (from the live log's memory or
//! from the store) and then follows live, with no gap and no duplicate.

use std::sync::Arc;

use tokio::sync::watch;

use super::Registry;
use crate::output::{Evicted, OutputLog};
use crate::run::{Line, RunId};
use crate::store::StoreError;

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
        let changes = log.as_ref().map(|l| l.subscribe());
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
        if let Some(c) = &mut self.changes {
            c.borrow_and_update();
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
        match &mut self.changes {
            // The sender lives in the log, which this cursor keeps alive: this cannot fail.
            Some(c) => {
                let _ = c.changed().await;
            }
            None => std::future::pending().await,
        }
    }

    /// The next batch of lines, waiting for them; `None` once all output has been read (or the
    /// store failed).
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<Line>> {
        loop {
            self.mark_seen();
            let closed = self.log.as_ref().is_none_or(|l| l.is_closed());
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
