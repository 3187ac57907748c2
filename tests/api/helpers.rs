//! `TestApp`: the real service on port 0 with a test configuration, and typed helpers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;

/// Modules every test config has. Scripts are inline `sh -c` so that the tests need nothing
/// but a POSIX shell.
pub const MODULES: &str = r#"
[[modules]]
id = "echo"
name = "Echo"
description = "Prints its arguments, one per line"
command = ["sh", "-c", 'for a in "$@"; do echo "$a"; done; [ -n "$ENVP" ] && echo "env=$ENVP"; exit 0', "echo"]
[[modules.parameters]]
name = "count"
type = "integer"
default = 3
min = 1
max = 100
[[modules.parameters]]
name = "ratio"
type = "number"
[[modules.parameters]]
name = "loud"
type = "boolean"
[[modules.parameters]]
name = "color"
type = "choice"
choices = ["red", "green"]
arg = "-c"
[[modules.parameters]]
name = "word"
type = "string"
pattern = "[a-z ]+"
max_length = 20
positional = true
[[modules.parameters]]
name = "envp"
type = "string"
env = "ENVP"

[[modules]]
id = "lines"
name = "Lines"
command = ["sh", "-c", 'i=1; while [ $i -le $1 ]; do echo "line $i"; i=$((i+1)); done', "lines"]
[[modules.parameters]]
name = "n"
type = "integer"
default = 3
positional = true

[[modules]]
id = "mixed"
name = "Mixed"
command = ["sh", "-c", 'echo out1; sleep 0.2; echo err1 >&2; sleep 0.2; echo out2; sleep 0.2; echo err2 >&2; exit 3']

[[modules]]
id = "sleep"
name = "Sleep"
command = ["sh", "-c", 'echo started; sleep $1; echo slept', "sleep"]
[[modules.parameters]]
name = "s"
type = "number"
default = 30
positional = true

[[modules]]
id = "limited"
name = "Limited"
max_concurrent = 1
command = ["sh", "-c", 'echo started; sleep $1', "limited"]
[[modules.parameters]]
name = "s"
type = "number"
default = 30
positional = true

[[modules]]
id = "tree"
name = "Tree"
command = ["sh", "-c", 'echo started; sleep 60 & sleep 60']

[[modules]]
id = "stubborn"
name = "Ignores SIGTERM"
command = ["sh", "-c", 'trap "" TERM; echo started; sleep 60 & sleep 60; sleep 60']

[[modules]]
id = "graceful"
name = "Handles SIGTERM"
command = ["sh", "-c", 'trap "echo got-term; exit 7" TERM; echo started; while true; do sleep 0.05; done']

[[modules]]
id = "big"
name = "Big output"
command = ["sh", "-c", 'yes "$(printf "%0${2}d" 0)" | head -n $1', "big"]
[[modules.parameters]]
name = "lines"
type = "integer"
positional = true
required = true
[[modules.parameters]]
name = "width"
type = "integer"
positional = true
default = 80

[[modules]]
id = "bytes"
name = "Raw bytes"
command = ["sh", "-c", 'printf "ok \377\376 end\nno newline at end"']

[[modules]]
id = "longline"
name = "A 1 MB line"
command = ["sh", "-c", 'head -c 1048576 /dev/zero | tr "\0" "a"; echo; echo after']

[[modules]]
id = "silent"
name = "No output"
command = ["true"]

[[modules]]
id = "cat"
name = "Cat stdin"
command = ["cat"]

[[modules]]
id = "missing"
name = "Missing program"
command = ["no-such-program-modrun-test"]

[[modules]]
id = "noexec"
name = "Not executable"
command = ["./noexec.sh"]

[[modules]]
id = "short"
name = "Short timeout"
timeout = "2s"
command = ["sh", "-c", 'echo started; sleep 30']
"#;

/// Runner settings of the default test config.
pub fn base_config(extra_runner: &str) -> String {
    format!(
        "[runner]\nmax_concurrent = 4\nmax_queued = 20\nkill_grace = \"1s\"\ndefault_timeout = \"1m\"\n{extra_runner}\n\
         [sse]\nkeep_alive = \"1s\"\n[retention]\nkeep_runs = 1000\n{MODULES}"
    )
}

/// A running service and a client for it.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// HTTP client.
    pub client: Client,
    /// Holds the config file and scripts.
    #[allow(dead_code, reason = "keeps the config folder alive")]
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Write `toml` and the scripts it needs into a fresh temp folder.
pub fn write_config(toml: &str) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("modrun.toml");
    std::fs::write(&path, toml).expect("write config");
    std::fs::write(dir.path().join("noexec.sh"), "#!/bin/sh\necho hi\n").expect("write script");
    (dir, path)
}

/// Start the service in this process with the default test config.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&base_config("")).await
}

/// Start the service in this process with the given config text.
pub async fn spawn_app_with(toml: &str) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = modrun::telemetry::init("debug", std::io::stderr(), false);
    }
    let (dir, path) = write_config(toml);
    let config = modrun::config::Config::load(&path).expect("valid test config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(modrun::app::serve(config, listener, async {
        let _ = rx.await;
    }));
    let app = TestApp {
        base: format!("http://{addr}"),
        client: Client::new(),
        dir,
        stop: Some(tx),
        server: Some(server),
    };
    // The socket answers at once; runs are taken once start-up recovery is done.
    let start = Instant::now();
    while app.get("/readyz").await.status() != StatusCode::OK {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the app did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app
}

