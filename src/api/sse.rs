//! `GET /runs/{id}/stream`: Server-Sent Events. First a `status` event with the run as it is,
//! then every line from the requested position (replay, then live), a `status` event on each
//! later status change, and finally `end` with the final run. Each subscriber reads the output
//! log at its own pace through its own cursor, so it can neither slow the run nor lose a line.
//!
//! Events are framed here, a batch of lines into one buffer per write, rather than one
//! framework event per line: at a million lines a second the per-event allocations, the
//! keep-alive timer reset per event and the per-line timestamp formatting were the cost.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::access::CallerExt;
use super::dto::RunDto;
use super::error::ApiError;
use super::extract::{QueryPairs, RunIdPath};
use crate::registry::{Cursor, Registry};
use crate::run::{Line, Run, RunId, RunState, RunStatus, rfc3339};
use crate::store::StoreError;

/// Lines copied out of the log (and framed into one write) per read.
const BATCH: usize = 2048;
/// How often a stream looks again while the store is away.
const STORE_RETRY: Duration = Duration::from_millis(500);

/// `GET /runs/{id}/stream`.
pub async fn stream(
    State(state): State<AppState>,
    Extension(caller): CallerExt,
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
    // Both are checked; the header (what a reconnecting EventSource sends) wins.
    let after_query = query.u64("after")?;
    let after = resume.or(after_query).unwrap_or(0);
    let Ok(slot) = state.streams.clone().try_acquire_owned() else {
        return Err(ApiError::too_many_streams());
    };
    let registry = state.runner.registry().clone();
    let open = OpenStream::new(registry.metrics().clone(), resume.is_some());
    // Make the cursor before looking the run up, so that a run that finishes in between is
    // read from the store, not missed.
    let cursor = Cursor::new(registry.clone(), id, after);
    super::runs::visible_run(&state, &caller, id).await?;
    let follow = Follow {
        registry,
        id,
        cursor,
        last_status: None,
        done: false,
        shutdown: state.streams_end.clone(),
        keep_alive: state.config().sse.keep_alive,
        ts_cache: None,
        _slot: Some(slot),
        _open: open,
    };
    Ok(event_stream(follow))
}

/// What an event stream sends: its next whole events (or a keep-alive comment), `None` once
/// it is over.
pub(super) trait Events: Send + 'static {
    /// The next bytes to send.
    fn next_chunk(&mut self) -> impl Future<Output = Option<Bytes>> + Send + '_;
}

impl Events for Follow {
    fn next_chunk(&mut self) -> impl Future<Output = Option<Bytes>> + Send + '_ {
        Follow::next_events(self)
    }
}

/// The response of an event stream: `source`'s chunks as they come, not buffered by proxies.
pub(super) fn event_stream(source: impl Events) -> Response {
    let body = futures_util::stream::unfold(source, |mut f| async move {
        let chunk = f.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), f))
    });
    let mut res = Body::from_stream(body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

struct Follow {
    registry: Arc<Registry>,
    id: RunId,
    cursor: Cursor,
    /// The status last sent; `None` before the first event.
    last_status: Option<RunStatus>,
    done: bool,
    shutdown: CancellationToken,
    /// A `: keep-alive` comment goes out when the stream has been quiet this long.
    keep_alive: Duration,
    /// The last timestamp formatted (lines of one read batch share it).
    ts_cache: Option<(SystemTime, String)>,
    /// The stream's place under `sse.max_streams`, given back when the stream is dropped.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Counted in `modrun_sse_streams_open` while it lives.
    _open: OpenStream,
}

/// An open stream, as the metrics see it: counted open from its creation to its drop.
pub(super) struct OpenStream(Arc<crate::metrics::Metrics>);

impl OpenStream {
    pub(super) fn new(metrics: Arc<crate::metrics::Metrics>, resumed: bool) -> Self {
        metrics.sse_open.inc();
        if resumed {
            metrics.sse_resumed.inc();
        }
        Self(metrics)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.sse_open.dec();
    }
}

/// A JSON string literal: copied as is when nothing needs escaping (the common case), else
/// escaped by serde_json.
fn push_json_str(buf: &mut Vec<u8>, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(text.as_bytes());
        buf.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *buf, text);
    }
}

