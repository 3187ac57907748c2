//! modrun's benchmark: drives a release build of modrun (and the references, measured in the
//! same run) from this separate process, checks every answer, and prints one table of medians
//! over several rounds with their ratios to the references. Run it through `bench/run`.
//!
//! `modrun-bench [--quick] --modrun PATH --out DIR`

mod cluster;
mod procs;
mod soak;
mod sse;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use procs::Server;

/// Sizes of one run of the benchmark.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Smoke run (shown in the results).
    quick: bool,
    rounds: usize,
    clients: usize,
    load_for: Duration,
    output_lines: u64,
    fanout_subscribers: usize,
    fanout_lines: u64,
    latency_for: Duration,
    cancels: usize,
    memory_runs: usize,
    soak_for: Duration,
}

impl Plan {
    fn full() -> Self {
        Self {
            quick: false,
            rounds: 5,
            clients: 50,
            load_for: Duration::from_secs(10),
            output_lines: 10_000_000,
            fanout_subscribers: 100,
            fanout_lines: 100_000,
            latency_for: Duration::from_secs(10),
            cancels: 50,
            memory_runs: 100_000,
            soak_for: Duration::from_secs(180),
        }
    }

    fn quick() -> Self {
        Self {
            quick: true,
            rounds: 1,
            clients: 8,
            load_for: Duration::from_secs(1),
            output_lines: 100_000,
            fanout_subscribers: 10,
            fanout_lines: 5_000,
            latency_for: Duration::from_secs(1),
            cancels: 5,
            memory_runs: 1_000,
            soak_for: Duration::from_secs(6),
        }
    }
}

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
struct Row {
    scenario: &'static str,
    metric: String,
    unit: &'static str,
    /// Median over the rounds.
    value: f64,
    rounds: Vec<f64>,
    reference: Option<String>,
    reference_value: Option<f64>,
    ratio: Option<f64>,
    target: Option<String>,
    met: Option<bool>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() { 0.0 } else { s[s.len() / 2] }
}

