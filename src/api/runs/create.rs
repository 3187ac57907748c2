//! `POST /runs`: the body's shape, the module's parameters, callbacks, `traceparent`, the
//! `Idempotency-Key`, and `?wait`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Map, Value, json};

use super::output::{StreamFilter, text_body, text_type};
use super::wants_text;
use crate::api::AppState;
use crate::api::access::CallerExt;
use crate::api::dto::{LineDto, run_json};
use crate::api::error::{ApiError, Message};
use crate::api::extract::{JsonBody, QueryPairs};
use crate::module::{FieldError, echo, exec_size, json_type};
use crate::output::OutputLog;
use crate::run::{Run, RunMode};
use crate::runner::{self, RunRequest, Submitted};
use crate::store::IdempotencyKey;

/// `?include=output` adds at most this many lines to the run...
const INCLUDE_LINES: usize = 1000;
/// ...and at most this much of their text.
const INCLUDE_BYTES: usize = 1 << 20;

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
    // Keys sorted at every level, so equal JSON bodies have equal text here. FNV-1a: the
    // fingerprint is stored, so it must not change between builds (std's hasher may).
    let fingerprint = canonical(body)
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

/// `v` with the keys of every object in sorted order (maps keep insertion order otherwise).
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), canonical(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
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
    let filter = StreamFilter::from_query(&query)?;
    let include_output = match query.get("include").map(str::trim) {
        None | Some("") => false,
        Some("output") => true,
        Some(other) => {
            return Err(ApiError::invalid_field(
                "include",
                format!("can only be `output`, got `{}`", echo(other)),
            ));
        }
    };
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
    run_req.request_id = crate::api::error::REQUEST_ID
        .try_with(|id| id.to_string())
        .ok();

    let counted = state.runner.registry().metrics().module(&run_req.module_id);
    let (handle, existing) = match state.runner.submit(run_req).await? {
        Submitted::New(h) => {
            counted.accepted.inc();
            (h, false)
        }
        Submitted::Existing(h) => (h, true),
    };
    let id = handle.id();
    // A text answer reads the output from memory when it can.
    let log = wants_text(&headers)
        .then(|| state.runner.registry().live_log(id))
        .flatten();
    let mut waited = None;
    if let Some(secs) = wait {
        waited = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(secs), handle.wait()) => r.ok().flatten(),
            () = state.streams_end.cancelled() => None,
        };
    }
    let status = if waited.is_some() || existing {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let run = match waited {
        Some(run) => run,
        None => state
            .runner
            .get(id)
            .await?
            .ok_or_else(|| ApiError::internal(Message(format!("run {id} vanished"))))?,
    };
    if wants_text(&headers) {
        return Ok(text_answer(&state, status, &run, filter, log));
    }
    if !include_output {
        return Ok(super::run_response(status, &run));
    }
    let mut body = run_json(&run);
    body["output"] = first_lines(&state, &run, filter).await?;
    let mut res = (status, Json(body)).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/runs/{}", run.id)) {
        res.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(res)
}

/// The answer to `Accept: text/plain`: a finished run's output text (the run in headers:
/// `Modrun-Run-Id`, `Modrun-Status`, `Modrun-Exit-Code` or `Modrun-Signal`); a run that has not
/// finished yet, a line saying where to follow it.
fn text_answer(
    state: &AppState,
    status: StatusCode,
    run: &Run,
    filter: StreamFilter,
    log: Option<Arc<OutputLog>>,
) -> Response {
    let id = run.id;
    let mut res = if run.state.is_finished() {
        text_body(state.runner.registry().clone(), id, 0, filter, log).into_response()
    } else {
        format!(
            "run {id} is {}: its output at /runs/{id}/output, live at /runs/{id}/stream\n",
            run.status().as_str()
        )
        .into_response()
    };
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, text_type());
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set("location", format!("/runs/{id}"));
    set("modrun-run-id", id.to_string());
    set("modrun-status", run.status().as_str().to_owned());
    if let Some(code) = run.exit_code() {
        set("modrun-exit-code", code.to_string());
    }
    if let Some(sig) = run.signal() {
        set("modrun-signal", sig.to_string());
    }
    res
}

/// `?include=output`: the run's first lines (those `filter` keeps), at most [`INCLUDE_LINES`]
/// and [`INCLUDE_BYTES`] of text; `truncated` says whether there are more.
async fn first_lines(state: &AppState, run: &Run, filter: StreamFilter) -> Result<Value, ApiError> {
    let registry = state.runner.registry();
    let mut kept: Vec<crate::run::Line> = Vec::new();
    let mut bytes = 0usize;
    let mut after = 0;
    let mut truncated = false;
    'read: loop {
        let Some(lines) = registry.read_output(run.id, after, 4096).await? else {
            break;
        };
        let Some(last) = lines.last().map(|l| l.seq) else {
            break;
        };
        for l in lines.into_iter().filter(|l| filter.keeps(l)) {
            if kept.len() == INCLUDE_LINES || bytes + l.text.len() > INCLUDE_BYTES {
                truncated = true;
                break 'read;
            }
            bytes += l.text.len();
            kept.push(l);
        }
        after = last;
    }
    let lines: Vec<LineDto> = kept.iter().map(LineDto::from).collect();
    Ok(json!({"lines": lines, "truncated": truncated}))
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
