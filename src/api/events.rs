//! `GET /events`: every creation and status change of a run, as Server-Sent Events, for a
//! page that shows runs live (the dashboard's table). One `run` event per change, its data
//! the run as `GET /runs/{id}` shows it, its `id` the feed position
//! ([`crate::registry::events`]); a subscriber sees only the runs of modules its token may
//! see. A fresh subscription starts with `ready` (read the runs now: every change after it
//! comes as an event); a resumed one (`Last-Event-ID`) goes on after that event, or gets
//! `reset` when it cannot (the feed restarted, or the subscriber fell more than the feed's
//! ring behind): read the runs afresh.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::access::CallerExt;
use super::dto::RunDto;
use super::error::ApiError;
use super::sse::{Events, OpenStream, event_stream};
use crate::auth::Caller;
use crate::registry::Registry;
use crate::registry::events::Position;

/// Events framed into one write, at most.
const BATCH: usize = 256;

/// `GET /events`.
pub async fn events(
    State(state): State<AppState>,
    Extension(caller): CallerExt,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad_request("the Last-Event-ID header is not text"))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let Ok(slot) = state.streams.clone().try_acquire_owned() else {
        return Err(ApiError::too_many_streams());
    };
    let registry = state.runner.registry().clone();
    let open = OpenStream::new(registry.metrics().clone(), last.is_some());
    let changes = registry.feed().subscribe();
    let (pos, first) = match registry.feed().position(last.as_deref()) {
        Position::After(seq) if last.is_some() => (seq, None),
        Position::After(seq) => (seq, Some("ready")),
        Position::Lost => (registry.feed().last(), Some("reset")),
    };
    let follow = FeedFollow {
        registry,
        caller,
        pos,
        first,
        changes,
        shutdown: state.streams_end.clone(),
        keep_alive: state.config().sse.keep_alive,
        done: false,
        _slot: slot,
        _open: open,
    };
    Ok(event_stream(follow))
}

impl Events for FeedFollow {
    fn next_chunk(&mut self) -> impl Future<Output = Option<Bytes>> + Send + '_ {
        FeedFollow::next_events(self)
    }
}

struct FeedFollow {
    registry: Arc<Registry>,
    caller: Arc<Caller>,
    /// The last feed seq this subscriber has been given (or skipped: a run it may not see).
    pos: u64,
    /// The event to send first (`ready` or `reset`), if any.
    first: Option<&'static str>,
    changes: watch::Receiver<u64>,
    shutdown: CancellationToken,
    keep_alive: Duration,
    done: bool,
    /// The stream's place under `sse.max_streams`.
    _slot: tokio::sync::OwnedSemaphorePermit,
    _open: OpenStream,
}

impl FeedFollow {
    fn push_marker(&self, buf: &mut Vec<u8>, kind: &str) {
        let id = self.registry.feed().event_id(self.pos);
        buf.extend_from_slice(format!("event: {kind}\nid: {id}\ndata: {{}}\n\n").as_bytes());
    }

    async fn next_events(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut buf = Vec::new();
        if let Some(kind) = self.first.take() {
            self.push_marker(&mut buf, kind);
            return Some(Bytes::from(buf));
        }
        loop {
            self.changes.borrow_and_update();
            let feed = self.registry.feed();
            match feed.read_after(self.pos, BATCH) {
                Err(()) => {
                    // Fell behind the ring: start again from now.
                    self.pos = feed.last();
                    self.push_marker(&mut buf, "reset");
                    return Some(Bytes::from(buf));
                }
                Ok(events) => {
                    for e in &events {
                        self.pos = e.seq;
                        if !self.caller.sees_module(&e.run.module_id) {
                            continue;
                        }
                        buf.extend_from_slice(b"event: run\nid: ");
                        buf.extend_from_slice(feed.event_id(e.seq).as_bytes());
                        buf.extend_from_slice(b"\ndata: ");
                        let _ = serde_json::to_writer(&mut buf, &RunDto::from(&*e.run));
                        buf.extend_from_slice(b"\n\n");
                    }
                    if !buf.is_empty() {
                        return Some(Bytes::from(buf));
                    }
                    if !events.is_empty() {
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = self.changes.changed() => {}
                () = tokio::time::sleep(self.keep_alive) => {
                    return Some(Bytes::from_static(b": keep-alive\n\n"));
                }
                () = self.shutdown.cancelled() => {
                    self.done = true;
                    return None;
                }
            }
        }
    }
}
