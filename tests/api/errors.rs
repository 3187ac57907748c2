//! Server-side failures through the router (`oneshot`, no socket): a 500 tells the client the
//! request id and nothing else; a store that cannot write is a 503 with a plain reason.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use modrun::api::{AppState, router};
use modrun::config::Config;
use modrun::output::OutputLimits;
use modrun::registry::Registry;
use modrun::runner::{ModuleRunner, RunnerSettings};
use modrun::store::{Outage, StoreError};
use serde_json::Value;
use tower::ServiceExt;

use crate::faulty::FaultyStore;
use crate::helpers::{base_config, write_config};

fn app_over(store: Arc<FaultyStore>) -> (axum::Router, tempfile::TempDir) {
    let (dir, path) = write_config(&base_config(""));
    let config = Config::load(&path).unwrap();
    let registry = Arc::new(Registry::new(store, OutputLimits::default()));
    let runner = ModuleRunner::with_registry(RunnerSettings::default(), registry);
    let state = AppState::new(Arc::new(config), runner, Arc::new(Vec::new()));
    (router(state), dir)
}

async fn call(
    app: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, headers, serde_json::from_slice(&body).unwrap())
}

/// An internal failure is a 500 whose body says "internal error" with the request id (the same
/// as the `x-request-id` header), never the internal text.
#[tokio::test]
async fn a_500_carries_the_request_id_and_no_internal_text() {
    let store = FaultyStore::new();
    let (app, _dir) = app_over(store.clone());
    store.fail_reads(Some(StoreError::Backend(
        "corrupt page in /var/lib/modrun/secret.db".into(),
    )));
    let req = Request::get("/runs/01900000-0000-7000-8000-000000000000")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers["content-type"], "application/problem+json");
    let id = headers["x-request-id"].to_str().unwrap();
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("internal error"), "{detail}");
    assert!(detail.contains(id), "{detail} names {id}");
    assert!(!body.to_string().contains("secret.db"), "{body}");
    assert!(!body.to_string().contains("corrupt"), "{body}");

    // A client's own request id is kept when it is a plain token, replaced otherwise.
    let req = Request::get("/runs")
        .header("x-request-id", "client-42")
        .body(Body::empty())
        .unwrap();
    let (_, headers, body) = call(&app, req).await;
    assert_eq!(headers["x-request-id"], "client-42");
    assert!(body["detail"].as_str().unwrap().contains("client-42"));
    let req = Request::get("/runs")
        .header("x-request-id", "a b\"c")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = call(&app, req).await;
    assert_ne!(headers["x-request-id"], "a b\"c");
}

/// A store that cannot write (a full disk) is a 503 with Retry-After and a plain reason for
/// `POST /runs`, while reads keep working.
#[tokio::test]
async fn a_store_that_cannot_write_is_a_503() {
    let store = FaultyStore::new();
    let (app, _dir) = app_over(store.clone());
    store.fail_writes(Some(StoreError::Unavailable(
        Outage::DiskFull,
        "database or disk is full".into(),
    )));
    let req = Request::post("/runs")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"module_id":"silent"}"#))
        .unwrap();
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        body["detail"],
        "the run store cannot write: disk full; try again later"
    );
    let req = Request::get("/runs").body(Body::empty()).unwrap();
    let (status, _, _) = call(&app, req).await;
    assert_eq!(status, StatusCode::OK);
}

/// Through the library runner over a store that stops taking writes: a run whose process ends
/// during the outage is seen to end at once, its end and its output are written once the store
/// is back (no restart), and a queued run does not start while its start cannot be recorded.
#[tokio::test]
async fn an_outage_holds_a_runs_end_until_the_store_is_back() {
    use modrun::run::RunStatus;
    use modrun::runner::RunRequest;
    use modrun::store::RunStore;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    let store = FaultyStore::new();
    let registry = Arc::new(Registry::new(store.clone(), OutputLimits::default()));
    let stop = CancellationToken::new();
    let flusher = tokio::spawn(registry.clone().flush_loop(stop.clone()));
    let runner = ModuleRunner::with_registry(
        RunnerSettings {
            max_concurrent: std::num::NonZeroUsize::new(1).unwrap(),
            ..RunnerSettings::default()
        },
        registry.clone(),
    );
    let first = runner
        .submit(RunRequest::new(
            "a",
            ["sh", "-c", "echo one; sleep 0.5; echo two"],
        ))
        .await
        .unwrap()
        .into_handle();
    let second = runner
        .submit(RunRequest::new("b", ["sh", "-c", "echo started"]))
        .await
        .unwrap()
        .into_handle();
    store.fail_writes(Some(StoreError::Unavailable(
        Outage::DiskFull,
        "database or disk is full".into(),
    )));
    let ended = tokio::time::timeout(Duration::from_secs(10), first.wait())
        .await
        .expect("seen to end during the outage")
        .unwrap();
    assert_eq!(ended.status(), RunStatus::Succeeded);
    let stored = store.get(first.id()).await.unwrap().unwrap();
    assert_eq!(stored.status(), RunStatus::Running, "not written yet");
    assert_eq!(registry.health().outage(), Some(Outage::DiskFull));
    // The queued run waits for its start to be recorded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(second.run().await.unwrap().status(), RunStatus::Queued);

    store.fail_writes(None);
    let start = std::time::Instant::now();
    loop {
        let stored = store.get(first.id()).await.unwrap().unwrap();
        if stored.status() == RunStatus::Succeeded {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = store.read_output(first.id(), 0, 10).await.unwrap();
    let texts: Vec<&str> = lines.iter().map(|l| &*l.text).collect();
    assert_eq!(texts, ["one", "two"]);
    let second_run = tokio::time::timeout(Duration::from_secs(10), second.wait())
        .await
        .expect("the queued run starts once the store is back")
        .unwrap();
    assert_eq!(second_run.status(), RunStatus::Succeeded);
    assert_eq!(registry.health().outage(), None);
    assert_eq!(registry.pending_ends(), 0);
    stop.cancel();
    flusher.await.unwrap();
}

/// A run's end that the store refuses (its record changed meanwhile) still leaves the run's
/// last lines in the store: only the state is not written.
#[tokio::test]
async fn a_refused_end_keeps_the_runs_last_lines() {
    use modrun::run::RunStatus;
    use modrun::runner::RunRequest;
    use modrun::store::RunStore;
    use std::time::Duration;

    let store = FaultyStore::new();
    store.refuse_ends(true);
    let registry = Arc::new(Registry::new(store.clone(), OutputLimits::default()));
    let runner = ModuleRunner::with_registry(RunnerSettings::default(), registry);
    let handle = runner
        .submit(RunRequest::new("a", ["sh", "-c", "echo one; echo two"]))
        .await
        .unwrap()
        .into_handle();
    let ended = tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("seen to end")
        .unwrap();
    assert_eq!(ended.status(), RunStatus::Succeeded);
    let stored = store.get(handle.id()).await.unwrap().unwrap();
    assert_eq!(stored.status(), RunStatus::Running, "the end was refused");
    let lines = store.read_output(handle.id(), 0, 10).await.unwrap();
    let texts: Vec<&str> = lines.iter().map(|l| &*l.text).collect();
    assert_eq!(texts, ["one", "two"]);
}
