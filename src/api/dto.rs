//! Wire shapes of the API, mirroring `openapi.yaml`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::module::{Module, ParamKind, Parameter};
use crate::run::{Line, Run, rfc3339};

/// A run as the API shows it, the most telling keys first.
#[derive(Debug, Serialize)]
pub struct RunDto<'a> {
    id: String,
    module_id: &'a str,
    module_name: &'a str,
    status: &'static str,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    error: Option<String>,
    created_by: Option<&'a str>,
    cancelled_by: Option<&'a str>,
    cancel_requested_at: Option<String>,
    parameters: &'a Map<String, Value>,
    mode: &'static str,
    #[serde(serialize_with = "seconds")]
    timeout_s: f64,
    pid: Option<u32>,
    output_lines: u64,
    argv: &'a [String],
    attempt: u32,
}

impl<'a> From<&'a Run> for RunDto<'a> {
    fn from(r: &'a Run) -> Self {
        Self {
            id: r.id.to_string(),
            module_id: &r.module_id,
            module_name: &r.module_name,
            status: r.status().as_str(),
            created_at: rfc3339(r.created_at),
            started_at: r.started_at().map(rfc3339),
            finished_at: r.finished_at().map(rfc3339),
            exit_code: r.exit_code(),
            signal: r.signal(),
            error: r.error(),
            created_by: r.created_by.as_deref(),
            cancelled_by: r.cancelled_by(),
            cancel_requested_at: r.cancel_requested_at.map(rfc3339),
            parameters: &r.parameters,
            mode: r.mode.as_str(),
            timeout_s: r.timeout.as_secs_f64(),
            pid: r.pid(),
            output_lines: r.output_lines,
            argv: &r.argv,
            // A store of one node does not count attempts: a run that started did so once.
            attempt: r.attempt.max(u32::from(r.started_at().is_some())),
        }
    }
}

/// Seconds as JSON: a whole number without a fraction (`60`, not `60.0`), else as is.
fn seconds<S: serde::Serializer>(s: &f64, ser: S) -> Result<S::Ok, S::Error> {
    if s.fract() == 0.0 && (0.0..9.0e15).contains(s) {
        ser.serialize_u64(*s as u64)
    } else {
        ser.serialize_f64(*s)
    }
}

/// A run as JSON.
pub fn run_json(r: &Run) -> Value {
    serde_json::to_value(RunDto::from(r)).unwrap_or(Value::Null)
}

/// A run's callbacks, as `GET /runs/{id}` shows them: one per URL, `waiting` until the run
/// ends, then its delivery's state.
pub fn callbacks_json(run: &Run, deliveries: &[crate::store::DeliveryState]) -> Value {
    let list: Vec<Value> = run
        .callbacks
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let id = format!("msg_{}_{}", run.id.as_uuid().simple(), i + 1);
            let url = crate::callbacks::shown_url(url);
            match deliveries.iter().find(|d| d.id == id) {
                None => serde_json::json!({"url": url, "webhook_id": id, "state": "waiting", "attempts": 0}),
                Some(d) => serde_json::json!({
                    "url": url,
                    "webhook_id": id,
                    "state": d.status.as_str(),
                    "attempts": d.attempts,
                    "last_status": d.last_status,
                    "last_error": d.last_error,
                    "next_attempt_at": d.next_at.map(rfc3339),
                    "done_at": d.done_at.map(rfc3339),
                }),
            }
        })
        .collect();
    Value::Array(list)
}

/// One output line.
#[derive(Debug, Serialize)]
pub struct LineDto<'a> {
    seq: u64,
    stream: &'static str,
    ts: String,
    line: &'a str,
    /// Base64 of the line's bytes, only when they are not valid UTF-8 (`line` is then their
    /// lossy decoding).
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<String>,
}

impl<'a> From<&'a Line> for LineDto<'a> {
    fn from(l: &'a Line) -> Self {
        Self {
            seq: l.seq,
            stream: l.stream.as_str(),
            ts: rfc3339(l.ts),
            line: &l.text,
            bytes: l.raw.as_deref().map(|b| B64.encode(b)),
        }
    }
}

/// A module as the API shows it: no command line, no passing details.
#[derive(Debug, Serialize)]
pub struct ModuleDto<'a> {
    id: &'a str,
    name: &'a str,
    description: Option<&'a str>,
    #[serde(serialize_with = "seconds")]
    timeout_s: f64,
    max_concurrent: Option<usize>,
    parameters: Vec<ParameterDto<'a>>,
}

/// A module parameter.
#[derive(Debug, Serialize)]
pub struct ParameterDto<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    required: bool,
    default: Option<&'a Value>,
    min: Option<Value>,
    max: Option<Value>,
    choices: Option<&'a [String]>,
    pattern: Option<&'a str>,
    max_length: Option<usize>,
    multiline: bool,
    secret: bool,
    description: Option<&'a str>,
}

impl<'a> ModuleDto<'a> {
    /// `timeout` is the module's effective timeout.
    pub fn new(m: &'a Module, timeout: std::time::Duration) -> Self {
        Self {
            id: &m.id,
            name: &m.name,
            description: m.description.as_deref(),
            timeout_s: timeout.as_secs_f64(),
            max_concurrent: m.max_concurrent.map(|n| n.get()),
            parameters: m.parameters.iter().map(ParameterDto::from).collect(),
        }
    }
}

impl<'a> From<&'a Parameter> for ParameterDto<'a> {
    fn from(p: &'a Parameter) -> Self {
        let (min, max, choices, pattern, max_length) = match &p.kind {
            ParamKind::Integer { min, max } => {
                (min.map(Value::from), max.map(Value::from), None, None, None)
            }
            ParamKind::Number { min, max } => {
                (min.map(Value::from), max.map(Value::from), None, None, None)
            }
            ParamKind::Choice { choices } => (None, None, Some(choices.as_slice()), None, None),
            ParamKind::String {
                pattern,
                max_length,
                ..
            } => (
                None,
                None,
                None,
                pattern.as_ref().map(|p| p.source.as_str()),
                *max_length,
            ),
            ParamKind::Boolean => (None, None, None, None, None),
        };
        Self {
            name: &p.name,
            kind: p.kind.type_name(),
            required: p.required,
            // A secret's default is never shown.
            default: p.default.as_ref().filter(|_| !p.secret),
            min,
            max,
            choices,
            pattern,
            max_length,
            multiline: matches!(
                p.kind,
                ParamKind::String {
                    multiline: true,
                    ..
                }
            ),
            secret: p.secret,
            description: p.description.as_deref(),
        }
    }
}
