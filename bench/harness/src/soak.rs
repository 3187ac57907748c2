//! Scenario 7, soak: minutes of mixed load (short runs, 1,000-line runs, cancels, SSE
//! subscribers that come and go, retention purging) with the server's RSS, open descriptors,
//! threads and store size sampled once it has warmed up and at the end: nothing may grow
//! without bound, and every answer must be right.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::procs::{self, Server};
use crate::{Ctx, Table};

/// What one sample saw.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_mib: f64,
    fds: f64,
    threads: f64,
    store_mib: f64,
}

fn sample(pid: u32, store: &Path) -> Sample {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let store_bytes: u64 = std::fs::read_dir(store)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    Sample {
        rss_mib: procs::rss_kib(pid) as f64 / 1024.0,
        fds: fds as f64,
        threads: threads as f64,
        store_mib: store_bytes as f64 / (1 << 20) as f64,
    }
}

/// Counters of the load.
#[derive(Default)]
struct Tally {
    runs: AtomicU64,
    lines: AtomicU64,
    cancels: AtomicU64,
    streams: AtomicU64,
    errors: AtomicU64,
}

/// Finished runs kept: few enough that retention purges from the first seconds on.
fn keep_runs(p: &crate::Plan) -> u64 {
    if p.quick { 200 } else { 2000 }
}