/// `values` against `reference`. Paired rounds (each round measured both back to back) give the
/// median of the per-round ratios, so that the machine's drift between rounds cancels out;
/// otherwise the ratio of the medians.
fn ratio(values: &[f64], reference: &[f64]) -> Option<f64> {
    if !values.is_empty() && values.len() == reference.len() {
        let per_round: Vec<f64> = values
            .iter()
            .zip(reference)
            .filter(|(_, r)| **r > 0.0)
            .map(|(v, r)| v / r)
            .collect();
        return (!per_round.is_empty()).then(|| median(&per_round));
    }
    let r = median(reference);
    (r > 0.0).then(|| median(values) / r)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Table {
    rows: Vec<Row>,
    failures: Vec<String>,
}

impl Table {
    fn add(
        &mut self,
        scenario: &'static str,
        metric: &str,
        unit: &'static str,
        rounds: Vec<f64>,
        reference: Option<(&str, Vec<f64>)>,
        target: Option<(&str, bool)>,
    ) {
        let value = median(&rounds);
        let (reference, reference_value, ratio) = match reference {
            Some((name, r)) => (Some(name.to_owned()), Some(median(&r)), ratio(&rounds, &r)),
            None => (None, None, None),
        };
        let row = Row {
            scenario,
            metric: metric.to_owned(),
            unit,
            value,
            rounds,
            reference,
            reference_value,
            ratio,
            target: target.map(|t| t.0.to_owned()),
            met: target.map(|t| t.1),
        };
        println!("{}", fmt_row(&row));
        self.rows.push(row);
    }

    fn fail(&mut self, what: String) {
        eprintln!("CHECK FAILED: {what}");
        self.failures.push(what);
    }
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt_row(r: &Row) -> String {
    format!(
        "| {} | {} | {} {} | {} | {} | {} | {} | {} |",
        r.scenario,
        r.metric,
        num(r.value),
        r.unit,
        r.reference.as_deref().unwrap_or("-"),
        r.reference_value.map(num).unwrap_or_else(|| "-".into()),
        r.ratio
            .map(|x| format!("{x:.2}x"))
            .unwrap_or_else(|| "-".into()),
        r.target.as_deref().unwrap_or("-"),
        match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        }
    )
}

const HEADER: &str = "| Scenario | Metric | modrun (median) | Reference | Ref. (median) | Ratio | Target | Met |\n|---|---|---|---|---|---|---|---|";

fn base_config(store: &str, extra: &str) -> String {
    format!(
        "[runner]\nmax_concurrent = 50\nmax_queued = 100000\ndefault_timeout = \"10m\"\nkill_grace = \"2s\"\n\
         [output]\nmax_run_bytes = \"2GiB\"\n[retention]\nkeep_runs = 200000\n[storage]\npath = \"{store}\"\n{extra}"
    )
}

fn modules(true_path: &str) -> String {
    format!(
        r#"
[[modules]]
id = "true"
command = ["{true_path}"]

[[modules]]
id = "lines"
command = ["sh", "-c", 'yes "$(printf "%0${{2}}d" 0)" | head -n $1', "lines"]
[[modules.parameters]]
name = "n"
type = "integer"
positional = true
required = true
[[modules.parameters]]
name = "width"
type = "integer"
positional = true
default = 79

[[modules]]
id = "delayed_lines"
command = ["sh", "-c", 'sleep 1; yes "$(printf "%0${{2}}d" 0)" | head -n $1', "delayed"]
[[modules.parameters]]
name = "n"
type = "integer"
positional = true
required = true
[[modules.parameters]]
name = "width"
type = "integer"
positional = true
default = 79

[[modules]]
id = "ticks"
command = ["python3", "-u", "-c", "import sys, time\nfor i in range(int(sys.argv[1])):\n    print(time.monotonic_ns(), flush=True)\n    time.sleep(0.01)", ]
[[modules.parameters]]
name = "n"
type = "integer"
positional = true
required = true

[[modules]]
id = "sleep"
command = ["sleep", "60"]

[[modules]]
id = "dry"
command = ["{true_path}", "--flag"]
"#
    )
}

struct Ctx {
    plan: Plan,
    modrun: PathBuf,
    client: reqwest::Client,
    true_path: String,
}

impl Ctx {
    async fn start(&self, store: &str) -> Server {
        procs::modrun(&self.modrun, &base_config(store, &modules(&self.true_path))).await
    }
}

/// Result of a closed-loop load.
struct Load {
    ok: u64,
    errors: u64,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn summarize(mut lat_us: Vec<u64>, ok: u64, errors: u64, elapsed: Duration) -> Load {
    lat_us.sort_unstable();
    let ms: Vec<f64> = lat_us.iter().map(|u| *u as f64 / 1000.0).collect();
    Load {
        ok,
        errors,
        per_s: ok as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
    }
}

/// `clients` tasks, each running `op` back to back for `dur`; `op` says whether its answer was
/// right. Latencies are kept for the right ones.
async fn closed_loop<F, Fut>(clients: usize, dur: Duration, op: F) -> Load
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut bad = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if op().await {
                        lat.push(t.elapsed().as_micros() as u64);
                    } else {
                        bad += 1;
                    }
                }
                (lat, bad)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut bad = 0;
    for t in tasks {
        let (l, b) = t.await.expect("load task");
        lat.extend(l);
        bad += b;
    }
    let good = lat.len() as u64;
    summarize(lat, good, bad, start.elapsed())
}

/// `POST url` (with `body`, as JSON) from `clients` connections of `wrk`, a separate process
/// (much lighter than an HTTP client of ours: on 2 shared cores the load generator's own CPU
/// would cap both servers alike). A right answer is a 200 whose body holds `needle`.
async fn http_load(
    url: String,
    body: Option<&'static str>,
    needle: Option<&'static str>,
    clients: usize,
    dur: Duration,
) -> Load {
    let w = procs::wrk(&url, body, needle, clients, dur).await;
    Load {
        ok: w.ok,
        errors: w.errors,
        per_s: w.ok as f64 / w.elapsed.as_secs_f64().max(1e-9),
        p50_ms: w.p50_ms,
        p99_ms: w.p99_ms,
    }
}

