//! `/runs` handlers: create (with `?wait` and `Idempotency-Key`), list, get, cancel, output.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Map, Value, json};

use super::AppState;
use super::access::CallerExt;
use super::dto::{LineDto, run_json};
use super::error::{ApiError, Message};
use super::extract::{JsonBody, QueryPairs, RunIdPath};
use crate::auth::Caller;
use crate::module::{FieldError, echo, exec_size, json_type};
use crate::run::{Run, RunId, RunMode, RunStatus};
use crate::runner::{self, RunRequest, Submitted};
use crate::store::{IdempotencyKey, ListQuery};

fn run_response(status: StatusCode, run: &Run) -> Response {
    let mut res = (status, Json(run_json(run))).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/runs/{}", run.id)) {
        res.headers_mut().insert(header::LOCATION, loc);
    }
    res
}

/// The shortest timeout a request may ask for.
const MIN_TIMEOUT_S: f64 = 0.001;

/// A create request that passed the shape checks.
struct CreateBody {
    module_id: String,
    parameters: Map<String, Value>,
    timeout_s: Option<f64>,
    mode: Option<RunMode>,
    stdin: Option<String>,
    callbacks: Vec<String>,
}

/// Callback URLs a request may name, at most.
const MAX_REQUEST_CALLBACKS: usize = 8;

/// Shape checks of a create body. Returns the body with the errors found so far (so that the
/// handler can add parameter errors and report every bad field at once), or a 422 when not even
/// the module is known.
fn parse_create(body: &Value) -> Result<(CreateBody, Vec<FieldError>), ApiError> {
    let Value::Object(obj) = body else {
        return Err(ApiError::invalid_field(
            "body",
            format!("must be a JSON object, got {}", json_type(body)),
        ));
    };
    let mut errors = Vec::new();
    for key in obj.keys() {
        if ![
            "module_id",
            "parameters",
            "timeout_s",
            "mode",
            "stdin",
            "callbacks",
        ]
        .contains(&key.as_str())
        {
            errors.push(FieldError::new(key.as_str(), "unknown field"));
        }
    }
    let module_id = match obj.get("module_id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            errors.push(FieldError::new(
                "module_id",
                format!("must be a string, got {}", json_type(other)),
            ));
            None
        }
        None => {
            errors.push(FieldError::new("module_id", "is required"));
            None
        }
    };
    let parameters = match obj.get("parameters") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            errors.push(FieldError::new(
                "parameters",
                format!("must be an object, got {}", json_type(other)),
            ));
            Map::new()
        }
    };
    let timeout_s = match obj.get("timeout_s") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t.is_finite() && (MIN_TIMEOUT_S..1e9).contains(&t) => Some(t),
            Some(t) if t < MIN_TIMEOUT_S => {
                errors.push(FieldError::new(
                    "timeout_s",
                    format!("must be at least {MIN_TIMEOUT_S} seconds (1 ms), got {t:e}"),
                ));
                None
            }
            _ => {
                errors.push(FieldError::new(
                    "timeout_s",
                    "must be a number of seconds no larger than the module's timeout",
                ));
                None
            }
        },
        Some(other) => {
            errors.push(FieldError::new(
                "timeout_s",
                format!("must be a number, got {}", json_type(other)),
            ));
            None
        }
    };
    let mode = opt_str(obj, "mode", &mut errors).and_then(|m| match m.parse::<RunMode>() {
        Ok(m) => Some(m),
        Err(_) => {
            errors.push(FieldError::new(
                "mode",
                format!(
                    "unknown run mode `{}` (expected one of {})",
                    echo(m),
                    RunMode::ALL.map(|m| m.as_str()).join(", ")
                ),
            ));
            None
        }
    });
    let stdin = opt_str(obj, "stdin", &mut errors).map(str::to_owned);
    let mut callbacks = Vec::new();
    match obj.get("callbacks") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) if list.len() <= MAX_REQUEST_CALLBACKS => {
            for (i, v) in list.iter().enumerate() {
                match v {
                    Value::String(s) => callbacks.push(s.clone()),
                    other => errors.push(FieldError::new(
                        format!("callbacks[{i}]"),
                        format!("must be a string, got {}", json_type(other)),
                    )),
                }
            }
        }
        Some(Value::Array(_)) => errors.push(FieldError::new(
            "callbacks",
            format!("at most {MAX_REQUEST_CALLBACKS} URLs"),
        )),
        Some(other) => errors.push(FieldError::new(
            "callbacks",
            format!("must be an array of URLs, got {}", json_type(other)),
        )),
    }
    match module_id {
        Some(module_id) => Ok((
            CreateBody {
                module_id,
                parameters,
                timeout_s,
                mode,
                stdin,
                callbacks,
            },
            errors,
        )),
        None => Err(ApiError::validation(errors)),
    }
}