fn push_run_event(buf: &mut Vec<u8>, kind: &str, run: &Run) {
    buf.extend_from_slice(b"event: ");
    buf.extend_from_slice(kind.as_bytes());
    buf.extend_from_slice(b"\ndata: ");
    // A JSON serialisation never contains a raw newline, so one data line is enough.
    let _ = serde_json::to_writer(&mut *buf, &RunDto::from(run));
    buf.extend_from_slice(b"\n\n");
}

impl Follow {
    fn push_line(&mut self, buf: &mut Vec<u8>, l: &Line) {
        let ts = match &self.ts_cache {
            Some((t, s)) if *t == l.ts => s,
            _ => &self.ts_cache.insert((l.ts, rfc3339(l.ts))).1,
        };
        let stream = l.stream.as_str().as_bytes();
        let mut seq = itoa::Buffer::new();
        let seq = seq.format(l.seq).as_bytes();
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(stream);
        buf.extend_from_slice(b"\nid: ");
        buf.extend_from_slice(seq);
        buf.extend_from_slice(b"\ndata: {\"seq\":");
        buf.extend_from_slice(seq);
        buf.extend_from_slice(b",\"stream\":\"");
        buf.extend_from_slice(stream);
        buf.extend_from_slice(b"\",\"ts\":\"");
        buf.extend_from_slice(ts.as_bytes());
        buf.extend_from_slice(b"\",\"line\":");
        push_json_str(buf, &l.text);
        if let Some(raw) = &l.raw {
            // Not valid UTF-8: the bytes themselves, for clients that need them exact.
            buf.extend_from_slice(b",\"bytes\":\"");
            buf.extend_from_slice(B64.encode(raw).as_bytes());
            buf.push(b'"');
        }
        buf.extend_from_slice(b"}\n\n");
    }

    fn finish(&mut self, buf: &mut Vec<u8>, run: &Run) {
        push_run_event(buf, "end", run);
        self.done = true;
    }

    /// A read from the store failed. While it is away (an outage that passes: a database
    /// restarting, a full disk) the stream waits for it, with a comment now and then so that
    /// the connection stays open, and goes on where it was; any other failure ends the stream
    /// (the client may resume by id).
    async fn store_failed(&mut self, e: StoreError) -> Option<Bytes> {
        if !matches!(e, StoreError::Unavailable(..)) {
            tracing::warn!(run_id = %self.id, error = %e, "stream ends: store failed");
            return None;
        }
        tracing::debug!(run_id = %self.id, error = %e, "stream waits for the store");
        tokio::select! {
            () = tokio::time::sleep(STORE_RETRY.min(self.keep_alive)) => {}
            () = self.shutdown.cancelled() => return None,
        }
        Some(Bytes::from_static(b": waiting for the run store\n\n"))
    }

    /// The next bytes to send: one or more whole events (or a keep-alive comment); `None` once
    /// the stream is over.
    async fn next_events(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut buf = Vec::new();
        loop {
            // Mark changes seen *before* reading status and lines: anything after this point
            // wakes the wait below.
            self.cursor.mark_seen();
            let run = match self.registry.get(self.id).await {
                Ok(Some(run)) => run,
                Ok(None) => return None,
                Err(e) => return self.store_failed(e).await,
            };
            let status = run.status();
            // The first event is always the run as it is; later ones on each change (a final
            // status comes with `end`, below, once every line is out).
            let first = self.last_status.is_none();
            if self.last_status == Some(RunStatus::Queued)
                && status.is_finished()
                && let Some(started) = as_started(&run)
            {
                // It started and finished between two reads: `running` still gets its event
                // (before the lines), as every status change does.
                self.last_status = Some(RunStatus::Running);
                push_run_event(&mut buf, "status", &started);
            }
            if first || (self.last_status != Some(status) && !status.is_finished()) {
                self.last_status = Some(status);
                push_run_event(&mut buf, "status", &run);
            }
            let lines = match self.cursor.read(BATCH).await {
                Ok(lines) => lines,
                Err(e) => return self.store_failed(e).await,
            };
            if !lines.is_empty() {
                buf.reserve(lines.iter().map(|l| l.text.len() + 96).sum());
                for l in &lines {
                    self.push_line(&mut buf, l);
                }
                return Some(Bytes::from(buf));
            }
            if status.is_finished() {
                // The log is closed before the final status is recorded, and this read came
                // after seeing that status: every line has been sent.
                if self.last_status != Some(status) {
                    self.last_status = Some(status);
                    push_run_event(&mut buf, "status", &run);
                }
                self.finish(&mut buf, &run);
                return Some(Bytes::from(buf));
            }
            if !buf.is_empty() {
                return Some(Bytes::from(buf));
            }
            tokio::select! {
                () = self.cursor.changed() => {}
                () = tokio::time::sleep(self.keep_alive) => {
                    return Some(Bytes::from_static(b": keep-alive\n\n"));
                }
                () = self.shutdown.cancelled() => {
                    let run = self.registry.get(self.id).await.ok().flatten().unwrap_or(run);
                    self.finish(&mut buf, &run);
                    return Some(Bytes::from(buf));
                }
            }
        }
    }
}

