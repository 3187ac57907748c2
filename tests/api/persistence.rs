//! Run history and output survive restarts and crashes; the store refuses what it cannot use.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    Server, base_config, binary, group_members, read_sse, rss_kib, signal, spawn_app_with,
    start_server_at, wait_until, write_config,
};

/// Extra modules for the persistence tests.
const MODULES: &str = r#"
[[modules]]
id = "ticker"
name = "Ticker with a grandchild"
command = ["sh", "-c", 'sleep 300 & i=1; while [ $i -le 100000 ]; do echo "tick $i"; i=$((i+1)); sleep 0.005; done']
"#;

async fn post(c: &Client, s: &Server, body: Value) -> Value {
    let res = c.post(s.url("/runs")).json(&body).send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    res.json().await.unwrap()
}

async fn get(c: &Client, s: &Server, path: &str) -> Value {
    c.get(s.url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_for(c: &Client, s: &Server, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    let limit = Duration::from_secs(120);
    loop {
        let run = get(c, s, &format!("/runs/{id}")).await;
        if pred(&run) {
            return run;
        }
        assert!(start.elapsed() < limit, "waiting for {id}: {run}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn finished(run: &Value) -> bool {
    !matches!(run["status"].as_str(), Some("queued" | "running"))
}

/// kill -9 of the server mid-run: after a restart the run is `lost`, its output up to the crash
/// is readable (same seqs) and resumable over SSE, and no process of its group is left. With
/// the subreaper (no cgroup), the grandchild outlives the crash and start-up kills it.
#[tokio::test]
async fn crash_mid_run_then_restart() {
    crash_mid_run(Containment::Subreaper).await;
}

/// The same with a cgroup per run: the pool's guard kills the grandchild at the crash itself.
#[tokio::test]
async fn crash_mid_run_with_cgroups_leaves_no_process() {
    crash_mid_run(Containment::Cgroup).await;
}

#[derive(PartialEq)]
enum Containment {
    Subreaper,
    Cgroup,
}

async fn crash_mid_run(how: Containment) {
    let containment = match how {
        Containment::Subreaper => "containment = \"subreaper\"",
        Containment::Cgroup => "containment = \"cgroup\"",
    };
    let (dir, config) = write_config(&format!("{}{MODULES}", base_config(containment)));
    let c = Client::new();
    let mut s = start_server_at(&config).await;
    let run = post(&c, &s, json!({"module_id": "ticker"})).await;
    let id = run["id"].as_str().unwrap().to_owned();
    let running = wait_for(&c, &s, &id, |r| {
        r["output_lines"].as_u64().unwrap_or(0) >= 100
    })
    .await;
    let pgid = running["pid"].as_u64().unwrap();
    let seen = get(&c, &s, &format!("/runs/{id}")).await["output_lines"]
        .as_u64()
        .unwrap();
    // What a client saw a few flush intervals (50 ms each) before a crash is persisted.
    tokio::time::sleep(Duration::from_millis(400)).await;

    signal(&s.child, Signal::SIGKILL);
    s.child.wait().await.unwrap();
    // The parent-death signal took the direct child.
    assert!(
        wait_until(Duration::from_secs(5), || !group_members(pgid)
            .contains(&pgid))
        .await
    );
    if how == Containment::Subreaper {
        assert!(
            !group_members(pgid).is_empty(),
            "the grandchild outlived the crash"
        );
    } else {
        assert!(
            wait_until(Duration::from_secs(5), || group_members(pgid).is_empty()).await,
            "the guard killed the run's cgroup when modrun died"
        );
    }

    let s = start_server_at(&config).await;
    assert!(
        group_members(pgid).is_empty(),
        "start-up killed what was left of the run"
    );
    let lost = get(&c, &s, &format!("/runs/{id}")).await;
    assert_eq!(lost["status"], "lost");
    assert_eq!(lost["error"], "modrun stopped while the run was executing");
    assert!(lost["finished_at"].is_string());
    let kept = lost["output_lines"].as_u64().unwrap();
    assert!(
        kept >= seen,
        "at most the last ~200 ms are lost: kept {kept}, seen {seen}"
    );

    let page = get(&c, &s, &format!("/runs/{id}/output?limit=10000")).await;
    let lines = page["lines"].as_array().unwrap();
    assert_eq!(lines.len() as u64, kept);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"], i as u64 + 1);
        assert_eq!(l["line"], format!("tick {}", i + 1));
    }
    assert_eq!(page["complete"], true);

    let res = c
        .get(s.url(&format!("/runs/{id}/stream")))
        .header("Last-Event-ID", "50")
        .send()
        .await
        .unwrap();
    let events = read_sse(res, Duration::from_secs(10)).await;
    assert_eq!(events[0].event, "status");
    let seqs: Vec<u64> = events
        .iter()
        .filter(|e| e.event == "stdout")
        .map(|e| e.data["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.first(), Some(&51));
    assert_eq!(seqs.len() as u64, kept - 50);
    let end = events.last().unwrap();
    assert_eq!(
        (end.event.as_str(), end.data["status"].as_str()),
        ("end", Some("lost"))
    );
    drop(dir);
}

/// A graceful stop leaves queued runs queued; after the restart they run, in creation order.
/// Listing and its filters are the same across the restart.
#[tokio::test]
async fn graceful_restart_runs_the_queued_runs() {
    let toml = base_config("").replace("max_concurrent = 4", "max_concurrent = 1");
    let (_dir, config) = write_config(&toml);
    let c = Client::new();
    let mut s = start_server_at(&config).await;
    let long = post(&c, &s, json!({"module_id": "sleep"})).await;
    let q1 = post(
        &c,
        &s,
        json!({"module_id": "lines", "parameters": {"n": 2}}),
    )
    .await;
    let q2 = post(
        &c,
        &s,
        json!({"module_id": "cat", "stdin": "kept across restarts\n"}),
    )
    .await;
    assert_eq!(
        (q1["status"].as_str(), q2["status"].as_str()),
        (Some("queued"), Some("queued"))
    );
    wait_for(&c, &s, long["id"].as_str().unwrap(), |r| {
        r["status"] == "running"
    })
    .await;
    let before = get(&c, &s, "/runs?limit=10").await;

    signal(&s.child, Signal::SIGTERM);
    assert!(s.child.wait().await.unwrap().success());

    let s = start_server_at(&config).await;
    let r1 = wait_for(&c, &s, q1["id"].as_str().unwrap(), finished).await;
    let r2 = wait_for(&c, &s, q2["id"].as_str().unwrap(), finished).await;
    assert_eq!(
        (r1["status"].as_str(), r2["status"].as_str()),
        (Some("succeeded"), Some("succeeded"))
    );
    assert!(
        r1["started_at"].as_str() < r2["started_at"].as_str(),
        "creation order"
    );
    let out = get(
        &c,
        &s,
        &format!("/runs/{}/output", q2["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(out["lines"][0]["line"], "kept across restarts");
    let cancelled = get(&c, &s, &format!("/runs/{}", long["id"].as_str().unwrap())).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        cancelled["error"],
        "the run was cancelled because modrun was shutting down"
    );

    let after = get(&c, &s, "/runs?limit=10").await;
    let ids = |v: &Value| -> Vec<String> {
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&before), ids(&after), "same runs, same order");
    let filtered = get(&c, &s, "/runs?status=succeeded&module_id=lines").await;
    assert_eq!(ids(&filtered), [q1["id"].as_str().unwrap()]);
    let paged = get(&c, &s, "/runs?limit=1").await;
    let next = paged["next_cursor"].as_str().unwrap();
    let page2 = get(&c, &s, &format!("/runs?limit=5&cursor={next}")).await;
    assert_eq!(ids(&page2), ids(&after)[1..]);
}

async fn refused_start(config: &std::path::Path) -> String {
    let out = tokio::process::Command::new(binary())
        .args(["serve", "--bind", "127.0.0.1:0", "--config"])
        .arg(config)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "the server must refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A second server on the same storage path refuses to start, with a clear message.
#[tokio::test]
async fn second_server_on_the_same_store_is_refused() {
    let (_dir, config) = write_config(&base_config(""));
    let _first = start_server_at(&config).await;
    let err = refused_start(&config).await;
    assert!(
        err.contains("another modrun is already using the store"),
        "{err}"
    );
}

/// A corrupt database file, or one from a newer modrun, stops start-up; the file is left as
/// it was.
#[tokio::test]
async fn unreadable_stores_are_refused_and_left_alone() {
    let (dir, config) = write_config(&base_config(""));
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("modrun.db");
    let garbage = b"this is not a database, and it must not be replaced".repeat(100);
    std::fs::write(&db, &garbage).unwrap();
    let err = refused_start(&config).await;
    assert!(
        err.contains("cannot open the store") && err.contains("modrun.db"),
        "{err}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), garbage);

    std::fs::remove_file(&db).unwrap();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE t (x); PRAGMA user_version = 99;")
            .unwrap();
    }
    let err = refused_start(&config).await;
    assert!(err.contains("schema version 99"), "{err}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 99, "not migrated down or reset");
}

/// Finished runs older than keep_for are purged with their output.
#[tokio::test]
async fn retention_by_age() {
    let toml = base_config("").replace("keep_runs = 1000", "keep_runs = 1000\nkeep_for = \"1s\"");
    let app = spawn_app_with(&toml).await;
    let res = app
        .post_to("/runs?wait=10", json!({"module_id": "lines"}))
        .await;
    let run: Value = res.json().await.unwrap();
    let id = run["id"].as_str().unwrap();
    let url = app.url(&format!("/runs/{id}"));
    let start = Instant::now();
    while app.client.get(&url).send().await.unwrap().status() != StatusCode::NOT_FOUND {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "purged within seconds"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = app.get(&format!("/runs/{id}/output")).await;
    assert_eq!(out.status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

/// 1 GiB of output is stored and replayed whole, while the server's memory stays bounded.
#[tokio::test]
async fn one_gib_of_output_is_stored_and_replayed() {
    let toml = base_config("").replace("[sse]", "[output]\nmax_run_bytes = \"2GiB\"\n[sse]");
    let (_dir, config) = write_config(&toml);
    let c = Client::new();
    let s = start_server_at(&config).await;
    // 1 Mi lines of 1023 bytes + newline = 1 GiB.
    let run = post(
        &c,
        &s,
        json!({"module_id": "big", "parameters": {"lines": 1_048_576, "width": 1023}}),
    )
    .await;
    let id = run["id"].as_str().unwrap();
    let done = wait_for(&c, &s, id, finished).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["output_lines"], 1_048_576);

    let mut res = c
        .get(s.url(&format!("/runs/{id}/output")))
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap();
    let mut bytes = 0u64;
    let mut lines = 0u64;
    while let Some(chunk) = res.chunk().await.unwrap() {
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    assert_eq!((lines, bytes), (1_048_576, 1 << 30));
    let rss = rss_kib(s.child.id().unwrap());
    eprintln!("RSS after storing and replaying 1 GiB: {} MiB", rss / 1024);
    assert!(rss < 100 * 1024, "RSS {rss} KiB");
}