/// An optional string field: `None` when absent or null; another type is recorded as an error.
fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            errors.push(FieldError::new(
                field,
                format!("must be a string, got {}", json_type(other)),
            ));
            None
        }
    }
}

fn idempotency_key(headers: &HeaderMap, body: &Value) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::bad_request(
                "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
            )
        })?;
    // serde_json's maps are sorted, so equal JSON bodies have equal text here. FNV-1a: the
    // fingerprint is stored, so it must not change between builds (std's hasher may).
    let fingerprint = body
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    Ok(Some(IdempotencyKey {
        key: key.to_owned(),
        fingerprint,
    }))
}

/// `POST /runs`.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): CallerExt,
    query: QueryPairs,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let wait = query.u64_in("wait", 1..=300)?;
    let key = idempotency_key(&headers, &body)?;
    let (req, mut errors) = parse_create(&body)?;
    let live = state.live.get();
    let config = &live.config;
    let module = config
        .module(&req.module_id)
        .filter(|m| caller.sees_module(&m.id))
        .ok_or_else(|| ApiError::not_found(format!("no module `{}`", echo(&req.module_id))))?;

    let params = module
        .validate(&req.parameters)
        .map_err(|e| errors.extend(e))
        .ok();
    let max_timeout = config.module_timeout(module);
    let timeout = match req.timeout_s {
        None => max_timeout,
        Some(t) => {
            let asked = Duration::from_secs_f64(t);
            if asked > max_timeout {
                errors.push(FieldError::new(
                    "timeout_s",
                    format!(
                        "must be at most {} seconds (the module's timeout), got {t}",
                        max_timeout.as_secs_f64()
                    ),
                ));
            }
            asked
        }
    };
    if let Some(m) = req.mode
        && !config.runner.request_modes.contains(&m)
    {
        errors.push(FieldError::new(
            "mode",
            format!(
                "mode `{m}` may not be chosen by a request here (allowed: {})",
                config
                    .runner
                    .request_modes
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    for (i, url) in req.callbacks.iter().enumerate() {
        if !crate::callbacks::allowed(url, &config.callbacks.allow_urls) {
            errors.push(FieldError::new(
                format!("callbacks[{i}]"),
                if config.callbacks.allow_urls.is_empty() {
                    "this server takes no callback URLs from requests (callbacks.allow_urls is empty)".to_owned()
                } else {
                    format!(
                        "`{}` is not under a URL prefix this server allows (callbacks.allow_urls)",
                        echo(url)
                    )
                },
            ));
        }
    }
    let Some(params) = params.filter(|_| errors.is_empty()) else {
        return Err(ApiError::validation(errors));
    };
    let mode = req.mode.unwrap_or(config.runner.mode);
    let mut run_req = RunRequest::for_module(module, params, &live.base_env, timeout, mode);
    if let Some(tp) = traceparent(&headers) {
        // The run's programs join the caller's trace (W3C Trace Context, as environment
        // variable). Only a well-formed value is passed on; anything else is dropped.
        run_req.env.retain(|(k, _)| k != "TRACEPARENT");
        run_req.env.push(("TRACEPARENT".to_owned(), tp));
    }
    let size = exec_size(
        run_req.argv.iter().map(String::as_str),
        run_req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    ) + runner::RUN_MARKER_BYTES;
    if size > runner::arg_max() {
        return Err(ApiError::invalid_field(
            "parameters",
            format!(
                "the command line and environment would take {size} bytes, over the system's limit of {} bytes",
                runner::arg_max()
            ),
        ));
    }
    if req.stdin.is_some() {
        if let Some(p) = module.stdin_parameter() {
            return Err(ApiError::invalid_field(
                "stdin",
                format!(
                    "module `{}` takes its stdin from the parameter `{}`",
                    module.id, p.name
                ),
            ));
        }
        run_req.stdin = req.stdin;
    }
    run_req.callbacks.extend(req.callbacks);
    run_req.idempotency = key;
    run_req.created_by = caller.name().map(str::to_owned);
    run_req.request_id = super::error::REQUEST_ID.try_with(|id| id.to_string()).ok();

    let module_id = run_req.module_id.clone();
    let (handle, existing) = match state.runner.submit(run_req).await? {
        Submitted::New(h) => {
            let accepted = &state.runner.registry().metrics().runs_accepted;
            accepted
                .get_or_create(&crate::metrics::ModuleLabel { module: module_id })
                .inc();
            (h, false)
        }
        Submitted::Existing(h) => (h, true),
    };
    let id = handle.id();
    if let Some(secs) = wait {
        let waited = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(secs), handle.wait()) => r.ok().flatten(),
            () = state.streams_end.cancelled() => None,
        };
        if let Some(run) = waited {
            return Ok(run_response(StatusCode::OK, &run));
        }
    }
    let run = state
        .runner
        .get(id)
        .await?
        .ok_or_else(|| ApiError::internal(Message(format!("run {id} vanished"))))?;
    let status = if existing {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(run_response(status, &run))
}

/// `GET /runs`.
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

fn not_found(id: RunId) -> ApiError {
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

fn wants_text(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/plain") && !a.contains("application/json"))
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
    let run = visible_run(&state, &caller, id).await?;
    let registry = state.runner.registry().clone();
    if wants_text(&headers) {
        // Stream the text in batches rather than building it whole.
        let body = futures_util::stream::unfold(Some(after), move |pos| {
            let registry = registry.clone();
            async move {
                let pos = pos?;
                let lines = match registry.read_output(id, pos, 4096).await {
                    Ok(Some(lines)) => lines,
                    Ok(None) => return None,
                    Err(e) => {
                        return Some((Err(std::io::Error::other(e.to_string())), None));
                    }
                };
                let last = lines.last()?.seq;
                let mut text = String::with_capacity(lines.iter().map(|l| l.text.len() + 1).sum());
                for l in &lines {
                    text.push_str(&l.text);
                    text.push('\n');
                }
                Some((Ok(Bytes::from(text)), Some(last)))
            }
        });
        let mut res = Body::from_stream(body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return Ok(res);
    }
    let lines = registry
        .read_output(id, after, limit)
        .await?
        .ok_or_else(|| not_found(id))?;
    let next_after = lines.last().map_or(after, |l| l.seq);
    // A finished run's log was closed before its final status was recorded: its line count
    // is final.
    let complete = run.state.is_finished() && next_after >= run.output_lines;
    let dtos: Vec<LineDto> = lines.iter().map(LineDto::from).collect();
    Ok(Json(json!({
        "lines": dtos,
        "next_after": next_after,
        "complete": complete,
    }))
    .into_response())
}

/// The request's `traceparent` header when it is a valid W3C Trace Context value
/// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lower-case, ids not all zero).
fn traceparent(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("traceparent")?.to_str().ok()?.trim();
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    let zero = |s: &str| s.bytes().all(|c| c == b'0');
    match parts.as_slice() {
        [version, trace, parent, flags]
            if *version == "00"
                && hex(trace, 32)
                && hex(parent, 16)
                && hex(flags, 2)
                && !zero(trace)
                && !zero(parent) =>
        {
            Some(v.to_owned())
        }
        _ => None,
    }
}