/// A finished run as it was when it started (no output yet), if it ever did.
fn as_started(run: &Run) -> Option<Run> {
    let RunState::Finished {
        started_at: Some(started_at),
        pid,
        ..
    } = run.state
    else {
        return None;
    };
    Some(Run {
        state: RunState::Running {
            started_at,
            pid,
            stopping: false,
        },
        output_lines: 0,
        ..run.clone()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use tokio_util::sync::CancellationToken;

    use super::{Follow, push_json_str};
    use crate::output::OutputLimits;
    use crate::registry::{Cursor, Registry};
    use crate::run::{Exit, Outcome, Run, RunState};
    use crate::store::{Expect, MemoryStore, NewRun};

    /// A subscriber that saw the run queued, and next sees it finished, still gets `running`
    /// (before the final status and `end`).
    #[tokio::test]
    async fn a_status_that_came_and_went_between_reads_gets_its_event() {
        let registry = Arc::new(Registry::new(
            Arc::new(MemoryStore::new()),
            OutputLimits::default(),
        ));
        let run = Run {
            module_name: "M".into(),
            timeout: Duration::from_secs(10),
            ..Run::queued_for_test("m")
        };
        let id = run.id;
        registry
            .create(
                NewRun {
                    run,
                    key: None,
                    held: Default::default(),
                    policy: Default::default(),
                },
                None,
            )
            .await
            .unwrap();
        let mut follow = Follow {
            registry: registry.clone(),
            id,
            cursor: Cursor::new(registry.clone(), id, 0),
            last_status: None,
            done: false,
            shutdown: CancellationToken::new(),
            keep_alive: Duration::from_secs(60),
            ts_cache: None,
            _slot: None,
            _open: super::OpenStream::new(registry.metrics().clone(), false),
        };
        let events = |chunk: &[u8]| -> Vec<(String, String)> {
            String::from_utf8_lossy(chunk)
                .split("\n\n")
                .filter(|e| !e.is_empty())
                .map(|e| {
                    let field = |name: &str| {
                        e.lines()
                            .find_map(|l| l.strip_prefix(name))
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let data: serde_json::Value = serde_json::from_str(&field("data: ")).unwrap();
                    (
                        field("event: "),
                        data["status"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        let first = follow.next_events().await.unwrap();
        assert_eq!(events(&first), [("status".into(), "queued".into())]);

        let started_at = SystemTime::now();
        let running = RunState::Running {
            started_at,
            pid: Some(42),
            stopping: false,
        };
        registry
            .transition(id, Expect::Queued, running)
            .await
            .unwrap();
        registry.live_log(id).unwrap().close();
        let finished = RunState::Finished {
            started_at: Some(started_at),
            pid: Some(42),
            finished_at: SystemTime::now(),
            outcome: Outcome::Exited(Exit::Code(0)),
        };
        registry
            .transition(id, Expect::Running, finished)
            .await
            .unwrap();
        let rest = follow.next_events().await.unwrap();
        let expected: Vec<(String, String)> = [
            ("status", "running"),
            ("status", "succeeded"),
            ("end", "succeeded"),
        ]
        .map(|(e, s)| (e.to_owned(), s.to_owned()))
        .to_vec();
        assert_eq!(events(&rest), expected);
        assert!(follow.next_events().await.is_none());
    }

    #[test]
    fn json_strings_are_escaped_only_when_needed() {
        for text in [
            "plain text",
            "quote \" here",
            "back\\slash",
            "tab\there",
            "\u{1}",
            "é ✓",
            "",
        ] {
            let mut buf = Vec::new();
            push_json_str(&mut buf, text);
            let back: String = serde_json::from_slice(&buf).unwrap();
            assert_eq!(back, text);
        }
    }
}
