//! A handle on one run: its record, its output (replay then live), cancel, wait.

use std::collections::VecDeque;

use futures_util::Stream as FuturesStream;

use super::ModuleRunner;
use super::request::CancelError;
use crate::registry::Cursor;
use crate::run::{Line, Run, RunId};

/// A handle on one run of a [`ModuleRunner`].
#[derive(Debug, Clone)]
pub struct RunHandle {
    pub(super) id: RunId,
    pub(super) runner: ModuleRunner,
}

impl RunHandle {
    /// The run's id.
    pub fn id(&self) -> RunId {
        self.id
    }

    /// The run as it is now (`None` once purged by retention).
    pub async fn run(&self) -> Option<Run> {
        self.runner.get(self.id).await.ok().flatten()
    }

    /// Every output line with `seq > after`: the retained ones first, then live ones as they
    /// arrive; the stream ends when the run's output is complete.
    pub fn lines(&self, after: u64) -> impl FuturesStream<Item = Line> + Send + 'static {
        let cursor = Cursor::new(self.runner.registry().clone(), self.id, after);
        futures_util::stream::unfold(
            (cursor, VecDeque::<Line>::new()),
            |(mut cursor, mut buf)| async move {
                if buf.is_empty() {
                    buf.extend(cursor.next_batch(1024).await?);
                }
                let line = buf.pop_front()?;
                Some((line, (cursor, buf)))
            },
        )
    }

    /// Cancel it (see [`ModuleRunner::cancel`]).
    pub async fn cancel(&self) -> Result<Run, CancelError> {
        self.runner.cancel(self.id).await
    }

    /// Wait for its final status (`None` if there is no such run).
    pub async fn wait(&self) -> Option<Run> {
        self.runner.wait(self.id).await.ok().flatten()
    }
}