impl TestApp {
    /// Absolute URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /runs` with a JSON body.
    pub async fn post_run(&self, body: Value) -> Response {
        self.client
            .post(self.url("/runs"))
            .json(&body)
            .send()
            .await
            .expect("POST /runs")
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    /// `GET path`, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).await.json().await.expect("JSON body")
    }

    /// `POST path` with a JSON body (`path` may carry a query).
    pub async fn post_to(&self, path: &str, body: Value) -> Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("POST")
    }

    /// Start a run of `module` and return its JSON (asserting 202).
    pub async fn start(&self, module: &str, params: Value) -> Value {
        let res = self
            .post_run(json!({"module_id": module, "parameters": params}))
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED, "starting {module}");
        res.json().await.expect("run json")
    }

    /// `GET /runs/{id}`.
    pub async fn get_run(&self, id: &str) -> Value {
        let res = self
            .client
            .get(self.url(&format!("/runs/{id}")))
            .send()
            .await
            .expect("GET run");
        assert_eq!(res.status(), StatusCode::OK);
        res.json().await.expect("json")
    }

    /// `DELETE /runs/{id}`.
    pub async fn cancel_run(&self, id: &str) -> Response {
        self.client
            .delete(self.url(&format!("/runs/{id}")))
            .send()
            .await
            .expect("DELETE run")
    }

    /// Poll until the run's status satisfies `pred`.
    pub async fn wait_status(
        &self,
        id: &str,
        pred: impl Fn(&str) -> bool,
        limit: Duration,
    ) -> Value {
        let start = Instant::now();
        loop {
            let run = self.get_run(id).await;
            if pred(run["status"].as_str().unwrap_or("")) {
                return run;
            }
            assert!(
                start.elapsed() < limit,
                "run {id} still {} after {limit:?}",
                run["status"]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Poll run `id` until `pred` holds on its JSON (20 s at most).
    pub async fn wait_run(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        poll_run(|| self.get_run(id), pred).await
    }

    /// Wait until the run's process is running and its pid (= process group) is recorded.
    pub async fn wait_pid(&self, id: &str) -> u64 {
        let start = Instant::now();
        loop {
            let run = self.get_run(id).await;
            if let Some(pid) = run["pid"].as_u64()
                && run["status"] == "running"
            {
                return pid;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "run {id} has no pid: {run}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Wait until the run has finished.
    pub async fn wait_finished(&self, id: &str) -> Value {
        self.wait_status(
            id,
            |s| !matches!(s, "queued" | "running"),
            Duration::from_secs(30),
        )
        .await
    }

    /// All output lines as JSON (following pages).
    pub async fn output(&self, id: &str) -> Vec<Value> {
        let mut after = 0;
        let mut all = Vec::new();
        loop {
            let page: Value = self
                .client
                .get(self.url(&format!("/runs/{id}/output?after={after}&limit=10000")))
                .send()
                .await
                .expect("GET output")
                .json()
                .await
                .expect("json");
            let lines = page["lines"].as_array().expect("lines").clone();
            if lines.is_empty() {
                return all;
            }
            after = page["next_after"].as_u64().expect("next_after");
            all.extend(lines);
        }
    }

    /// Subscribe to a run's SSE stream and collect every event until the server closes it.
    pub async fn stream_run(&self, id: &str, last_event_id: Option<u64>) -> Vec<SseEvent> {
        let mut req = self.client.get(self.url(&format!("/runs/{id}/stream")));
        if let Some(n) = last_event_id {
            req = req.header("Last-Event-ID", n.to_string());
        }
        let res = req.send().await.expect("GET stream");
        assert_eq!(res.status(), StatusCode::OK);
        read_sse(res, Duration::from_secs(60)).await
    }

    /// Begin a graceful stop without waiting for it ([`TestApp::stop`] waits).
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Stop the service gracefully and wait for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server result");
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// `event:`.
    pub event: String,
    /// `id:`, if any.
    pub id: Option<String>,
    /// `data:` parsed as JSON.
    pub data: Value,
}

/// Parse SSE from a response until it ends (or `limit` passes, which fails the test).
pub async fn read_sse(res: Response, limit: Duration) -> Vec<SseEvent> {
    read_sse_with(res, limit, |_| {}).await
}

/// Like [`read_sse`], calling `each` on every event as it arrives.
pub async fn read_sse_with(
    mut res: Response,
    limit: Duration,
    mut each: impl FnMut(&SseEvent),
) -> Vec<SseEvent> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::<u8>::new();
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, res.chunk())
            .await
            .expect("SSE stream did not end in time")
            .expect("SSE read");
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = find(&buf, b"\n\n") {
            let block = String::from_utf8(buf[..pos].to_vec()).expect("utf8 event");
            buf.drain(..pos + 2);
            if let Some(ev) = parse_event(&block) {
                each(&ev);
                events.push(ev);
            }
        }
    }
    events
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_event(block: &str) -> Option<SseEvent> {
    let mut event = None;
    let mut id = None;
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
    Some(SseEvent {
        event: event?,
        id,
        data: serde_json::from_str(&data).expect("event data is JSON"),
    })
}

/// Pids of live (non-zombie) processes in a process group.
pub fn group_members(pgid: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // Fields after the ")" that closes the command name: state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[2].parse::<u64>().ok() == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// Live (not zombie) processes that carry run `id`'s marker.
pub fn marked(id: &str) -> Vec<u32> {
    let marker = format!("MODRUN_RUN_ID={id}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().chars().next());
        if !matches!(state, Some(Some('Z' | 'X'))) {
            out.push(pid);
        }
    }
    out
}

/// Poll `cond` until it holds or `limit` passes.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// The service binary.
pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_modrun"))
}

/// A `modrun serve` process on port 0, with the address it logged.
pub struct Server {
    /// The process.
    pub child: tokio::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Every line it has written to stderr so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Start the binary with a config written to a fresh folder.
pub async fn start_server(toml: &str) -> (Server, TempDir) {
    let (dir, path) = write_config(toml);
    (start_server_at(&path).await, dir)
}

/// Start the binary on an existing config file (a restart keeps its storage folder).
pub async fn start_server_at(config: &Path) -> Server {
    start_server_with(config, "127.0.0.1:0", &[("RUST_LOG", "info")]).await
}

/// Start the binary on `config`, listening on `bind`, with extra environment variables.
pub async fn start_server_with(config: &Path, bind: &str, env: &[(&str, &str)]) -> Server {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args(["serve", "--bind", bind, "--config"])
        .arg(config)
        .envs(env.iter().copied());
    start_command(cmd).await
}

/// Start a command that runs `modrun serve` (possibly through a wrapper), and wait for its
/// listening line.
pub async fn start_command(mut cmd: tokio::process::Command) -> Server {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn modrun");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = log.clone();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            if std::env::var_os("TEST_LOG").is_some() {
                eprintln!("server: {line}");
            }
            keep.lock().unwrap().push(line.clone());
            if let Some(rest) = line.split("listening on http://").nth(1) {
                // Text (`... http://ADDR key=value`) or JSON (`..."http://ADDR","k":...`).
                return rest
                    .split(|c: char| c.is_whitespace() || c == '"')
                    .next()
                    .expect("addr")
                    .to_owned();
            }
        }
        panic!(
            "the server exited before listening:\n{}",
            keep.lock().unwrap().join("\n")
        );
    })
    .await
    .expect("listening line");
    // Keep draining stderr so the server never blocks on a full pipe.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if std::env::var_os("TEST_LOG").is_some() {
                eprintln!("server: {line}");
            }
            keep.lock().unwrap().push(line);
        }
    });
    assert!(!addr.ends_with(":0"), "the real port is shown: {addr}");
    let addr = addr.replace("0.0.0.0", "127.0.0.1");
    Server {
        child,
        base: format!("http://{addr}"),
        log,
    }
}

