//! A client of modrun's HTTP API, and the commands of the `modrun` binary that use it
//! (`client::cli`: `run`, `runs`, `logs`, `cancel`, `modules`).
//!
//! [`Client`] speaks the API as `openapi.yaml` describes it: a bearer token when there is one,
//! problem+json errors turned into one readable line ([`ClientError`]), `POST /runs` retried
//! under one `Idempotency-Key` when the answer was lost, and a run's event stream
//! ([`Client::follow`]) that reconnects with `Last-Event-ID` so that no line comes twice and
//! none is missing.

pub mod cli;
pub mod sse;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

/// What went wrong talking to the server, said in one line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: the server is down, the address is wrong, the network failed.
    #[error("cannot reach {base}: {why}")]
    Unreachable {
        /// The server's base URL.
        base: String,
        /// Why, as the connection library says it.
        why: String,
    },
    /// The server answered with an error (its problem+json, in one line).
    #[error("{status}: {message}")]
    Rejected {
        /// The HTTP status.
        status: StatusCode,
        /// The problem's detail, with each field error.
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The output could not be written here (a closed pipe, a full disk).
    #[error("cannot write the output: {0}")]
    Output(String),
}

/// A connection to one modrun server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// The bearer token; never printed (`Debug` of the client shows it redacted).
    token: Option<Token>,
}

#[derive(Clone)]
struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// One output line of a run, as the stream gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutLine {
    /// Its seq.
    pub seq: u64,
    /// `true` for stderr.
    pub stderr: bool,
    /// The bytes as the program wrote them (without the line ending).
    pub bytes: Vec<u8>,
}

/// What a followed run's stream says.
#[derive(Debug)]
pub enum Seen {
    /// The run's status changed (the run as JSON).
    Status(Value),
    /// Output lines, in seq order, none seen before.
    Lines(Vec<OutLine>),
    /// The run ended (the final run as JSON); the stream is over.
    End(Value),
}

