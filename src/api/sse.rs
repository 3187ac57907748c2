//! `GET /runs/{id}/stream`: Server-Sent Events. First a `status` event with the run as it is,
//! then every line from the requested position (replay, then live), a `status` event on each
//! later status change, and finally `end` with the final run. Each subscriber reads the output
//! log at its own pace through its own cursor, so it can neither slow the run nor lose a line.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::dto::{LineDto, run_json};
use super::error::ApiError;
use super::extract::{QueryPairs, RunIdPath};
use crate::registry::{Cursor, Registry};
use crate::run::{Run, RunId, RunStatus};

/// Lines copied out of the log per read.
const BATCH: usize = 512;

/// `GET /runs/{id}/stream`.
pub async fn stream(
    State(state): State<AppState>,
    RunIdPath(id): RunIdPath,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("the Last-Event-ID header must be a line number")
                })?,
        ),
        None => None,
    };
    let after = match resume {
        Some(n) => n,
        None => query.u64("after")?.unwrap_or(0),
    };
    let registry = state.runner.registry().clone();
    // Make the cursor before looking the run up, so that a run that finishes in between is
    // read from the store, not missed.
    let cursor = Cursor::new(registry.clone(), id, after);
    registry
        .get(id)
        .await
        .map_err(super::runs::store_error)?
        .ok_or_else(|| ApiError::not_found(format!("no run {id}")))?;
    let events = Follow {
        registry,
        id,
        cursor,
        last_status: None,
        pending: VecDeque::new(),
        done: false,
        shutdown: state.streams_end.clone(),
    }
    .into_stream();
    let keep_alive = KeepAlive::new()
        .interval(state.config.sse.keep_alive)
        .text("keep-alive");
    Ok(Sse::new(events).keep_alive(keep_alive).into_response())
}

struct Follow {
    registry: Arc<Registry>,
    id: RunId,
    cursor: Cursor,
    /// The status last sent; `None` before the first event.
    last_status: Option<RunStatus>,
    /// Events ready to send. Bounded: at most one batch of lines plus two status events.
    pending: VecDeque<Event>,
    done: bool,
    shutdown: CancellationToken,
}

fn status_event(kind: &'static str, run: &Run) -> Event {
    Event::default()
        .event(kind)
        .json_data(run_json(run))
        .unwrap_or_else(|_| Event::default().event(kind))
}

impl Follow {
    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Event, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut f| async move {
            let ev = f.next_event().await?;
            Some((Ok(ev), f))
        })
    }

    fn finish(&mut self, run: &Run) {
        self.pending.push_back(status_event("end", run));
        self.done = true;
    }

    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            // Mark changes seen *before* reading status and lines: anything after this point
            // wakes the wait below.
            self.cursor.mark_seen();
            let run = match self.registry.get(self.id).await {
                Ok(Some(run)) => run,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(run_id = %self.id, error = %e, "stream ends: store failed");
                    return None;
                }
            };
            let status = run.status();
            if self.last_status.is_none() {
                self.last_status = Some(status);
                self.pending.push_back(status_event("status", &run));
                continue;
            }
            if self.last_status != Some(status) && !status.is_finished() {
                self.last_status = Some(status);
                self.pending.push_back(status_event("status", &run));
            }
            let lines = match self.cursor.read(BATCH).await {
                Ok(lines) => lines,
                Err(e) => {
                    tracing::warn!(run_id = %self.id, error = %e, "stream ends: store failed");
                    return None;
                }
            };
            if !lines.is_empty() {
                self.pending.extend(lines.iter().map(|l| {
                    Event::default()
                        .event(l.stream.as_str())
                        .id(l.seq.to_string())
                        .json_data(LineDto::from(l))
                        .unwrap_or_else(|_| Event::default().event(l.stream.as_str()))
                }));
                continue;
            }
            if status.is_finished() {
                // The log is closed before the final status is recorded, and this read came
                // after seeing that status: every line has been sent.
                if self.last_status != Some(status) {
                    self.last_status = Some(status);
                    self.pending.push_back(status_event("status", &run));
                }
                self.finish(&run);
                continue;
            }
            tokio::select! {
                () = self.cursor.changed() => {}
                () = self.shutdown.cancelled() => {
                    let run = self.registry.get(self.id).await.ok().flatten().unwrap_or(run);
                    self.finish(&run);
                }
            }
        }
    }
}
