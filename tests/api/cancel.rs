//! Cancellation, timeouts, spawn failures, and what is left of a process group afterwards.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    base_config, group_members, spawn_app, spawn_app_with, wait_until, wait_until_output,
};

/// Cancelling a run whose child forked a grandchild stops the whole group, and repeating the
/// DELETE while it stops is 202 again; once finished it is 409.
#[tokio::test]
async fn cancel_running_run_kills_the_whole_group() {
    let app = spawn_app().await;
    let run = app.start("tree", json!({})).await;
    let id = run["id"].as_str().unwrap();
    let pgid = app.wait_pid(id).await;
    assert!(
        wait_until(Duration::from_secs(5), || group_members(pgid).len() >= 3).await,
        "sh, its background sleep and its foreground sleep are in the group"
    );
    let res = app.cancel_run(id).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(res.headers().contains_key("location"));
    let again = app.cancel_run(id).await;
    assert!(matches!(
        again.status(),
        StatusCode::ACCEPTED | StatusCode::CONFLICT
    ));
    let done = app.wait_finished(id).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["error"], "the run was cancelled by request");
    assert!(done["finished_at"].is_string());
    assert!(
        group_members(pgid).is_empty(),
        "no process of the group is left"
    );
    assert_eq!(app.cancel_run(id).await.status(), StatusCode::CONFLICT);
    app.stop().await;
}

/// A child that handles SIGTERM exits on it; its exit code is kept and the status is
/// cancelled.
#[tokio::test]
async fn cancel_sends_sigterm_first() {
    let app = spawn_app().await;
    let run = app.start("graceful", json!({})).await;
    let id = run["id"].as_str().unwrap();
    app.wait_status(id, |s| s == "running", Duration::from_secs(5))
        .await;
    // Let the shell install its trap and print.
    assert!(wait_until_output(&app, id, 1).await);
    app.cancel_run(id).await;
    let done = app.wait_finished(id).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["exit_code"], 7);
    let lines: Vec<Value> = app
        .output(id)
        .await
        .iter()
        .map(|l| l["line"].clone())
        .collect();
    assert!(lines.contains(&json!("got-term")), "{lines:?}");
    app.stop().await;
}

/// A child that ignores SIGTERM gets SIGKILL after kill_grace (1 s in the test config).
#[tokio::test]
async fn sigkill_after_grace() {
    let app = spawn_app().await;
    let run = app.start("stubborn", json!({})).await;
    let id = run["id"].as_str().unwrap();
    let pgid = app.wait_pid(id).await;
    assert!(wait_until_output(&app, id, 1).await);
    let t = Instant::now();
    let answer: Value = app.cancel_run(id).await.json().await.unwrap();
    // The answer shows the cancel under way.
    assert_eq!(answer["status"], "running");
    let asked = answer["cancel_requested_at"]
        .as_str()
        .expect("a time")
        .to_owned();
    let mid = app.get_run(id).await;
    assert_eq!(
        mid["status"], "running",
        "still stopping during the grace period"
    );
    assert_eq!(mid["cancel_requested_at"], asked.as_str());
    // A second request does not move the time of the first.
    app.cancel_run(id).await;
    assert_eq!(app.get_run(id).await["cancel_requested_at"], asked.as_str());
    let done = app.wait_finished(id).await;
    assert_eq!(
        done["cancel_requested_at"],
        asked.as_str(),
        "kept after the end"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "waited for the grace period"
    );
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["signal"], 9);
    assert_eq!(done["exit_code"], Value::Null);
    assert!(group_members(pgid).is_empty());
    app.stop().await;
}

/// A queued run is cancelled at once and never starts.
#[tokio::test]
async fn cancel_queued_run() {
    let app =
        spawn_app_with(&base_config("").replace("max_concurrent = 4", "max_concurrent = 1")).await;
    let blocker = app.start("sleep", json!({})).await;
    let queued = app.start("lines", json!({})).await;
    let qid = queued["id"].as_str().unwrap();
    assert_eq!(queued["status"], "queued");
    let res = app.cancel_run(qid).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let run: Value = res.json().await.unwrap();
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["started_at"], Value::Null);
    assert_eq!(run["pid"], Value::Null);
    assert_eq!(run["cancel_requested_at"], Value::Null, "it ended at once");
    assert!(run["finished_at"].is_string());
    assert_eq!(run["error"], "the run was cancelled before it started");
    let events = app.stream_run(qid, None).await;
    assert_eq!(events.last().unwrap().event, "end");
    app.cancel_run(blocker["id"].as_str().unwrap()).await;
    app.wait_finished(blocker["id"].as_str().unwrap()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        app.get_run(qid).await["status"],
        "cancelled",
        "never started later"
    );
    app.stop().await;
}

/// On timeout the same TERM -> grace -> KILL path runs and the status is timed_out.
#[tokio::test]
async fn timeout_stops_the_group() {
    let app = spawn_app().await;
    let res = app
        .post_run(json!({"module_id": "tree", "timeout_s": 0.5}))
        .await;
    let run: Value = res.json().await.unwrap();
    let id = run["id"].as_str().unwrap();
    let pgid = app.wait_pid(id).await;
    let done = app.wait_finished(id).await;
    assert_eq!(done["status"], "timed_out");
    assert_eq!(done["signal"], 15);
    assert!(group_members(pgid).is_empty());
    app.stop().await;
}

/// A missing program or a non-executable file makes the run failed with a clear error, which
/// is also its one stderr line, and which names no server path nor the server's PATH.
#[tokio::test]
async fn spawn_failures_are_outcomes() {
    let app = spawn_app().await;
    for (module, needle) in [
        (
            "missing",
            "cannot start `no-such-program-modrun-test`: not found on the module's PATH",
        ),
        ("noexec", "cannot start `./noexec.sh`: permission denied"),
    ] {
        let res = app
            .post_to("/runs?wait=5", json!({"module_id": module}))
            .await;
        assert_eq!(res.status(), StatusCode::OK);
        let run: Value = res.json().await.unwrap();
        assert_eq!(run["status"], "failed");
        assert_eq!(run["exit_code"], Value::Null);
        assert_eq!(run["pid"], Value::Null);
        let error = run["error"].as_str().unwrap();
        assert!(error.contains(needle), "{error}");
        assert!(!error.contains("/usr/bin"), "no PATH: {error}");
        assert!(!error.contains("/tmp"), "no server path: {error}");
        let lines = app.output(run["id"].as_str().unwrap()).await;
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["stream"], "stderr");
        assert_eq!(lines[0]["line"], error);
    }
    app.stop().await;
}

/// A child killed by a signal modrun did not send is failed, with the signal and no code.
#[tokio::test]
async fn foreign_signal_is_a_failure() {
    let app = spawn_app().await;
    let run = app.start("sleep", json!({})).await;
    let id = run["id"].as_str().unwrap();
    let pgid = app.wait_pid(id).await as i32;
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let done = app.wait_finished(id).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["signal"], 9);
    assert_eq!(done["exit_code"], Value::Null);
    assert!(done["error"].as_str().unwrap().contains("SIGKILL"));
    app.stop().await;
}
