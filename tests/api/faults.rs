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

/// A tmpfs of its own (root only), unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl Tmpfs {
    fn new(size_mib: u64) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { _dir: dir, mnt })
    }

    fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.mnt).unwrap();
        s.blocks_available() as u64 * s.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

/// The store on a disk that fills up: POST is 503 with a plain reason and readiness says why,
/// health and reads keep answering, the run that hit the full disk is seen to end; when space
/// comes back modrun resumes by itself, and the run's status and output (contiguous seqs, a
/// marker for what could not be held) are written and survive a restart.
#[tokio::test]
async fn a_full_disk_is_an_outage_not_a_crash() {
    let Some(disk) = Tmpfs::new(32) else {
        eprintln!("skipped: a tmpfs needs root");
        return;
    };
    let store = disk.mnt.join("store");
    let toml = base_config("").replace(
        "[retention]",
        &format!(
            "[storage]\npath = {:?}\n[retention]",
            store.display().to_string()
        ),
    );
    let (_dir, path) = write_config(&toml);
    let mut server = crate::helpers::start_server_at(&path).await;
    let c = Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let res = c
        .post(server.url("/runs?wait=10"))
        .json(&json!({"module_id": "silent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let filler = disk.mnt.join("filler");
    std::fs::write(&filler, vec![0u8; (disk.free() - (1 << 20)) as usize]).unwrap();

    let big: serde_json::Value = c
        .post(server.url("/runs"))
        .json(&json!({"module_id": "big", "parameters": {"lines": 150_000, "width": 80}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = big["id"]
        .as_str()
        .expect("created before the disk was full")
        .to_owned();

    // While the disk is full.
    let start = Instant::now();
    let refused = loop {
        let res = c
            .post(server.url("/runs"))
            .json(&json!({"module_id": "silent"}))
            .send()
            .await
            .unwrap();
        if res.status() == StatusCode::SERVICE_UNAVAILABLE {
            break res;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(refused.headers().contains_key("retry-after"));
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(
        problem["detail"],
        "the run store cannot write: disk full; try again later"
    );
    // Readiness is what the last write found (a write may pass now and then while SQLite
    // frees a page): it says 503 while the disk stays full.
    let start = Instant::now();
    let ready = loop {
        let ready = c.get(server.url("/readyz")).send().await.unwrap();
        if ready.status() == StatusCode::SERVICE_UNAVAILABLE {
            break ready;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never unready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let why: serde_json::Value = ready.json().await.unwrap();
    assert!(
        why["detail"].as_str().unwrap().contains("disk full"),
        "{why}"
    );
    assert_eq!(
        c.get(server.url("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        c.get(server.url("/runs")).send().await.unwrap().status(),
        StatusCode::OK,
        "reads keep working"
    );
    let start = Instant::now();
    loop {
        let run: serde_json::Value = c
            .get(server.url(&format!("/runs/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if run["status"] != "running" && run["status"] != "queued" {
            assert_eq!(run["status"], "succeeded", "{run}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the run stays running after its process ended: {run}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Space comes back: no restart needed.
    std::fs::remove_file(&filler).unwrap();
    let start = Instant::now();
    while c.get(server.url("/readyz")).send().await.unwrap().status() != StatusCode::OK {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never ready again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let res = c
        .post(server.url("/runs?wait=10"))
        .json(&json!({"module_id": "silent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let check_output = |base: String| {
        let c = c.clone();
        let id = id.clone();
        async move {
            let mut after = 0u64;
            let mut last = String::new();
            loop {
                let page: serde_json::Value = c
                    .get(format!("{base}/runs/{id}/output?after={after}&limit=10000"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let lines = page["lines"].as_array().unwrap();
                if lines.is_empty() {
                    break;
                }
                for l in lines {
                    assert_eq!(l["seq"].as_u64().unwrap(), after + 1, "contiguous seqs");
                    after += 1;
                    last = l["line"].as_str().unwrap().to_owned();
                }
            }
            (after, last)
        }
    };
    let (lines, last) = check_output(server.base.clone()).await;
    assert!(lines > 100_000, "{lines} lines kept");
    assert!(last.contains("could not be written"), "the marker: {last}");

    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();
    let mut again = crate::helpers::start_server_at(&path).await;
    let run: serde_json::Value = c
        .get(again.url(&format!("/runs/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "succeeded", "written, not lost: {run}");
    assert_eq!(check_output(again.base.clone()).await.0, lines);
    signal(&again.child, Signal::SIGTERM);
    again.child.wait().await.unwrap();
}

/// POST /runs until it is refused with 503; returns the problem's detail.
async fn refused_with(c: &Client, base: &str) -> String {
    let start = Instant::now();
    loop {
        let res = c
            .post(format!("{base}/runs"))
            .json(&json!({"module_id": "silent"}))
            .send()
            .await
            .unwrap();
        if res.status() == StatusCode::SERVICE_UNAVAILABLE {
            let p: serde_json::Value = res.json().await.unwrap();
            return p["detail"].as_str().unwrap().to_owned();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Until `/readyz` is 200 again (and a run goes through).
async fn recovers(c: &Client, base: &str) {
    let start = Instant::now();
    loop {
        let ready = c
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status();
        if ready == StatusCode::OK {
            let res = c
                .post(format!("{base}/runs?wait=10"))
                .json(&json!({"module_id": "silent"}))
                .send()
                .await
                .unwrap();
            if res.status() == StatusCode::OK {
                return;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The same path for a database locked by another process (SQLITE_BUSY), and a read-only
/// remount where one can be made: 503 with the reason while it lasts, back by itself after.
#[tokio::test]
async fn a_read_only_or_locked_store_is_an_outage_too() {
    let Some(disk) = Tmpfs::new(32) else {
        eprintln!("skipped: a tmpfs needs root");
        return;
    };
    let store = disk.mnt.join("store");
    let toml = base_config("").replace(
        "[retention]",
        &format!(
            "[storage]\npath = {:?}\n[retention]",
            store.display().to_string()
        ),
    );
    let (_dir, path) = write_config(&toml);
    let mut server = crate::helpers::start_server_at(&path).await;
    let c = Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    recovers(&c, &server.base).await;

    // A read-only remount of a file system with files open for writing is refused by the kernel
    // ("busy"); only the kernel itself does it (errors=remount-ro). Its SQLite codes are
    // classified like the others (a unit test in store::sqlite).
    let remounted = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&disk.mnt)
        .status()
        .is_ok_and(|s| s.success());
    if remounted {
        let why = refused_with(&c, &server.base).await;
        assert!(
            why.contains("read-only") || why.contains("I/O error"),
            "{why}"
        );
        let _ = std::process::Command::new("mount")
            .args(["-o", "remount,rw"])
            .arg(&disk.mnt)
            .status();
        recovers(&c, &server.base).await;
    } else {
        eprintln!("read-only remount skipped: the kernel refuses it while the store is open");
    }

    // Another process holds the database's write lock for a while.
    let db = store.join("modrun.db");
    let mut locker = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3, time; c = sqlite3.connect({:?}, isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(8)",
            db.display().to_string()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncBufReadExt;
        let mut out = tokio::io::BufReader::new(locker.stdout.take().unwrap()).lines();
        assert_eq!(out.next_line().await.unwrap().as_deref(), Some("locked"));
    }
    let why = refused_with(&c, &server.base).await;
    assert!(why.contains("busy"), "{why}");
    locker.wait().await.unwrap();
    recovers(&c, &server.base).await;

    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();
}
