//! What an operator watches: `GET /metrics` after a known sequence of runs, and `/readyz`
//! while start-up recovery runs and while the server drains.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use modrun::run::{Line, Run, RunId, RunState};
use modrun::store::{
    Created, Expect, IdempotencyKey, ListQuery, MemoryStore, NewRun, Page, Recovered, Retention,
    RunStore, StoreFuture,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{base_config, spawn_app_with, wait_until_output, write_config};

/// `/metrics` as a map from series (name with its labels, as written) to value.
async fn scrape(client: &reqwest::Client, base: &str) -> (HashMap<String, f64>, String) {
    let res = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = res.text().await.unwrap();
    let mut map = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        assert!(
            map.insert(series.to_owned(), value).is_none(),
            "series twice: {series}"
        );
    }
    (map, text)
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in the metrics"))
}

/// After runs that succeed, fail, cannot start, are cancelled and time out, two refused
/// requests and a resumed stream, every counter says exactly that; series of every module ×
/// final status exist at 0 from start-up; no run id reaches a label.
#[tokio::test]
async fn metrics_count_what_happened() {
    let app = spawn_app_with(&base_config("")).await;
    let (m, _) = scrape(&app.client, &app.base).await;
    for status in ["succeeded", "failed", "cancelled", "timed_out", "lost"] {
        assert_eq!(
            get(
                &m,
                &format!(r#"modrun_runs_finished_total{{module="echo",status="{status}"}}"#)
            ),
            0.0
        );
    }
    assert_eq!(get(&m, r#"modrun_build_info{version="0.1.0"}"#), 1.0);
    assert!(get(&m, "process_resident_memory_bytes") > 1e6);
    assert!(get(&m, "process_open_fds") > 3.0);

    // Act: a known sequence.
    let ok = app.start("lines", json!({"n": 3})).await;
    let failed = app.start("mixed", json!({})).await;
    let missing = app.start("missing", json!({})).await;
    let slow = app.start("sleep", json!({})).await;
    let timed = app.start("short", json!({})).await;
    for run in [&ok, &failed, &missing] {
        app.wait_finished(run["id"].as_str().unwrap()).await;
    }
    let slow_id = slow["id"].as_str().unwrap();
    app.wait_pid(slow_id).await;
    assert_eq!(app.cancel_run(slow_id).await.status(), StatusCode::ACCEPTED);
    app.wait_finished(slow_id).await;
    app.wait_finished(timed["id"].as_str().unwrap()).await;
    let unknown = app.post_run(json!({"module_id": "nope"})).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let invalid = app
        .post_run(json!({"module_id": "lines", "parameters": {"n": "x"}}))
        .await;
    assert_eq!(invalid.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let ok_id = ok["id"].as_str().unwrap();
    let events = app.stream_run(ok_id, Some(1)).await;
    assert_eq!(events.last().unwrap().event, "end");

    // Assert.
    let (m, text) = scrape(&app.client, &app.base).await;
    let finished = |module: &str, status: &str| {
        get(
            &m,
            &format!(r#"modrun_runs_finished_total{{module="{module}",status="{status}"}}"#),
        )
    };
    assert_eq!(finished("lines", "succeeded"), 1.0);
    assert_eq!(finished("mixed", "failed"), 1.0);
    assert_eq!(finished("missing", "failed"), 1.0);
    assert_eq!(finished("sleep", "cancelled"), 1.0);
    assert_eq!(finished("short", "timed_out"), 1.0);
    assert_eq!(finished("lines", "failed"), 0.0);
    for module in ["lines", "mixed", "missing", "sleep", "short"] {
        assert_eq!(
            get(
                &m,
                &format!(r#"modrun_runs_accepted_total{{module="{module}"}}"#)
            ),
            1.0
        );
        assert_eq!(
            get(
                &m,
                &format!(r#"modrun_run_duration_seconds_count{{module="{module}"}}"#)
            ),
            1.0,
            "{module}"
        );
    }
    assert_eq!(
        get(&m, r#"modrun_runs_started_total{module="missing"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"modrun_spawn_failures_total{module="missing"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"modrun_spawn_failures_total{module="lines"}"#),
        0.0
    );
    // "line 1\nline 2\nline 3\n"; "out1\nout2\n" and "err1\nerr2\n".
    let out = |module: &str, stream: &str, what: &str| {
        get(
            &m,
            &format!(r#"modrun_output_{what}_total{{module="{module}",stream="{stream}"}}"#),
        )
    };
    assert_eq!(out("lines", "stdout", "bytes"), 21.0);
    assert_eq!(out("lines", "stdout", "lines"), 3.0);
    assert_eq!(out("lines", "stderr", "lines"), 0.0);
    assert_eq!(out("mixed", "stdout", "bytes"), 10.0);
    assert_eq!(out("mixed", "stderr", "bytes"), 10.0);
    assert_eq!(out("mixed", "stderr", "lines"), 2.0);
    assert_eq!(
        get(&m, r#"modrun_runs_rejected_total{reason="unknown_module"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"modrun_runs_rejected_total{reason="invalid"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"modrun_runs_rejected_total{reason="queue_full"}"#),
        0.0
    );
    assert_eq!(
        get(
            &m,
            r#"modrun_http_requests_total{method="POST",route="/runs",status="202"}"#
        ),
        5.0
    );
    assert_eq!(
        get(
            &m,
            r#"modrun_http_requests_total{method="GET",route="/runs/{id}/stream",status="200"}"#
        ),
        1.0
    );
    // The streams are left out of the latency histogram.
    assert!(!text.contains(
        r#"modrun_http_request_duration_seconds_count{method="GET",route="/runs/{id}/stream"}"#
    ));
    assert!(
        get(
            &m,
            r#"modrun_http_request_duration_seconds_count{method="POST",route="/runs"}"#
        ) >= 7.0
    );
    assert_eq!(get(&m, "modrun_sse_streams_resumed_total"), 1.0);
    assert_eq!(get(&m, "modrun_sse_streams_open"), 0.0);
    assert_eq!(get(&m, r#"modrun_runs_running{module="sleep"}"#), 0.0);
    assert!(
        get(
            &m,
            r#"modrun_store_write_duration_seconds_count{op="create"}"#
        ) >= 5.0
    );
    assert_eq!(get(&m, r#"modrun_store_errors_total{op="create"}"#), 0.0);
    for run in [&ok, &failed, &missing, &slow, &timed] {
        assert!(
            !text.contains(run["id"].as_str().unwrap()),
            "a run id in the metrics"
        );
    }
    app.stop().await;
}

/// While a run holds its slot and another waits, the gauges say so (scraped live).
#[tokio::test]
async fn gauges_show_running_and_queued_runs() {
    let app = spawn_app_with(&base_config("")).await;
    // `limited` allows one run at a time: the second waits in the queue.
    let a = app.start("limited", json!({})).await;
    let b = app.start("limited", json!({})).await;
    app.wait_pid(a["id"].as_str().unwrap()).await;
    let (m, _) = scrape(&app.client, &app.base).await;
    assert_eq!(get(&m, r#"modrun_runs_running{module="limited"}"#), 1.0);
    assert_eq!(get(&m, r#"modrun_runs_queued{module="limited"}"#), 1.0);
    for run in [&b, &a] {
        app.cancel_run(run["id"].as_str().unwrap()).await;
    }
    app.stop().await;
}

/// With tokens, `/metrics` needs the `metrics:read` scope.
#[tokio::test]
async fn metrics_need_their_scope_once_tokens_exist() {
    let scraper = "modrun_scraper_token_0123456789abcdef";
    let runner = "modrun_runner_token_0123456789abcdefgh";
    let hash = |t: &str| modrun::auth::hex(&modrun::auth::sha256(t.as_bytes()));
    let toml = format!(
        "[[auth.tokens]]\nname = \"scraper\"\nsha256 = \"{}\"\nscopes = [\"metrics:read\"]\n\
         [[auth.tokens]]\nname = \"runner\"\nsha256 = \"{}\"\nscopes = [\"runs:create\", \"runs:read\"]\n{}",
        hash(scraper),
        hash(runner),
        base_config("")
    );
    let app = spawn_app_with(&toml).await;
    let status = |token: Option<&'static str>| {
        let mut req = app.client.get(app.url("/metrics"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(status(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(Some(runner)).await, StatusCode::FORBIDDEN);
    assert_eq!(status(Some(scraper)).await, StatusCode::OK);
    app.stop().await;
}

/// A memory store whose recovery waits until the test opens the gate.
struct GatedStore {
    inner: MemoryStore,
    gate: Arc<tokio::sync::Semaphore>,
}

impl RunStore for GatedStore {
    fn create(&self, new: NewRun) -> StoreFuture<'_, Created> {
        self.inner.create(new)
    }
    fn find_idempotent(&self, key: &IdempotencyKey) -> StoreFuture<'_, Option<Run>> {
        self.inner.find_idempotent(key)
    }
    fn get(&self, id: RunId) -> StoreFuture<'_, Option<Run>> {
        self.inner.get(id)
    }
    fn transition(&self, id: RunId, expect: Expect, next: RunState) -> StoreFuture<'_, ()> {
        self.inner.transition(id, expect, next)
    }
    fn append_output(&self, id: RunId, lines: Vec<Line>) -> StoreFuture<'_, ()> {
        self.inner.append_output(id, lines)
    }
    fn read_output(&self, id: RunId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Line>> {
        self.inner.read_output(id, after, limit)
    }
    fn list(&self, query: ListQuery) -> StoreFuture<'_, Page> {
        self.inner.list(query)
    }
    fn purge(&self, policy: Retention, now: SystemTime) -> StoreFuture<'_, usize> {
        self.inner.purge(policy, now)
    }
    fn recover(&self) -> StoreFuture<'_, Recovered> {
        Box::pin(async move {
            let _open = self.gate.acquire().await.expect("gate");
            self.inner.recover().await
        })
    }
    fn probe(&self) -> StoreFuture<'_, ()> {
        self.inner.probe()
    }
}

/// While start-up recovery runs, `/readyz` is 503 saying so, runs are refused with 503 and
/// Retry-After, and the liveness probe, the metrics and the spec answer; once it is done,
/// `/readyz` is 200 and runs are taken.
#[tokio::test]
async fn readyz_is_503_while_recovery_runs() {
    let (_dir, path) = write_config(&base_config(""));
    let config = modrun::config::Config::load(&path).unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let store = Arc::new(GatedStore {
        inner: MemoryStore::new(),
        gate: gate.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = modrun::app::App::with_store(config, store);
    let server = tokio::spawn(app.serve(listener, async {
        let _ = stopped.await;
    }));
    let c = reqwest::Client::new();

    let ready = c.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.headers()["content-type"], "application/problem+json");
    let body: Value = ready.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("recovering"),
        "{body}"
    );
    let post = c
        .post(format!("{base}/runs"))
        .json(&json!({"module_id": "silent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(post.headers().contains_key("retry-after"));
    for open in ["/healthz", "/metrics", "/openapi.yaml"] {
        let res = c.get(format!("{base}{open}")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{open}");
    }
    let (m, _) = scrape(&c, &base).await;
    assert_eq!(
        get(&m, r#"modrun_runs_rejected_total{reason="unavailable"}"#),
        1.0
    );

    gate.add_permits(1);
    let start = Instant::now();
    while c
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != StatusCode::OK
    {
        assert!(start.elapsed() < Duration::from_secs(20), "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let post = c
        .post(format!("{base}/runs"))
        .json(&json!({"module_id": "silent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::ACCEPTED);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Read one HTTP/1.1 answer from a raw connection: its status line and body text.
async fn read_answer(tcp: &mut tokio::net::TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return (head.lines().next().unwrap_or("").to_owned(), body);
            }
        }
        let n = tokio::time::timeout_at(deadline.into(), tcp.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// While the server drains at shutdown (a run that ignores SIGTERM holds it for the kill
/// grace), `/readyz` is 503 saying so (on an open connection and on a new one), runs are
/// refused with 503, and the liveness probe stays 200.
#[tokio::test]
async fn readyz_is_503_while_draining() {
    // A long kill grace keeps the server draining for as long as the test asks (a loaded CI
    // machine once took more than the default 1 s); the test ends the drain itself below.
    let config = base_config("").replace("kill_grace = \"1s\"", "kill_grace = \"60s\"");
    let mut app = spawn_app_with(&config).await;
    let run = app.start("stubborn", json!({})).await;
    let pid = app.wait_pid(run["id"].as_str().unwrap()).await;
    // Its first line comes after its SIGTERM trap is set: stopping it before would end it.
    assert!(wait_until_output(&app, run["id"].as_str().unwrap(), 1).await);
    let mut tcp = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let get = b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n";
    tcp.write_all(get).await.unwrap();
    let (status, _) = read_answer(&mut tcp).await;
    assert!(status.contains(" 200 "), "{status}");

    app.begin_stop();
    // The stubborn run holds shutdown until the test kills it. The stop reaches the server
    // a moment later (on a loaded machine, more than 100 ms later): until then it is ready.
    let asked = Instant::now();
    let body = loop {
        tcp.write_all(get).await.unwrap();
        let (status, body) = read_answer(&mut tcp).await;
        if status.contains(" 503 ") {
            break body;
        }
        assert!(status.contains(" 200 "), "{status}");
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "still ready 20 s after the stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(body.contains("shutting down"), "{body}");
    let fresh = reqwest::Client::new();
    let ready = fresh.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let live = fresh.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let post = fresh
        .post(app.url("/runs"))
        .json(&json!({"module_id": "silent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::SERVICE_UNAVAILABLE);
    // End the drain: the run's process group goes, the run ends, the server stops.
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status()
        .unwrap();
    assert!(killed.success());
    app.stop().await;
}
