//! Completion callbacks, received by a real HTTP server in the test: signed as Standard
//! Webhooks says (checked here with our own HMAC, not modrun's), retried after failures with
//! one stable id, kept across a restart of modrun, never sent outside the allow-list, never
//! redirected.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::helpers::{signal, spawn_app_with, start_server_at, wait_until, write_config};

pub const KEY_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const KEY_B: &str = "whsec_c2Vjb25kLWtleS1mb3Itcm90YXRpb24tMDEyMzQ1Njc4OQ==";

/// What the receiver got.
#[derive(Debug, Clone)]
pub struct Got {
    pub path: String,
    pub id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
}

/// The receiver: records every request; answers with the next queued status (then 200).
#[derive(Clone, Default)]
pub struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    answers: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
    fn on(&self, path: &str) -> Vec<Got> {
        self.got().into_iter().filter(|g| g.path == path).collect()
    }
}

async fn receive(
    State(r): State<Receiver>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    r.got.lock().unwrap().push(Got {
        path: uri.path().to_owned(),
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: body.to_vec(),
    });
    if uri.path().ends_with("/redirect") {
        return (StatusCode::FOUND, [("location", "/allowed/target")]).into_response();
    }
    let status = r.answers.lock().unwrap().pop_front().unwrap_or(200);
    StatusCode::from_u16(status).unwrap().into_response()
}

/// Serve the receiver on `listener` until the task is dropped (aborted).
fn serve(listener: tokio::net::TcpListener, r: Receiver) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new()
        .fallback(axum::routing::post(receive))
        .with_state(r);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// A receiver on a free port: it, its base URL, its task.
pub async fn receiver() -> (Receiver, String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let r = Receiver::default();
    let task = serve(listener, r.clone());
    (r, base, task)
}

/// Whether `got` carries a valid signature by `key` (`whsec_...`), by the specification.
pub fn signed_by(got: &Got, key: &str) -> bool {
    let secret = B64.decode(key.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&secret).unwrap();
    mac.update(format!("{}.{}.", got.id, got.timestamp).as_bytes());
    mac.update(&got.body);
    let expected = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
    got.signature.split(' ').any(|s| s == expected)
}

fn config(hook: &str, allow: &str, extra: &str) -> String {
    format!(
        r#"
[runner]
kill_grace = "1s"
[callbacks]
secrets = ["{KEY_A}", {{ value = "{KEY_B}" }}]
allow_urls = [{allow}]
timeout = "2s"
retry_for = "1h"
{extra}
[[modules]]
id = "hooked"
command = ["sh", "-c", "echo done"]
callbacks = ["{hook}"]

[[modules]]
id = "plain"
command = ["sh", "-c", "echo plain"]
"#
    )
}

/// A module's callback: a signed POST of the finished run, by both keys of a rotation; after
/// two 500s it is retried with the same webhook-id until a 200; the run shows the delivery;
/// the metrics count the attempts.
#[tokio::test]
async fn callbacks_are_signed_and_retried_with_one_id() {
    let (rx, base, _task) = receiver().await;
    rx.answers.lock().unwrap().extend([500, 503]);
    let app = spawn_app_with(&config(&format!("{base}/hook"), "", "")).await;
    let run = app.start("hooked", json!({})).await;
    let id = run["id"].as_str().unwrap().to_owned();
    assert!(
        wait_until(Duration::from_secs(30), || rx.on("/hook").len() >= 3).await,
        "got {:?}",
        rx.got()
    );
    let got = rx.on("/hook");
    let hex = id.replace('-', "");
    for g in &got {
        assert_eq!(g.id, format!("msg_{hex}_1"), "one id for every attempt");
        assert!(signed_by(g, KEY_A), "signed by the first key");
        assert!(signed_by(g, KEY_B), "signed by the second key");
        assert!(!signed_by(
            g,
            "whsec_b3RoZXIta2V5LW5vdC11c2VkLWZvci1zaWduaW5nLTAw"
        ));
        let ts: u64 = g.timestamp.parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(ts.abs_diff(now) < 120);
        let body: Value = serde_json::from_slice(&g.body).unwrap();
        assert_eq!(body["id"], id.as_str());
        assert_eq!(body["status"], "succeeded");
    }
    let shown = app
        .wait_run(&id, |r| r["callbacks"][0]["state"] == "delivered")
        .await;
    let cb = &shown["callbacks"][0];
    assert_eq!(cb["state"], "delivered", "{shown}");
    assert_eq!(cb["attempts"], 3);
    assert_eq!(cb["last_status"], 200);
    // Only the host is shown: a URL's path may be its secret.
    assert_eq!(cb["url"], format!("{base}/…"));
    assert_eq!(cb["webhook_id"], format!("msg_{hex}_1"));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"modrun_callbacks_total{result="retry"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"modrun_callbacks_total{result="delivered"} 1"#));
    // A module without callbacks sends nothing, and its run shows none.
    let plain = app.start("plain", json!({})).await;
    let plain = app.wait_finished(plain["id"].as_str().unwrap()).await;
    assert!(plain.get("callbacks").is_none(), "{plain}");
    app.stop().await;
}