impl Client {
    /// A client of the server at `base` (`http://host:port`, or `https://...`).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A stream gets a keep-alive comment at least every `sse.keep_alive` (15 s by
            // default): this long without a byte is a dead connection.
            .read_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("modrun-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()).map(Token),
        })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(&t.0),
            None => req,
        }
    }

    async fn send(&self, req: RequestBuilder) -> Result<Response, ClientError> {
        req.send().await.map_err(|e| self.unreachable(e))
    }

    fn unreachable(&self, e: reqwest::Error) -> ClientError {
        // The innermost cause says why (connection refused, timed out, DNS); the layers
        // above it only say that a request failed.
        let e = e.without_url();
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = s.to_string();
            source = s.source();
        }
        ClientError::Unreachable {
            base: self.base.clone(),
            why,
        }
    }

    /// The body as JSON when the status is a success; the problem as an error otherwise.
    async fn json(&self, res: Response) -> Result<Value, ClientError> {
        let status = res.status();
        let body = res.bytes().await.map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            return Err(rejected(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `GET path` as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        let res = self.send(self.request(Method::GET, path)).await?;
        self.json(res).await
    }

    /// `POST /runs` with `body`, under `key` (`Idempotency-Key`): when the answer is lost (the
    /// connection failed, a 502/503/504 from a proxy), the same request is sent again, up to
    /// four more times, and the server gives the run the first attempt created, never a second
    /// one.
    pub async fn create_run(&self, body: &Value, key: &str) -> Result<Value, ClientError> {
        let mut delay = Duration::from_millis(250);
        let mut tries = 0;
        loop {
            tries += 1;
            let req = self
                .request(Method::POST, "/runs")
                .header("idempotency-key", key)
                .header("content-type", "application/json")
                .body(body.to_string());
            let err = match self.send(req).await {
                Ok(res) => {
                    let status = res.status();
                    let transient = matches!(
                        status,
                        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
                    ) || (status == StatusCode::SERVICE_UNAVAILABLE
                        && res.headers().contains_key("retry-after"));
                    match self.json(res).await {
                        Ok(run) => return Ok(run),
                        Err(e) if transient => e,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => e,
            };
            if tries >= 5 {
                return Err(err);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(4));
        }
    }

    /// `DELETE /runs/{id}`: ask for the run's end; the run as it is now.
    pub async fn cancel(&self, id: &str) -> Result<Value, ClientError> {
        let res = self
            .send(self.request(Method::DELETE, &format!("/runs/{}", enc(id))))
            .await?;
        self.json(res).await
    }

    /// A run as JSON.
    pub async fn run(&self, id: &str) -> Result<Value, ClientError> {
        self.get(&format!("/runs/{}", enc(id))).await
    }

    /// The output lines of run `id` after `after` that the server holds now, page by page,
    /// to `sink` (for a run that is still running, what it has printed so far).
    pub async fn output(
        &self,
        id: &str,
        mut after: u64,
        mut sink: impl AsyncFnMut(Vec<OutLine>) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        loop {
            let page = self
                .get(&format!(
                    "/runs/{}/output?after={after}&limit=10000",
                    enc(id)
                ))
                .await?;
            let lines = page["lines"]
                .as_array()
                .ok_or_else(|| ClientError::Protocol("an output page without lines".into()))?;
            let lines = lines.iter().map(out_line).collect::<Result<Vec<_>, _>>()?;
            let next = page["next_after"].as_u64().unwrap_or(after);
            let done = page["complete"].as_bool().unwrap_or(true) || next <= after;
            if !lines.is_empty() {
                sink(lines)
                    .await
                    .map_err(|e| ClientError::Output(e.to_string()))?;
            }
            if done {
                return Ok(());
            }
            after = next;
        }
    }

    /// Follow run `id`'s event stream from line `after`, giving what it says to `on` until the
    /// run ends ([`Seen::End`]). A stream that breaks (the connection dropped, a proxy cut it,
    /// the server restarted) is opened again from the last line seen (`Last-Event-ID`), for
    /// as long as the server can be reached again within `patience`; lines are given once each
    /// and in order.
    pub async fn follow(
        &self,
        id: &str,
        mut after: u64,
        patience: Duration,
        mut on: impl AsyncFnMut(Seen) -> std::io::Result<()>,
    ) -> Result<Value, ClientError> {
        let path = format!("/runs/{}/stream", enc(id));
        let mut broken_since: Option<tokio::time::Instant> = None;
        let mut delay = Duration::from_millis(100);
        loop {
            let before = after;
            let req = self
                .request(Method::GET, &path)
                .header("accept", "text/event-stream")
                .header("last-event-id", after.to_string());
            let failure = match self.send(req).await {
                Ok(res) if res.status().is_success() => {
                    match self.read_stream(res, &mut after, &mut on).await {
                        Ok(Some(run)) => return Ok(run),
                        // Closed before the run ended (a proxy's limit, a server that stops).
                        Ok(None) => ClientError::Unreachable {
                            base: self.base.clone(),
                            why: "the stream ended before the run".into(),
                        },
                        Err(e @ ClientError::Unreachable { .. }) => e,
                        Err(e) => return Err(e),
                    }
                }
                // The server is restarting, or a proxy lost it: try again.
                Ok(res)
                    if matches!(
                        res.status(),
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    ) =>
                {
                    let status = res.status();
                    self.json(res)
                        .await
                        .err()
                        .unwrap_or_else(|| rejected(status, b""))
                }
                Ok(res) => {
                    let status = res.status();
                    return Err(self
                        .json(res)
                        .await
                        .err()
                        .unwrap_or_else(|| rejected(status, b"")));
                }
                Err(e) => e,
            };
            if after > before {
                // It made progress before breaking: reconnect at once, the patience and the
                // backoff start again.
                broken_since = None;
                delay = Duration::from_millis(100);
                continue;
            }
            let since = *broken_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= patience {
                return Err(failure);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Read one open stream; `Some(run)` at `end`, `None` when it broke off before.
    async fn read_stream(
        &self,
        mut res: Response,
        after: &mut u64,
        on: &mut impl AsyncFnMut(Seen) -> std::io::Result<()>,
    ) -> Result<Option<Value>, ClientError> {
        let mut parser = sse::Parser::default();
        let mut events = Vec::new();
        let write_err = |e: std::io::Error| ClientError::Output(e.to_string());
        loop {
            let chunk = match res.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.unreachable(e)),
            };
            parser
                .push(&chunk, &mut events)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let mut lines = Vec::new();
            for ev in events.drain(..) {
                match ev.event.as_str() {
                    "stdout" | "stderr" => {
                        let data: Value = serde_json::from_str(&ev.data)
                            .map_err(|e| ClientError::Protocol(e.to_string()))?;
                        let line = out_line(&data)?;
                        // A resumed stream starts after `after`; anything else is a repeat.
                        if line.seq > *after {
                            *after = line.seq;
                            lines.push(line);
                        }
                    }
                    "status" | "end" => {
                        if !lines.is_empty() {
                            on(Seen::Lines(std::mem::take(&mut lines)))
                                .await
                                .map_err(write_err)?;
                        }
                        let run: Value = serde_json::from_str(&ev.data)
                            .map_err(|e| ClientError::Protocol(e.to_string()))?;
                        if ev.event == "end" {
                            if !is_final(&run) {
                                // The server is shutting down: it ends every stream. The run
                                // goes on (here or on another node): follow it again.
                                return Ok(None);
                            }
                            on(Seen::End(run.clone())).await.map_err(write_err)?;
                            return Ok(Some(run));
                        }
                        on(Seen::Status(run)).await.map_err(write_err)?;
                    }
                    _ => {}
                }
            }
            if !lines.is_empty() {
                on(Seen::Lines(lines)).await.map_err(write_err)?;
            }
        }
    }
}

/// Whether a run (as JSON) has its final status.
pub fn is_final(run: &Value) -> bool {
    !matches!(run["status"].as_str(), Some("queued" | "running") | None)
}

/// A line of the API (`{seq, stream, line, bytes?}`) with its bytes.
fn out_line(v: &Value) -> Result<OutLine, ClientError> {
    let bad = || ClientError::Protocol(format!("not an output line: {v}"));
    let seq = v["seq"].as_u64().ok_or_else(bad)?;
    let stderr = v["stream"] == "stderr";
    let bytes = match v.get("bytes").and_then(Value::as_str) {
        Some(b) => B64.decode(b).map_err(|_| bad())?,
        None => v["line"].as_str().ok_or_else(bad)?.as_bytes().to_vec(),
    };
    Ok(OutLine { seq, stderr, bytes })
}

/// A problem+json answer as one line: its detail, and each field error.
fn rejected(status: StatusCode, body: &[u8]) -> ClientError {
    let problem: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut message = problem["detail"]
        .as_str()
        .or(problem["title"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned()
        });
    if let Some(errors) = problem["errors"].as_array() {
        let fields: Vec<String> = errors
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e["field"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("?")
                )
            })
            .collect();
        // The detail often says the one field error already.
        let fields: Vec<String> = fields
            .into_iter()
            .filter(|f| !message.contains(f))
            .collect();
        if !fields.is_empty() {
            message = format!("{message} ({})", fields.join("; "));
        }
    }
    // One line, whatever the server sent.
    message = message.replace(['\n', '\r'], " ");
    ClientError::Rejected { status, message }
}

/// A path segment from user input (a run or module id): percent-encoded, so it stays one
/// segment whatever it holds.
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