/// The raw limit: `clients` tasks spawning and awaiting `/bin/true` back to back.
async fn raw_spawn_load(true_path: &str, clients: usize, dur: Duration) -> Load {
    let path = true_path.to_owned();
    closed_loop(clients, dur, move || {
        let path = path.clone();
        async move {
            matches!(tokio::process::Command::new(&path).status().await, Ok(s) if s.success())
        }
    })
    .await
}

/// The run-and-answer scenario's program prints this many lines...
const ANSWER_LINES: usize = 1000;
/// ...of this many bytes (with the line break).
const ANSWER_WIDTH: usize = 80;

/// Scenario 9, the webhook use case with output: a program that prints 1,000 lines of 80
/// bytes, run and answered with its output in one request (modrun: `POST /runs?wait` with
/// `Accept: text/plain`; webhook: include-command-output-in-response), under the same load.
async fn scenario_answer(ctx: &Ctx, t: &mut Table) {
    let p = ctx.plan;
    let dir = tempfile::tempdir().expect("temp dir");
    let text: String = (0..ANSWER_LINES)
        .map(|i| format!("{i:04} {}\n", "x".repeat(ANSWER_WIDTH - 6)))
        .collect();
    let lines = dir.path().join("lines.txt");
    std::fs::write(&lines, text).expect("write lines");
    let script = dir.path().join("answer.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nexec cat '{}'\n", lines.display()),
    )
    .expect("write script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .expect("chmod script");
    }
    let script = script.display().to_string();
    // The last line: the whole output arrived.
    let needle = Box::leak(format!("{:04} ", ANSWER_LINES - 1).into_boxed_str()) as &str;
    let modules = format!("[[modules]]\nid = \"answer\"\ncommand = [\"{script}\"]\n");
    let webhook = procs::webhook(&[("answer", &script)]).await;
    let (mut hook, mut sqlite, mut memory) = (vec![], vec![], vec![]);
    for round in 0..p.rounds {
        let w = procs::wrk(
            &webhook.url("/hooks/answer"),
            None,
            Some(needle),
            p.clients,
            p.load_for,
        )
        .await;
        if w.errors > 0 {
            t.fail(format!("webhook: {} wrong answers or errors", w.errors));
        }
        hook.push(w.ok as f64 / w.elapsed.as_secs_f64().max(1e-9));
        for (store, out) in [("data", &mut sqlite), ("", &mut memory)] {
            let server = procs::modrun(&ctx.modrun, &base_config(store, &modules)).await;
            let m = procs::wrk_with(
                &server.url("/runs?wait=30"),
                Some(r#"{"module_id":"answer"}"#),
                Some(needle),
                &[("Accept", "text/plain")],
                p.clients,
                p.load_for,
            )
            .await;
            if m.errors > 0 || m.ok == 0 {
                t.fail(format!(
                    "modrun ({store:?}): {} wrong answers or errors, {} ok",
                    m.errors, m.ok
                ));
            }
            out.push(m.ok as f64 / m.elapsed.as_secs_f64().max(1e-9));
            server.stop().await;
        }
        eprintln!(
            "  round {round}: webhook {:.0}/s, modrun sqlite {:.0}/s, memory {:.0}/s",
            hook[round], sqlite[round], memory[round]
        );
    }
    webhook.stop().await;
    let c = p.clients;
    for (store, values) in [("SQLite", &sqlite), ("memory", &memory)] {
        t.add(
            "9 run and answer",
            &format!("runs/s, {ANSWER_LINES} lines of {ANSWER_WIDTH} B in the answer, {c} wrk connections, {store}"),
            "/s",
            values.clone(),
            Some(("webhook", hook.clone())),
            Some((
                ">= 1.2x webhook",
                ratio(values, &hook).unwrap_or(0.0) >= 1.2,
            )),
        );
    }
}

/// What every answer of `POST /runs?wait=…` for `/bin/true` must hold.
const MODRUN_OK: &str = r#""status":"succeeded""#;

