//! A run's output over HTTP: JSON pages, or the text (`Accept: text/plain`) streamed in
//! batches; `?stream=stdout|stderr` keeps one of the two. The text body is shared with
//! `POST /runs?wait` answered as text.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::{not_found, visible_run, wants_text};
use crate::api::AppState;
use crate::api::access::CallerExt;
use crate::api::dto::LineDto;
use crate::api::error::ApiError;
use crate::api::extract::{QueryPairs, RunIdPath};
use crate::module::echo;
use crate::output::OutputLog;
use crate::registry::Registry;
use crate::run::{Line, RunId, Stream};

/// Which of a run's lines a reader wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamFilter {
    /// Both streams, in capture order.
    Both,
    /// One of them.
    Only(Stream),
}

impl StreamFilter {
    /// `?stream=stdout|stderr` (absent or empty: both); 422 for anything else.
    pub(super) fn from_query(query: &QueryPairs) -> Result<Self, ApiError> {
        match query.get("stream").map(str::trim) {
            None | Some("") => Ok(StreamFilter::Both),
            Some("stdout") => Ok(StreamFilter::Only(Stream::Stdout)),
            Some("stderr") => Ok(StreamFilter::Only(Stream::Stderr)),
            Some(other) => Err(ApiError::invalid_field(
                "stream",
                format!("must be `stdout` or `stderr`, got `{}`", echo(other)),
            )),
        }
    }

    /// Whether `line` passes.
    pub(super) fn keeps(self, line: &Line) -> bool {
        match self {
            StreamFilter::Both => true,
            StreamFilter::Only(s) => line.stream == s,
        }
    }
}

/// Lines read per batch of a text body...
const TEXT_BATCH: usize = 4096;
/// ...and text bytes per batch copied from a live log (under its lock), past the first line.
const TEXT_BYTES: usize = 256 * 1024;

/// The run's output after line `after` as text (each line's bytes as the program wrote them,
/// and `\n`: a line that is not valid UTF-8 comes as its bytes), read and sent in batches
/// rather than built whole. `log`, the run's output log taken while it was live, answers from
/// memory what it still holds (a run that just ended: no store read).
pub(super) fn text_body(
    registry: Arc<Registry>,
    id: RunId,
    after: u64,
    filter: StreamFilter,
    log: Option<Arc<OutputLog>>,
) -> Body {
    let body = futures_util::stream::unfold(Some(after), move |pos| {
        let registry = registry.clone();
        let log = log.clone();
        async move {
            let pos = pos?;
            if let Some(l) = &log {
                // From memory: the text copied straight from the log.
                let mut text = Vec::new();
                match l.text_after(pos, TEXT_BATCH, TEXT_BYTES, |l| filter.keeps(l), &mut text) {
                    Ok(Some(last)) => return Some((Ok(Bytes::from(text)), Some(last))),
                    // A closed log that holds nothing after `pos`: the output ends there.
                    Ok(None) if l.is_closed() => return None,
                    // Not there yet, or persisted and dropped from memory: the store.
                    _ => {}
                }
            }
            let lines = match registry.read_output(id, pos, TEXT_BATCH).await {
                Ok(Some(lines)) => lines,
                Ok(None) => return None,
                Err(e) => {
                    return Some((Err(std::io::Error::other(e.to_string())), None));
                }
            };
            let last = lines.last()?.seq;
            let kept = lines.iter().filter(|l| filter.keeps(l));
            let mut text = Vec::with_capacity(lines.iter().map(|l| l.bytes().len() + 1).sum());
            for l in kept {
                text.extend_from_slice(l.bytes());
                text.push(b'\n');
            }
            Some((Ok(Bytes::from(text)), Some(last)))
        }
    });
    Body::from_stream(body)
}

/// `text/plain; charset=utf-8`.
pub(super) fn text_type() -> HeaderValue {
    HeaderValue::from_static("text/plain; charset=utf-8")
}

/// `GET /runs/{id}/output`.
pub async fn output(
    State(state): State<AppState>,
    Extension(caller): CallerExt,
    RunIdPath(id): RunIdPath,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = query.u64("after")?.unwrap_or(0);
    let limit = query.u64_in("limit", 1..=10_000)?.unwrap_or(1000) as usize;
    let filter = StreamFilter::from_query(&query)?;
    let run = visible_run(&state, &caller, id).await?;
    let registry = state.runner.registry().clone();
    if wants_text(&headers) {
        let mut res = text_body(registry, id, after, filter, None).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, text_type());
        return Ok(res);
    }
    let lines = registry
        .read_output(id, after, limit)
        .await?
        .ok_or_else(|| not_found(id))?;
    // The cursor moves past every line read, kept or not: a page of one stream may hold
    // fewer lines than `limit` (even none) before the output is complete.
    let next_after = lines.last().map_or(after, |l| l.seq);
    // A finished run's log was closed before its final status was recorded: its line count
    // is final.
    let complete = run.state.is_finished() && next_after >= run.output_lines;
    let dtos: Vec<LineDto> = lines
        .iter()
        .filter(|l| filter.keeps(l))
        .map(LineDto::from)
        .collect();
    Ok(Json(json!({
        "lines": dtos,
        "next_after": next_after,
        "complete": complete,
    }))
    .into_response())
}