/// A request names callbacks only under an allowed prefix (422 naming the field otherwise,
/// and nothing is sent there); a redirect is not followed.
#[tokio::test]
async fn request_callbacks_need_the_allow_list_and_redirects_are_not_followed() {
    let (rx, base, _task) = receiver().await;
    let allow = format!("\"{base}/allowed/\"");
    let app = spawn_app_with(&config(&format!("{base}/hook"), &allow, "")).await;
    for bad in [
        format!("{base}/other"),
        format!("{base}/allowed"),
        "file:///etc/passwd".to_owned(),
    ] {
        let res = app
            .post_run(json!({"module_id": "plain", "callbacks": [bad]}))
            .await;
        assert_eq!(res.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], "callbacks[0]", "{problem}");
    }
    let res = app
        .post_run(json!({"module_id": "plain", "callbacks": [
            format!("{base}/allowed/x"), format!("{base}/allowed/redirect")]}))
        .await;
    assert_eq!(res.status(), reqwest::StatusCode::ACCEPTED);
    let run: Value = res.json().await.unwrap();
    let id = run["id"].as_str().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            rx.on("/allowed/x").len() == 1 && !rx.on("/allowed/redirect").is_empty()
        })
        .await,
        "{:?}",
        rx.got()
    );
    let shown = app
        .wait_run(id, |r| r["callbacks"][1]["attempts"].as_u64() >= Some(1))
        .await;
    assert_eq!(shown["callbacks"][0]["state"], "delivered", "{shown}");
    let redirected = &shown["callbacks"][1];
    assert_eq!(redirected["state"], "pending", "{shown}");
    assert_eq!(redirected["last_status"], 302);
    assert!(
        redirected["last_error"]
            .as_str()
            .unwrap()
            .contains("redirects are not followed")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.on("/allowed/target").is_empty(),
        "a redirect was followed"
    );
    assert!(rx.on("/other").is_empty());
    app.stop().await;
}

/// A delivery that could not be made before modrun stopped is made after it starts again
/// (SQLite store), with the same id.
#[tokio::test]
async fn a_pending_callback_survives_a_restart() {
    // The receiver's port is held for the whole test (a port given up and bound again later
    // could be taken by another test's server meanwhile): it refuses with 503 until modrun
    // has stopped, then takes deliveries.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let refusing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rx = Receiver::default();
    let gate = refusing.clone();
    let app = axum::Router::new()
        .fallback(axum::routing::post(
            move |state: State<Receiver>, uri: Uri, headers: HeaderMap, body: Bytes| async move {
                if gate.load(std::sync::atomic::Ordering::SeqCst) {
                    return (StatusCode::SERVICE_UNAVAILABLE, "not yet").into_response();
                }
                receive(state, uri, headers, body).await
            },
        ))
        .with_state(rx.clone());
    let _task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let hook = format!("http://127.0.0.1:{port}/hook");
    let (_dir, path) = write_config(&config(&hook, "", ""));
    let server = start_server_at(&path).await;
    let run: Value = server.post_run("hooked").await.json().await.unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    let shown = server
        .wait_run(&id, |r| r["callbacks"][0]["attempts"].as_u64() >= Some(1))
        .await;
    let cb = &shown["callbacks"][0];
    assert_eq!(cb["state"], "pending", "{shown}");
    assert_eq!(cb["last_status"], 503, "{shown}");
    assert!(rx.on("/hook").is_empty());
    // The URL's path (where receivers keep their tokens) is in neither the record nor the log.
    assert!(!shown.to_string().contains("/hook"), "{shown}");
    assert!(
        !server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("/hook")),
        "a callback URL's path in the log"
    );
    signal(&server.child, Signal::SIGTERM);
    let mut child = server.child;
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();

    refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    let server = start_server_at(&path).await;
    assert!(
        wait_until(Duration::from_secs(30), || !rx.on("/hook").is_empty()).await,
        "not delivered after the restart"
    );
    let got = rx.on("/hook");
    assert_eq!(got[0].id, format!("msg_{}_1", id.replace('-', "")));
    assert!(signed_by(&got[0], KEY_A));
    drop(server);
}
