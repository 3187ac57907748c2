//! The `modrun` binary itself: start-up errors, the listening line, graceful shutdown, memory.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::process::Command;

use nix::sys::signal::Signal;

use crate::helpers::{
    base_config, binary, group_members, peak_rss_kib, read_sse_with, signal, start_server,
    write_config,
};

/// A bad config file stops start-up with a non-zero exit and a message naming the file and
/// the dotted key.
#[tokio::test]
async fn bad_config_fails_at_start() {
    let (_dir, path) =
        write_config(&base_config("").replace("max_concurrent = 4", "max_concurrent = 0"));
    let out = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*path.to_string_lossy()), "{err}");
    assert!(err.contains("runner.max_concurrent"), "{err}");

    let (_dir, path) = write_config(
        "[[modules]]\nid = \"a\"\ncommand = [\"true\"]\n[[modules.parameters]]\nname = \"x\"\ntype = \"float\"\n",
    );
    let out = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("modules[0].parameters[0].type"), "{err}");

    let out = Command::new(binary())
        .args(["serve", "--config", "/nonexistent/modrun.toml"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/modrun.toml"));
}

/// SIGTERM: running runs are cancelled, an open SSE stream gets `end` and closes, queued runs
/// stay queued, new requests are refused, and the process exits 0 within kill_grace + 2 s.
#[tokio::test]
async fn graceful_shutdown_with_an_open_stream() {
    let toml = base_config("").replace("max_concurrent = 4", "max_concurrent = 1");
    let (mut server, _dir) = start_server(&toml).await;
    let client = reqwest::Client::new();
    let running: Value = client
        .post(format!("{}/runs", server.base))
        .json(&json!({"module_id": "tree"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let queued: Value = client
        .post(format!("{}/runs", server.base))
        .json(&json!({"module_id": "lines"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queued["status"], "queued");
    let id = running["id"].as_str().unwrap().to_owned();
    let mut pgid = 0;
    for _ in 0..100 {
        let r: Value = client
            .get(format!("{}/runs/{id}", server.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(p) = r["pid"].as_u64() {
            pgid = p;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pgid > 0);
    let stream = client
        .get(format!("{}/runs/{id}/stream", server.base))
        .send()
        .await
        .unwrap();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let mut first_tx = Some(first_tx);
    let reader = tokio::spawn(read_sse_with(stream, Duration::from_secs(10), move |_| {
        if let Some(tx) = first_tx.take() {
            let _ = tx.send(());
        }
    }));
    first_rx.await.unwrap();

    let t = Instant::now();
    signal(&server.child, Signal::SIGTERM);
    let events = reader.await.unwrap();
    let end = events.last().unwrap();
    assert_eq!(end.event, "end");
    assert!(
        matches!(end.data["status"].as_str(), Some("cancelled" | "running")),
        "{}",
        end.data
    );
    let status = tokio::time::timeout(Duration::from_secs(4), server.child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "within kill_grace + 2 s: {:?}",
        t.elapsed()
    );
    assert!(
        group_members(pgid).is_empty(),
        "the run's processes are gone"
    );
    assert!(
        client
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .is_err(),
        "not accepting"
    );
}

/// A 100 MB output streams to a subscriber while the server's peak RSS stays under 100 MiB.
#[tokio::test]
async fn large_output_streams_in_bounded_memory() {
    let (mut server, _dir) = start_server(&base_config("")).await;
    let client = reqwest::Client::new();
    let run: Value = client
        .post(format!("{}/runs", server.base))
        .json(&json!({"module_id": "big", "parameters": {"lines": 100_000, "width": 1000}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = run["id"].as_str().unwrap();
    let stream = client
        .get(format!("{}/runs/{id}/stream", server.base))
        .send()
        .await
        .unwrap();
    let mut lines = 0u64;
    let mut bytes = 0u64;
    let mut last_seq = 0u64;
    let events = read_sse_with(stream, Duration::from_secs(120), |e| {
        if e.event == "stdout" {
            let seq = e.data["seq"].as_u64().unwrap();
            assert_eq!(seq, last_seq + 1, "no gap, no duplicate");
            last_seq = seq;
            lines += 1;
            bytes += e.data["line"].as_str().unwrap().len() as u64;
        }
    })
    .await;
    let end = events.last().unwrap();
    assert_eq!(end.event, "end");
    assert_eq!(end.data["status"], "succeeded");
    // 64 MiB are kept and streamed; the rest is counted, and a marker line says so.
    assert_eq!(bytes, lines * 1000);
    assert!(bytes >= 60 << 20, "{bytes}");
    let marker = events
        .iter()
        .rev()
        .find(|e| e.event == "stderr")
        .expect("marker line");
    assert!(
        marker.data["line"]
            .as_str()
            .unwrap()
            .contains("were not kept")
    );
    let rss = peak_rss_kib(server.child.id().unwrap());
    eprintln!("peak RSS while streaming 100 MB: {} MiB", rss / 1024);
    assert!(rss < 100 * 1024, "peak RSS {rss} KiB");
    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();
}

/// `local` mode (when the operator allows it) holds the output back until the process ends,
/// but no more than `output.max_run_bytes`: 300 MB of stdout, and two 200 MB lines without a
/// newline at once, leave the server's peak RSS bounded, and it answers `/healthz` meanwhile.
#[tokio::test]
async fn local_mode_is_bounded_by_the_output_budget() {
    let modules = r#"
[[modules]]
id = "flood"
name = "300 MB of lines"
command = ["sh", "-c", 'yes "$(printf "%079d" 0)" | head -c 300000000']
[[modules]]
id = "oneline"
name = "200 MB without a newline"
command = ["sh", "-c", 'head -c 200000000 /dev/zero | tr "\0" "a"']
"#;
    let toml = format!(
        "{}{modules}",
        base_config("request_modes = [\"local\", \"async\"]")
            .replace("[sse]", "[output]\nmax_run_bytes = \"8MiB\"\n[sse]")
    );
    let (mut server, _dir) = start_server(&toml).await;
    let client = reqwest::Client::new();
    let post = |module: &'static str| {
        let client = client.clone();
        let url = format!("{}/runs?wait=120", server.base);
        async move {
            let res = client
                .post(url)
                .json(&json!({"module_id": module, "mode": "local"}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), reqwest::StatusCode::OK);
            res.json::<Value>().await.unwrap()
        }
    };
    let health = async {
        // While the three runs are going, the server answers at once.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let res = client
            .get(format!("{}/healthz", server.base))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success());
        started.elapsed()
    };
    let (flood, line1, line2, health_took) =
        tokio::join!(post("flood"), post("oneline"), post("oneline"), health);
    eprintln!("/healthz during three local runs: {health_took:?}");
    for run in [&flood, &line1, &line2] {
        assert_eq!(run["status"], "succeeded", "{run}");
        let out: Value = client
            .get(format!(
                "{}/runs/{}/output?after={}",
                server.base,
                run["id"].as_str().unwrap(),
                run["output_lines"].as_u64().unwrap() - 1
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let marker = out["lines"][0]["line"].as_str().unwrap();
        assert!(marker.contains("were not kept"), "{marker}");
    }
    let rss = peak_rss_kib(server.child.id().unwrap());
    eprintln!(
        "peak RSS with three local runs of 200-300 MB: {} MiB",
        rss / 1024
    );
    assert!(rss < 120 * 1024, "peak RSS {rss} KiB");
    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();
}