async fn scenario_throughput(ctx: &Ctx, t: &mut Table) {
    let p = ctx.plan;
    let (mut raw, mut hook, mut sqlite, mut memory) = (vec![], vec![], vec![], vec![]);
    let (mut sqlite_lat, mut memory_lat, mut hook_lat) = (vec![], vec![], vec![]);
    let webhook = procs::webhook(&[("true", &ctx.true_path)]).await;
    for round in 0..p.rounds {
        let r = raw_spawn_load(&ctx.true_path, p.clients, p.load_for).await;
        raw.push(r.per_s);
        let w = http_load(
            webhook.url("/hooks/true"),
            None,
            None,
            p.clients,
            p.load_for,
        )
        .await;
        if w.errors > 0 {
            t.fail(format!("webhook: {} errors", w.errors));
        }
        hook.push(w.per_s);
        hook_lat.push((w.p50_ms, w.p99_ms));
        for (store, out, lat) in [
            ("data", &mut sqlite, &mut sqlite_lat),
            ("", &mut memory, &mut memory_lat),
        ] {
            let server = ctx.start(store).await;
            let m = http_load(
                server.url("/runs?wait=10"),
                Some(r#"{"module_id":"true"}"#),
                Some(MODRUN_OK),
                p.clients,
                p.load_for,
            )
            .await;
            if m.errors > 0 || m.ok == 0 {
                t.fail(format!(
                    "modrun ({store:?}): {} errors, {} ok",
                    m.errors, m.ok
                ));
            }
            out.push(m.per_s);
            lat.push((m.p50_ms, m.p99_ms));
            server.stop().await;
        }
        eprintln!(
            "  round {round}: raw {:.0}/s, webhook {:.0}/s, modrun sqlite {:.0}/s, memory {:.0}/s",
            raw[round], hook[round], sqlite[round], memory[round]
        );
    }
    webhook.stop().await;
    let s = "1 run throughput";
    let c = p.clients;
    let ratio = |a: &[f64], b: &[f64]| ratio(a, b).unwrap_or(0.0);
    for (store, values) in [("SQLite", &sqlite), ("memory", &memory)] {
        for (reference, ref_values, target, min) in [
            ("webhook", &hook, ">= 1.2x webhook", 1.2),
            ("raw tokio spawn", &raw, ">= 0.8x raw", 0.8),
        ] {
            t.add(
                s,
                &format!("runs/s, {c} wrk connections, {store}"),
                "/s",
                values.clone(),
                Some((reference, ref_values.clone())),
                Some((target, ratio(values, ref_values) >= min)),
            );
        }
    }
    t.add(
        s,
        "runs/s, SQLite vs memory",
        "/s",
        sqlite.clone(),
        Some(("modrun memory", memory.clone())),
        Some((
            ">= 0.8x (persistence <= 20%)",
            ratio(&sqlite, &memory) >= 0.8,
        )),
    );
    // A server's own CPU per run: what a run costs the whole machine (its cores over the
    // runs per second) minus what starting and reaping the child costs (the same for the raw
    // spawn loop of the same round).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let own = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .zip(&raw)
            .map(|(rate, raw)| (cores / rate.max(1e-9) - cores / raw.max(1e-9)) * 1e6)
            .collect()
    };
    for (store, values) in [("SQLite", &sqlite), ("memory", &memory)] {
        let mine = own(values);
        let theirs = own(&hook);
        let ok = ratio(&mine, &theirs) <= 0.5;
        t.add(
            s,
            &format!("own CPU per run ({cores} cores / runs/s - the raw loop's), {store}"),
            "us",
            mine,
            Some(("webhook", theirs)),
            Some(("<= 0.5x webhook's", ok)),
        );
    }
    let p50 = |v: &[(f64, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    let p99 = |v: &[(f64, f64)]| v.iter().map(|x| x.1).collect::<Vec<_>>();
    t.add(
        s,
        "latency p50, SQLite",
        "ms",
        p50(&sqlite_lat),
        Some(("webhook", p50(&hook_lat))),
        None,
    );
    for (store, lat) in [("SQLite", &sqlite_lat), ("memory", &memory_lat)] {
        let mine = p99(lat);
        let theirs = p99(&hook_lat);
        let ok = ratio(&mine, &theirs) <= 1.0;
        t.add(
            s,
            &format!("latency p99, {store}"),
            "ms",
            mine,
            Some(("webhook", theirs)),
            Some(("<= webhook's", ok)),
        );
    }
}

async fn post_run(ctx: &Ctx, server: &Server, body: serde_json::Value) -> String {
    let res = ctx
        .client
        .post(server.url("/runs"))
        .json(&body)
        .send()
        .await
        .expect("POST /runs");
    assert!(res.status().is_success(), "POST /runs: {}", res.status());
    let v: serde_json::Value = res.json().await.expect("run json");
    v["id"].as_str().expect("id").to_owned()
}

/// Follow a run's stream, checking that lines arrive in order and complete. Returns (lines,
/// bytes, final status) or an error sentence.
async fn consume(
    ctx: &Ctx,
    server: &Server,
    id: &str,
    expect_width: Option<usize>,
) -> Result<(u64, u64, String), String> {
    let res = ctx
        .client
        .get(server.url(&format!("/runs/{id}/stream")))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let mut next = 1u64;
    let mut bytes = 0u64;
    let mut status = String::new();
    let mut error = None;
    let done = sse::follow(res, Duration::from_secs(600), |ev| match ev.kind {
        "stdout" | "stderr" => match serde_json::from_slice::<sse::LineData>(ev.data) {
            Ok(l) => {
                if l.seq != next && error.is_none() {
                    error = Some(format!("expected seq {next}, got {}", l.seq));
                }
                if let Some(w) = expect_width
                    && l.line.len() != w
                    && error.is_none()
                {
                    error = Some(format!("line {} has {} bytes", l.seq, l.line.len()));
                }
                next = l.seq + 1;
                bytes += l.line.len() as u64 + 1;
            }
            Err(e) => error = Some(format!("bad line event: {e}")),
        },
        "end" => {
            status = serde_json::from_slice::<sse::RunData>(ev.data)
                .map(|r| r.status)
                .unwrap_or_default();
        }
        _ => {}
    })
    .await;
    if !done {
        return Err("the stream did not end in time".into());
    }
    if let Some(e) = error {
        return Err(e);
    }
    if status.is_empty() {
        return Err("no end event".into());
    }
    Ok((next - 1, bytes, status))
}

/// The reference reader: the program's stdout read raw from a pipe by a minimal tokio loop.
async fn raw_pipe(lines: u64, width: usize) -> Duration {
    let t = Instant::now();
    let mut child = tokio::process::Command::new("sh")
        .args([
            "-c",
            &format!("yes \"$(printf \"%0{width}d\" 0)\" | head -n {lines}"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sh");
    let mut out =
        tokio::io::BufReader::with_capacity(64 * 1024, child.stdout.take().expect("pipe"));
    let mut buf = Vec::with_capacity(256);
    let mut n = 0u64;
    loop {
        buf.clear();
        match out.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => n += 1,
        }
    }
    let _ = child.wait().await;
    assert_eq!(n, lines, "raw reader line count");
    t.elapsed()
}

async fn scenario_output(ctx: &Ctx, t: &mut Table) {
    let p = ctx.plan;
    let n = p.output_lines;
    let (mut lps, mut mbps, mut raw_lps, mut rss) = (vec![], vec![], vec![], vec![]);
    for _ in 0..p.rounds {
        let raw = raw_pipe(n, 79).await;
        raw_lps.push(n as f64 / raw.as_secs_f64());
        let server = ctx.start("data").await;
        let t0 = Instant::now();
        let id = post_run(
            ctx,
            &server,
            json!({"module_id": "lines", "parameters": {"n": n}}),
        )
        .await;
        match consume(ctx, &server, &id, Some(79)).await {
            Ok((lines, bytes, status)) => {
                let secs = t0.elapsed().as_secs_f64();
                if lines != n || status != "succeeded" {
                    t.fail(format!("output: got {lines} of {n} lines, status {status}"));
                }
                lps.push(lines as f64 / secs);
                mbps.push(bytes as f64 / secs / 1e6);
            }
            Err(e) => t.fail(format!("output: {e}")),
        }
        rss.push(procs::peak_rss_kib(server.pid()) as f64 / 1024.0);
        server.stop().await;
    }
    let s = "2 output throughput";
    let lines_target = median(&lps) >= 1e6;
    t.add(
        s,
        &format!("lines/s, {n} x 80 B, POST to end, 1 SSE client"),
        "/s",
        lps.clone(),
        Some(("raw pipe reader", raw_lps.clone())),
        Some((">= 1M lines/s", lines_target)),
    );
    t.add(s, "MB/s delivered", "MB/s", mbps, None, None);
    let peak = median(&rss);
    t.add(
        s,
        "server peak RSS",
        "MiB",
        rss,
        None,
        Some(("< 100 MiB", peak < 100.0)),
    );
}

async fn scenario_fanout(ctx: &Ctx, t: &mut Table) {
    let p = ctx.plan;
    let (subs, n) = (p.fanout_subscribers, p.fanout_lines);
    let mut rates = vec![];
    for _ in 0..p.rounds {
        let server = Arc::new(ctx.start("data").await);
        let id = post_run(
            ctx,
            &server,
            json!({"module_id": "delayed_lines", "parameters": {"n": n}}),
        )
        .await;
        let first_line = Arc::new(AtomicU64::new(u64::MAX));
        let epoch = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..subs {
            let client = ctx.client.clone();
            let server = server.clone();
            let id = id.clone();
            let first_line = first_line.clone();
            tasks.push(tokio::spawn(async move {
                let res = client
                    .get(server.url(&format!("/runs/{id}/stream")))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let mut next = 1u64;
                let mut bad = None;
                let mut ended = false;
                sse::follow(res, Duration::from_secs(600), |ev| match ev.kind {
                    "stdout" => {
                        if next == 1 {
                            first_line
                                .fetch_min(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
                        }
                        match serde_json::from_slice::<sse::LineData>(ev.data) {
                            Ok(l) if l.seq == next => next += 1,
                            Ok(l) => {
                                bad.get_or_insert(format!("expected {next}, got {}", l.seq));
                            }
                            Err(e) => {
                                bad.get_or_insert(e.to_string());
                            }
                        }
                    }
                    "end" => ended = true,
                    _ => {}
                })
                .await;
                match bad {
                    Some(b) => Err(b),
                    None if !ended => Err("no end event".into()),
                    None => Ok((next - 1, epoch.elapsed())),
                }
            }));
        }
        let mut last_end = Duration::ZERO;
        let mut total = 0u64;
        for task in tasks {
            match task.await.expect("subscriber") {
                Ok((lines, at)) => {
                    if lines != n {
                        t.fail(format!("fan-out: a subscriber got {lines} of {n} lines"));
                    }
                    total += lines;
                    last_end = last_end.max(at);
                }
                Err(e) => t.fail(format!("fan-out: {e}")),
            }
        }
        let first = Duration::from_micros(first_line.load(Ordering::Relaxed));
        let span = last_end.saturating_sub(first).as_secs_f64().max(1e-6);
        rates.push(total as f64 / span);
        if let Ok(server) = Arc::try_unwrap(server) {
            server.stop().await;
        }
    }
    let ok = median(&rates) >= 1e6;
    t.add(
        "3 fan-out",
        &format!("events/s, {subs} subscribers x {n} lines, all in order"),
        "/s",
        rates,
        None,
        Some((">= 1M events/s", ok)),
    );
}

fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

async fn scenario_latency(ctx: &Ctx, t: &mut Table) {
    let p = ctx.plan;
    let n = (p.latency_for.as_millis() / 10) as u64;
    let (mut p50s, mut p99s) = (vec![], vec![]);
    for _ in 0..p.rounds {
        let server = ctx.start("data").await;
        let id = post_run(
            ctx,
            &server,
            json!({"module_id": "ticks", "parameters": {"n": n}}),
        )
        .await;
        let res = ctx
            .client
            .get(server.url(&format!("/runs/{id}/stream")))
            .send()
            .await
            .expect("stream");
        let mut delays = Vec::new();
        sse::follow(res, p.latency_for + Duration::from_secs(30), |ev| {
            if ev.kind == "stdout"
                && let Ok(l) = serde_json::from_slice::<sse::LineData>(ev.data)
                && let Ok(sent) = l.line.trim().parse::<u64>()
            {
                delays.push(monotonic_ns().saturating_sub(sent) as f64 / 1e6);
            }
        })
        .await;
        if delays.len() as u64 != n {
            t.fail(format!("latency: got {} of {n} lines", delays.len()));
        }
        delays.sort_by(f64::total_cmp);
        p50s.push(percentile(&delays, 0.5));
        p99s.push(percentile(&delays, 0.99));
        server.stop().await;
    }
    let ok = median(&p99s) < 5.0;
    t.add(
        "4 latency",
        "line to SSE client, p50",
        "ms",
        p50s,
        None,
        None,
    );
    t.add(
        "4 latency",
        "line to SSE client, p99",
        "ms",
        p99s,
        None,
        Some(("p99 < 5 ms", ok)),
    );
}

async fn scenario_cancel(ctx: &Ctx, t: &mut Table) {
    let p = ctx.plan;
    let server = ctx.start("data").await;
    let mut times = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..p.cancels {
        // Reference: the same child killed with SIGTERM and reaped by a minimal tokio program.
        let mut child = tokio::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t0 = Instant::now();
        let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = child.wait().await;
        raw.push(t0.elapsed().as_secs_f64() * 1000.0);

        let id = post_run(ctx, &server, json!({"module_id": "sleep"})).await;
        let pgid = loop {
            let run: serde_json::Value = ctx
                .client
                .get(server.url(&format!("/runs/{id}")))
                .send()
                .await
                .expect("GET")
                .json()
                .await
                .expect("json");
            if let Some(pid) = run["pid"].as_u64() {
                break pid as u32;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let res = ctx
            .client
            .get(server.url(&format!("/runs/{id}/stream")))
            .send()
            .await
            .expect("stream");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let follower = tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut end = None;
            let mut status_seen = false;
            sse::follow(res, Duration::from_secs(30), |ev| {
                if ev.kind == "status" && !status_seen {
                    status_seen = true;
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                if ev.kind == "end" {
                    end = serde_json::from_slice::<sse::RunData>(ev.data)
                        .ok()
                        .map(|r| r.status);
                }
            })
            .await;
            (end, Instant::now())
        });
        let _ = rx.await;
        let t0 = Instant::now();
        let del = ctx
            .client
            .delete(server.url(&format!("/runs/{id}")))
            .send()
            .await
            .expect("DELETE");
        if del.status().as_u16() != 202 {
            t.fail(format!("cancel: DELETE answered {}", del.status()));
        }
        let (end, at) = follower.await.expect("follower");
        if end.as_deref() != Some("cancelled") {
            t.fail(format!("cancel: final status {end:?}"));
        }
        if procs::group_alive(pgid) {
            t.fail("cancel: the process group outlived the run".into());
        }
        times.push(at.duration_since(t0).as_secs_f64() * 1000.0);
    }
    server.stop().await;
    times.sort_by(f64::total_cmp);
    raw.sort_by(f64::total_cmp);
    let p99 = percentile(&times, 0.99);
    t.add(
        "5 cancel",
        "DELETE to `cancelled` + group gone, p50",
        "ms",
        vec![percentile(&times, 0.5)],
        Some(("raw SIGTERM + reap", vec![percentile(&raw, 0.5)])),
        None,
    );
    t.add(
        "5 cancel",
        "DELETE to `cancelled` + group gone, p99",
        "ms",
        vec![p99],
        Some(("raw SIGTERM + reap", vec![percentile(&raw, 0.99)])),
        Some(("p99 < 20 ms", p99 < 20.0)),
    );
}

async fn scenario_memory(ctx: &Ctx, t: &mut Table) {
    let p = ctx.plan;
    for (store, label) in [("data", "SQLite"), ("", "memory")] {
        let server = ctx.start(store).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = procs::rss_kib(server.pid()) as f64;
        let made = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let per_client = p.memory_runs.div_ceil(p.clients);
        for _ in 0..p.clients {
            let client = ctx.client.clone();
            let url = server.url("/runs?wait=10");
            let made = made.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_client {
                    let res = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(r#"{"module_id":"dry","mode":"dry_run","parameters":{}}"#)
                        .send()
                        .await;
                    if let Ok(r) = res
                        && r.status().as_u16() == 200
                    {
                        made.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        let made = made.load(Ordering::Relaxed);
        if made < (per_client * p.clients) as u64 {
            t.fail(format!("memory ({label}): only {made} runs finished"));
        }
        // Let retention and the allocator settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = procs::rss_kib(server.pid()) as f64;
        let per_run = ((after - idle).max(0.0) * 1024.0) / made.max(1) as f64;
        if store == "data" {
            t.add(
                "6 memory",
                "RSS idle",
                "MiB",
                vec![idle / 1024.0],
                None,
                Some(("< 20 MiB", idle / 1024.0 < 20.0)),
            );
        }
        t.add(
            "6 memory",
            &format!("RSS with {made} finished runs, {label}"),
            "MiB",
            vec![after / 1024.0],
            None,
            if store == "data" {
                Some(("< 100 MiB", after / 1024.0 < 100.0))
            } else {
                None
            },
        );
        t.add(
            "6 memory",
            &format!("bytes per finished run, {label}"),
            "B",
            vec![per_run],
            None,
            Some(("< 2 KiB", per_run < 2048.0)),
        );
        server.stop().await;
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(0, |k| k / 1024 / 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {mem} GiB RAM, Linux {}",
        kernel.trim()
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let plan = if quick { Plan::quick() } else { Plan::full() };
    // The last occurrence wins, so that flags given to `bench/run` override its own.
    let value = |flag: &str| {
        args.iter()
            .rposition(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    let modrun = value("--modrun").unwrap_or_else(|| PathBuf::from("target/release/modrun"));
    let out = value("--out").unwrap_or_else(|| PathBuf::from("bench/results"));
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let ctx = Ctx {
        plan,
        modrun,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()
            .expect("client"),
        true_path: procs::true_path().display().to_string(),
    };
    let started = Instant::now();
    let machine = machine();
    println!(
        "modrun benchmark ({}), {machine}",
        if plan.quick { "quick" } else { "full" }
    );
    println!("{HEADER}");
    let mut table = Table {
        rows: vec![],
        failures: vec![],
    };
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    if want("throughput") {
        scenario_throughput(&ctx, &mut table).await;
    }
    if want("output") {
        scenario_output(&ctx, &mut table).await;
    }
    if want("fanout") {
        scenario_fanout(&ctx, &mut table).await;
    }
    if want("latency") {
        scenario_latency(&ctx, &mut table).await;
    }
    if want("cancel") {
        scenario_cancel(&ctx, &mut table).await;
    }
    if want("memory") {
        scenario_memory(&ctx, &mut table).await;
    }
    if want("cluster") {
        let required = only.as_deref() == Some("cluster");
        cluster::scenario_cluster(&ctx, &mut table, required).await;
    }
    if want("answer") {
        scenario_answer(&ctx, &mut table).await;
    }
    if want("soak") {
        soak::scenario_soak(&ctx, &mut table).await;
    }
    let took = started.elapsed().as_secs();
    // A partial run never overwrites the full table: `latest-throughput`, `quick-cancel`, ...
    let kind = if quick { "quick" } else { "latest" };
    let name = match &only {
        Some(o) => format!("{kind}-{o}"),
        None => kind.to_owned(),
    };
    std::fs::create_dir_all(&out).expect("results folder");
    let json = json!({
        "kind": if quick { "quick" } else { "full" },
        "machine": machine,
        "rounds": plan.rounds,
        "seconds": took,
        "rows": table.rows,
        "failures": table.failures,
    });
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&json).expect("json"),
    )
    .expect("write json");
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {machine}. Medians over {} round(s) (the cluster scenario: at most 3); each ratio is the median of the per-round ratios against a reference measured in the same round. Took {took} s.\n",
        plan.rounds
    );
    let _ = writeln!(md, "{HEADER}");
    for r in &table.rows {
        let _ = writeln!(md, "{}", fmt_row(r));
    }
    std::fs::write(out.join(format!("{name}.md")), md).expect("write md");
    println!(
        "\nresults: {}/{name}.json and {name}.md ({took} s)",
        out.display()
    );
    if !table.failures.is_empty() {
        eprintln!("\n{} correctness check(s) failed:", table.failures.len());
        for f in &table.failures {
            eprintln!("- {f}");
        }
        std::process::exit(1);
    }
}