impl Server {
    /// Absolute URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path`, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        Client::new()
            .get(self.url(path))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON body")
    }

    /// `POST /runs` of `module` (no parameters).
    pub async fn post_run(&self, module: &str) -> Response {
        Client::new()
            .post(self.url("/runs"))
            .json(&json!({ "module_id": module }))
            .send()
            .await
            .expect("POST /runs")
    }

    /// Poll run `id` until `pred` holds on its JSON (20 s at most).
    pub async fn wait_run(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let path = format!("/runs/{id}");
        poll_run(|| self.get_json(&path), pred).await
    }

    /// Poll run `id` until it has ended (20 s at most).
    pub async fn wait_done(&self, id: &str) -> Value {
        self.wait_run(id, |r| {
            !matches!(r["status"].as_str(), Some("queued" | "running"))
        })
        .await
    }

    /// Run `id`'s output as text (`GET /runs/{id}/output`, `Accept: text/plain`).
    pub async fn output_text(&self, id: &str) -> String {
        Client::new()
            .get(self.url(&format!("/runs/{id}/output")))
            .header("Accept", "text/plain")
            .send()
            .await
            .expect("GET output")
            .text()
            .await
            .expect("text body")
    }
}

/// Read a run with `get` until `pred` holds (20 s at most): the last read.
async fn poll_run<F, Fut>(get: F, pred: impl Fn(&Value) -> bool) -> Value
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let start = Instant::now();
    loop {
        let run = get().await;
        if pred(&run) {
            return run;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the run never got there: {run}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Send a signal to a process.
pub fn signal(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id().expect("running") as i32);
    nix::sys::signal::kill(pid, sig).expect("kill");
}

/// Peak resident memory of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Resident memory of a process now, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("field")
}

/// Wait (at most 20 s) until run `id` has `n` lines of output stored; false if it did not.
pub async fn wait_until_output(app: &TestApp, id: &str, n: u64) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if app.get_run(id).await["output_lines"].as_u64().unwrap_or(0) >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