pub async fn scenario_soak(ctx: &Ctx, t: &mut Table) {
    let p = ctx.plan;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let server = Arc::new(
        procs::modrun(
            &ctx.modrun,
            &crate::base_config(
                &store.display().to_string(),
                &crate::modules(&ctx.true_path),
            )
            .replace(
                "keep_runs = 200000",
                &format!("keep_runs = {}", keep_runs(&p)),
            ),
        )
        .await,
    );
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + p.soak_for;
    let mut tasks = Vec::new();
    let spawn = |tasks: &mut Vec<tokio::task::JoinHandle<()>>, n: usize, kind: &'static str| {
        for _ in 0..n {
            let client = ctx.client.clone();
            let server = server.clone();
            let tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    if !one(kind, &client, &server, &tally).await {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    };
    spawn(&mut tasks, 6, "short");
    spawn(&mut tasks, 3, "lines");
    spawn(&mut tasks, 2, "cancel");
    spawn(&mut tasks, 3, "stream");
    // Warm up for a third of the time (caches, the store's first pages, retention starting),
    // then sample; sample again at the end.
    tokio::time::sleep(p.soak_for / 3).await;
    let warm = sample(server.pid(), &store);
    for task in tasks {
        let _ = task.await;
    }
    let end = sample(server.pid(), &store);
    let secs = p.soak_for.as_secs_f64();
    let runs = tally.runs.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    println!(
        "soak: {runs} runs ({} 1000-line, {} cancelled, {} streams) in {secs:.0} s, {errors} errors; warm {warm:?}, end {end:?}",
        tally.lines.load(Ordering::Relaxed),
        tally.cancels.load(Ordering::Relaxed),
        tally.streams.load(Ordering::Relaxed),
    );
    if errors > 0 {
        t.fail(format!("soak: {errors} wrong or failed answers"));
    }
    let label = format!("{secs:.0} s of mixed load, {runs} runs");
    let grows = |warm: f64, end: f64, slack: f64| end <= warm * 1.25 + slack;
    t.add(
        "7 soak",
        &format!("RSS at the end ({label})"),
        "MiB",
        vec![end.rss_mib],
        Some(("after warm-up", vec![warm.rss_mib])),
        Some(("<= 1.25x + 8 MiB", grows(warm.rss_mib, end.rss_mib, 8.0))),
    );
    t.add(
        "7 soak",
        "open descriptors at the end",
        "",
        vec![end.fds],
        Some(("after warm-up", vec![warm.fds])),
        Some(("<= 1.25x + 16", grows(warm.fds, end.fds, 16.0))),
    );
    t.add(
        "7 soak",
        "threads at the end",
        "",
        vec![end.threads],
        Some(("after warm-up", vec![warm.threads])),
        Some(("<= 1.25x + 8", grows(warm.threads, end.threads, 8.0))),
    );
    t.add(
        "7 soak",
        &format!("store size at the end (keep_runs = {})", keep_runs(&p)),
        "MiB",
        vec![end.store_mib],
        Some(("after warm-up", vec![warm.store_mib])),
        Some((
            "<= 1.25x + 8 MiB",
            grows(warm.store_mib, end.store_mib, 8.0),
        )),
    );
    match Arc::try_unwrap(server) {
        Ok(s) => s.stop().await,
        Err(_) => t.fail("soak: the server is still in use".into()),
    }
}

/// One operation of a kind; true if its answer was right.
async fn one(kind: &str, client: &reqwest::Client, server: &Server, tally: &Tally) -> bool {
    match kind {
        "short" => {
            let ok = finished(
                client,
                server,
                json!({"module_id": "true"}),
                "succeeded",
                None,
            )
            .await;
            tally.runs.fetch_add(1, Ordering::Relaxed);
            ok
        }
        "lines" => {
            let ok = finished(
                client,
                server,
                json!({"module_id": "lines", "parameters": {"n": 1000}}),
                "succeeded",
                Some(1000),
            )
            .await;
            tally.runs.fetch_add(1, Ordering::Relaxed);
            tally.lines.fetch_add(1, Ordering::Relaxed);
            ok
        }
        "cancel" => {
            let Ok(res) = client
                .post(server.url("/runs"))
                .json(&json!({"module_id": "sleep"}))
                .send()
                .await
            else {
                return false;
            };
            let Ok(run) = res.json::<serde_json::Value>().await else {
                return false;
            };
            let Some(id) = run["id"].as_str() else {
                return false;
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            let cancelled = client
                .delete(server.url(&format!("/runs/{id}")))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 202);
            tally.runs.fetch_add(1, Ordering::Relaxed);
            tally.cancels.fetch_add(1, Ordering::Relaxed);
            cancelled && wait_status(client, server, id, "cancelled").await
        }
        _ => {
            // A subscriber that comes and goes: half read the whole stream, half leave early.
            let Ok(res) = client
                .post(server.url("/runs"))
                .json(&json!({"module_id": "lines", "parameters": {"n": 2000}}))
                .send()
                .await
            else {
                return false;
            };
            let Ok(run) = res.json::<serde_json::Value>().await else {
                return false;
            };
            let Some(id) = run["id"].as_str().map(str::to_owned) else {
                return false;
            };
            let n = tally.streams.fetch_add(1, Ordering::Relaxed);
            tally.runs.fetch_add(1, Ordering::Relaxed);
            let Ok(mut stream) = client
                .get(server.url(&format!("/runs/{id}/stream")))
                .send()
                .await
            else {
                return false;
            };
            let mut got = 0usize;
            let limit = if n.is_multiple_of(2) {
                usize::MAX
            } else {
                4096
            };
            while let Ok(Some(chunk)) = stream.chunk().await {
                got += chunk.len();
                if got >= limit {
                    break;
                }
            }
            drop(stream);
            wait_status(client, server, &id, "succeeded").await
        }
    }
}

/// POST `body` with `?wait` and check the run's status (and its line count).
async fn finished(
    client: &reqwest::Client,
    server: &Server,
    body: serde_json::Value,
    status: &str,
    lines: Option<u64>,
) -> bool {
    let Ok(res) = client
        .post(server.url("/runs?wait=30"))
        .json(&body)
        .send()
        .await
    else {
        return false;
    };
    if res.status().as_u16() != 200 {
        return false;
    }
    let Ok(run) = res.json::<serde_json::Value>().await else {
        return false;
    };
    run["status"] == status && lines.is_none_or(|n| run["output_lines"].as_u64() == Some(n))
}

/// Poll until the run has `status` (at most 30 s).
async fn wait_status(client: &reqwest::Client, server: &Server, id: &str, status: &str) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(res) = client.get(server.url(&format!("/runs/{id}"))).send().await
            && let Ok(run) = res.json::<serde_json::Value>().await
        {
            if run["status"] == status {
                return true;
            }
            if run["status"] != "running" && run["status"] != "queued" {
                return false;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
