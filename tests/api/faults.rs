//! The service keeps serving under faults it does not control: a log sink that stops reading,
//! a log pipe that is gone.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::{Client, StatusCode};
use serde_json::json;

use crate::helpers::{base_config, binary, signal, write_config};

/// A free loopback port (bound, read, released: the server binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start `modrun serve` with its stderr on `stderr` and `RUST_LOG=debug`; wait until it answers.
async fn serve_with_stderr(stderr: OwnedFd) -> (tokio::process::Child, String, tempfile::TempDir) {
    let (dir, config) = write_config(&base_config(""));
    let port = free_port();
    let child = tokio::process::Command::new(binary())
        .args(["serve", "--bind", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn modrun");
    let base = format!("http://127.0.0.1:{port}");
    let client = Client::new();
    let start = Instant::now();
    loop {
        if let Ok(res) = client.get(format!("{base}/healthz")).send().await
            && res.status() == StatusCode::OK
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, base, dir)
}

/// Many runs that log (at debug), then health, then SIGTERM: every answer arrives, and the
/// server stops within its usual bound.
async fn serve_through_a_bad_sink(stderr: OwnedFd) {
    let (mut child, base, _dir) = serve_with_stderr(stderr).await;
    let client = Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for i in 0..300 {
        let res = client
            .post(format!("{base}/runs?wait=10"))
            .json(&json!({"module_id": "lines", "parameters": {"n": 20}}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("run {i} got no answer: {e}"));
        assert_eq!(res.status(), StatusCode::OK, "run {i}");
        let run: serde_json::Value = res.json().await.unwrap();
        assert_eq!(run["status"], "succeeded", "run {i}: {run}");
    }
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    let stopping = Instant::now();
    signal(&child, Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("SIGTERM stops the server even with a bad log sink")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

/// stderr is a FIFO that is open for reading but never read: once its buffer is full, the log
/// thread blocks, lines are dropped, and requests, runs and SIGTERM are unaffected.
#[tokio::test]
async fn a_log_reader_that_stops_reading_freezes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("log.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Read-write: the open does not wait for a reader, and this end never reads.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    serve_through_a_bad_sink(writer.into()).await;
    drop(held);
}

/// stderr is a pipe whose reader has gone (as `| head -c 300` after `head` exits): every
/// write fails with EPIPE; requests that log still get their answers.
#[tokio::test]
async fn a_broken_log_pipe_breaks_no_request() {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    serve_through_a_bad_sink(write).await;
}
