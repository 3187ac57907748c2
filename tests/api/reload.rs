//! Changing the configuration of a running server: SIGHUP reloads, `MODRUN_<SECTION>__<KEY>`
//! overrides; and what a request passes on to its run (`traceparent`).

use std::time::Duration;

use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    Server, base_config, binary, signal, spawn_app_with, start_server_with, wait_until,
    write_config,
};

const BEFORE: &str = r#"
[runner]
max_concurrent = 4
kill_grace = "1s"

[[modules]]
id = "keep"
command = ["sh", "-c", "echo kept"]

[[modules]]
id = "going"
command = ["sh", "-c", "echo started; sleep 2; echo finished"]
"#;

const AFTER: &str = r#"
[runner]
max_concurrent = 4
kill_grace = "1s"

[[modules]]
id = "keep"
command = ["sh", "-c", "echo kept"]

[[modules]]
id = "added"
command = ["sh", "-c", "echo new"]
"#;

/// A run's end, polled.
/// Wait for a log line containing `what` (after `skip` lines) and return it.
async fn log_line(s: &Server, skip: usize, what: &str) -> String {
    let mut found = None;
    wait_until(Duration::from_secs(20), || {
        found = s
            .log
            .lock()
            .unwrap()
            .iter()
            .skip(skip)
            .find(|l| l.contains(what))
            .cloned();
        found.is_some()
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "no log line with `{what}`:\n{}",
            s.log.lock().unwrap().join("\n")
        )
    })
}

/// A valid new file: the new module runs at once, the removed one is 404 for new runs while
/// its running run finishes with its whole output, and the reload is logged and counted.
#[tokio::test]
async fn sighup_applies_a_valid_config() {
    let (_dir, path) = write_config(BEFORE);
    let server = start_server_with(&path, "127.0.0.1:0", &[("RUST_LOG", "info")]).await;
    let c = reqwest::Client::new();
    let going = server.post_run("going").await;
    assert_eq!(going.status(), StatusCode::ACCEPTED);
    let going: Value = going.json().await.unwrap();
    let going_id = going["id"].as_str().unwrap();
    assert_eq!(
        server.post_run("added").await.status(),
        StatusCode::NOT_FOUND
    );

    std::fs::write(&path, AFTER).unwrap();
    let seen = server.log.lock().unwrap().len();
    signal(&server.child, Signal::SIGHUP);
    let line = log_line(&server, seen, "configuration reloaded").await;
    assert!(line.contains("added=added"), "{line}");
    assert!(line.contains("removed=going"), "{line}");

    let added = server.post_run("added").await;
    assert_eq!(added.status(), StatusCode::ACCEPTED);
    let added: Value = added.json().await.unwrap();
    let run = server.wait_done(added["id"].as_str().unwrap()).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        server.post_run("going").await.status(),
        StatusCode::NOT_FOUND
    );
    let run = server.wait_done(going_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(server.output_text(going_id).await, "started\nfinished\n");
    let modules = server.get_json("/modules").await;
    let ids: Vec<&str> = modules["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["keep", "added"]);
    let metrics = c
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("modrun_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modrun_runs_finished_total{module=\"added\",status=\"succeeded\"} 1"),
        "the new module's series exist"
    );
}

/// An invalid new file changes nothing (the log says why, naming the key); a change of what
/// needs a restart is reported and ignored; SIGHUP never stops the server.
#[tokio::test]
async fn sighup_keeps_the_config_in_force_when_the_file_is_invalid() {
    let (_dir, path) = write_config(BEFORE);
    let server = start_server_with(&path, "127.0.0.1:0", &[("RUST_LOG", "info")]).await;
    let c = reqwest::Client::new();

    std::fs::write(&path, format!("{AFTER}\n[sse]\nkeep_alive = \"0s\"\n")).unwrap();
    let seen = server.log.lock().unwrap().len();
    signal(&server.child, Signal::SIGHUP);
    let line = log_line(&server, seen, "configuration reload failed").await;
    assert!(line.contains("sse.keep_alive"), "{line}");
    assert_eq!(
        server.post_run("going").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        server.post_run("added").await.status(),
        StatusCode::NOT_FOUND
    );

    let restart_only = BEFORE.replace("max_concurrent = 4", "max_concurrent = 9");
    std::fs::write(&path, restart_only).unwrap();
    let seen = server.log.lock().unwrap().len();
    signal(&server.child, Signal::SIGHUP);
    let line = log_line(&server, seen, "take effect only at the next start").await;
    assert!(line.contains("runner.max_concurrent"), "{line}");
    log_line(&server, seen, "configuration reloaded").await;
    let metrics = c
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("modrun_config_reloads_total{result=\"error\"} 1"));
    assert!(metrics.contains("modrun_config_reloads_total{result=\"ok\"} 1"));
    assert_eq!(
        c.get(server.url("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );
}

/// `MODRUN_<SECTION>__<KEY>` sets any key over the file: the store goes to an absolute folder
/// of the environment's choosing and the global limit comes from it too; a bad value stops
/// start-up with the variable named.
#[tokio::test]
async fn environment_overrides_the_file() {
    let (dir, path) = write_config(&base_config(""));
    let store = dir.path().join("elsewhere");
    let store_s = store.display().to_string();
    let server = start_server_with(
        &path,
        "127.0.0.1:0",
        &[
            ("RUST_LOG", "info"),
            ("MODRUN_STORAGE__PATH", &store_s),
            ("MODRUN_RUNNER__MAX_CONCURRENT", "1"),
        ],
    )
    .await;
    assert!(
        store.join("modrun.db").exists(),
        "the store is where the environment says"
    );
    let a = server.post_run("sleep").await;
    assert_eq!(a.status(), StatusCode::ACCEPTED);
    let b: Value = server.post_run("sleep").await.json().await.unwrap();
    // One slot: the second run waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = server
        .get_json(&format!("/runs/{}", b["id"].as_str().unwrap()))
        .await;
    assert_eq!(b["status"], "queued", "{b}");
    drop(server);

    let out = tokio::process::Command::new(binary())
        .args(["serve", "--bind", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env("MODRUN_RUNNER__MAX_CONCURRENT", "0")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("runner.max_concurrent (set by MODRUN_RUNNER__MAX_CONCURRENT)"),
        "{err}"
    );
    let out = tokio::process::Command::new(binary())
        .args(["check-config", "--config"])
        .arg(&path)
        .env("MODRUN_RUNNER__NO_SUCH_KEY", "1")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MODRUN_RUNNER__NO_SUCH_KEY"), "{err}");
}

/// A request's W3C `traceparent` reaches the run's environment as TRACEPARENT; a malformed
/// one is not passed on.
#[tokio::test]
async fn traceparent_reaches_the_child() {
    let toml = r#"
[[modules]]
id = "tp"
command = ["sh", "-c", 'echo "tp=$TRACEPARENT"']
"#;
    let app = spawn_app_with(toml).await;
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for (header, expect) in [
        (valid, format!("tp={valid}")),
        ("00-zzz-00f067aa0ba902b7-01", "tp=".to_owned()),
        (
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "tp=".to_owned(),
        ),
    ] {
        let res = app
            .client
            .post(app.url("/runs?wait=20"))
            .header("traceparent", header)
            .json(&json!({"module_id": "tp"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let run: Value = res.json().await.unwrap();
        let lines = app.output(run["id"].as_str().unwrap()).await;
        assert_eq!(lines[0]["line"], expect.as_str(), "{header}");
    }
    app.stop().await;
}
