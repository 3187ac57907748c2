//! `/runs` handlers: list, get, cancel here; create (with `?wait` and `Idempotency-Key`) in
//! `create`; output (JSON pages, text, a stream filter) in `output`.

mod create;
mod output;

pub use create::create;
pub use output::output;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::AppState;
use super::access::CallerExt;
use super::dto::{RunDto, run_json};
use super::error::ApiError;
use super::extract::{QueryPairs, RunIdPath};
use crate::auth::Caller;
use crate::module::{FieldError, echo};
use crate::run::{Run, RunId, RunStatus};
use crate::store::ListQuery;

pub(super) fn run_response(status: StatusCode, run: &Run) -> Response {
    // Straight from the wire shape to bytes (no JSON tree in between).
    let mut res = (status, Json(RunDto::from(run))).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/runs/{}", run.id)) {
        res.headers_mut().insert(header::LOCATION, loc);
    }
    res
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): CallerExt,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let limit = query.u64_in("limit", 1..=1000)?.unwrap_or(50) as usize;
    let before =
        match query.get("cursor").filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => Some(c.parse::<RunId>().map_err(|_| {
                ApiError::bad_request(format!("`{}` is not a valid cursor", echo(c)))
            })?),
        };
    let statuses = match query.get("status").filter(|s| !s.is_empty()) {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            let mut errors = Vec::new();
            for s in list.split(',').map(str::trim) {
                match s.parse::<RunStatus>() {
                    Ok(st) => out.push(st),
                    Err(_) => errors.push(FieldError::new(
                        "status",
                        format!(
                            "unknown status `{}`; expected any of {}",
                            echo(s),
                            RunStatus::ALL.map(|s| s.as_str()).join(", ")
                        ),
                    )),
                }
            }
            if !errors.is_empty() {
                return Err(ApiError::validation(errors));
            }
            Some(out)
        }
    };
    let page = state
        .runner
        .list(ListQuery {
            statuses,
            module_id: query
                .get("module_id")
                .filter(|m| !m.is_empty())
                .map(String::from),
            before,
            limit,
            modules: caller.module_patterns().map(<[_]>::to_vec),
        })
        .await?;
    let runs: Vec<Value> = page.runs.iter().map(run_json).collect();
    Ok(Json(json!({
        "runs": runs,
        "next_cursor": page.next_cursor.map(|c| c.to_string()),
    }))
    .into_response())
}

pub(super) fn not_found(id: RunId) -> ApiError {
    ApiError::not_found(format!("no run {id}"))
}

/// The run `id` as the caller may see it: 404 when it does not exist or belongs to a module
/// outside the caller's patterns (the two look the same).
pub(super) async fn visible_run(
    state: &AppState,
    caller: &Caller,
    id: RunId,
) -> Result<Run, ApiError> {
    state
        .runner
        .get(id)
        .await?
        .filter(|run| caller.sees_module(&run.module_id))
        .ok_or_else(|| not_found(id))
}

/// `GET /runs/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): CallerExt,
    RunIdPath(id): RunIdPath,
) -> Result<Response, ApiError> {
    let run = visible_run(&state, &caller, id).await?;
    let mut body = run_json(&run);
    if !run.callbacks.is_empty() {
        let deliveries = state.runner.registry().store().deliveries(id).await?;
        body["callbacks"] = super::dto::callbacks_json(&run, &deliveries);
    }
    Ok(Json(body).into_response())
}

/// `DELETE /runs/{id}`.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): CallerExt,
    RunIdPath(id): RunIdPath,
) -> Result<Response, ApiError> {
    visible_run(&state, &caller, id).await?;
    let run = state
        .runner
        .cancel_by(id, caller.name().map(str::to_owned))
        .await?;
    Ok(run_response(StatusCode::ACCEPTED, &run))
}

pub(super) fn wants_text(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/plain") && !a.contains("application/json"))
}
