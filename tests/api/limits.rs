//! Concurrency limits, queueing, the queue bound and retention.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{base_config, spawn_app, spawn_app_with};

async fn statuses(app: &crate::helpers::TestApp, ids: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        out.push(app.get_run(id).await["status"].as_str().unwrap().to_owned());
    }
    out
}

/// Never more than max_concurrent runs are running; the rest queue and start in order.
#[tokio::test]
async fn global_limit() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            app.start("sleep", json!({"s": 30})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for id in &ids[..4] {
        app.wait_status(id, |s| s == "running", Duration::from_secs(10))
            .await;
    }
    // Give the queue a moment in which a fifth start would show.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = statuses(&app, &ids).await;
    assert_eq!(
        st,
        [
            "running", "running", "running", "running", "queued", "queued"
        ]
    );
    let running: Value = app.get_json("/runs?status=running").await;
    assert_eq!(running["runs"].as_array().unwrap().len(), 4);
    app.cancel_run(&ids[0]).await;
    app.wait_status(&ids[4], |s| s == "running", Duration::from_secs(5))
        .await;
    assert_eq!(statuses(&app, &ids[5..]).await, ["queued"]);
    for id in &ids {
        app.cancel_run(id).await;
    }
    app.stop().await;
}

/// A run held back by its module's limit does not block runs of other modules; FIFO within
/// the module.
#[tokio::test]
async fn per_module_limit_without_head_of_line_blocking() {
    let app = spawn_app().await;
    let a = app.start("limited", json!({"s": 30})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = app.start("limited", json!({"s": 0.1})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let c = app.start("limited", json!({"s": 0.1})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = app.start("lines", json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.wait_finished(&other).await["status"], "succeeded");
    assert_eq!(
        statuses(&app, &[a.clone(), b.clone(), c.clone()]).await,
        ["running", "queued", "queued"]
    );
    app.cancel_run(&a).await;
    let rb = app.wait_finished(&b).await;
    let rc = app.wait_finished(&c).await;
    assert!(
        rb["started_at"].as_str().unwrap() <= rc["started_at"].as_str().unwrap(),
        "FIFO"
    );
    assert!(
        rb["finished_at"].as_str().unwrap() <= rc["started_at"].as_str().unwrap(),
        "one at a time"
    );
    app.stop().await;
}

/// At max_queued queued runs, POST /runs answers 429 with Retry-After.
#[tokio::test]
async fn queue_full_is_429() {
    let toml = base_config("")
        .replace("max_concurrent = 4", "max_concurrent = 1")
        .replace("max_queued = 20", "max_queued = 2");
    let app = spawn_app_with(&toml).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            app.start("sleep", json!({})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let res = app.post_run(json!({"module_id": "lines"})).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    app.cancel_run(&ids[2]).await;
    let res = app.post_run(json!({"module_id": "lines"})).await;
    assert_eq!(
        res.status(),
        StatusCode::ACCEPTED,
        "room again after a cancel"
    );
    for id in &ids {
        app.cancel_run(id).await;
    }
    app.stop().await;
}

/// Only keep_runs finished runs are kept; the oldest finished go first, within seconds.
#[tokio::test]
async fn retention_evicts_oldest_finished() {
    let toml = base_config("").replace("keep_runs = 1000", "keep_runs = 3");
    let app = spawn_app_with(&toml).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let res = app
            .post_to("/runs?wait=10", json!({"module_id": "silent"}))
            .await;
        let run: Value = res.json().await.unwrap();
        ids.push(run["id"].as_str().unwrap().to_owned());
    }
    // Retention runs in the background, within seconds.
    let gone = |i: usize| {
        let url = app.url(&format!("/runs/{}", ids[i]));
        let c = app.client.clone();
        async move { c.get(url).send().await.unwrap().status() == StatusCode::NOT_FOUND }
    };
    let start = std::time::Instant::now();
    while !(gone(0).await && gone(1).await) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the oldest finished runs are purged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 2..5 {
        assert!(!gone(i).await, "run {i} is kept");
    }
    let list: Value = app.get_json("/runs").await;
    assert_eq!(list["runs"].as_array().unwrap().len(), 3);
    app.stop().await;
}
