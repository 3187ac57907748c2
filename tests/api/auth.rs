//! API tokens through the real binary: who may do what, what each token sees, and that tokens
//! never reach the log.

use std::time::Duration;

use nix::sys::signal::Signal;
use reqwest::{Client, RequestBuilder, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{base_config, binary, signal, start_server_with, write_config};

/// `modrun token new` with these arguments: (the token, the config entry it printed).
async fn new_token(args: &[&str]) -> (String, String) {
    let out = tokio::process::Command::new(binary())
        .args(["token", "new"])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text.lines().next().unwrap().to_owned();
    assert!(
        token.starts_with("mrt_") && token.len() >= 4 + 32,
        "{token}"
    );
    let entry = text
        .lines()
        .skip_while(|l| !l.starts_with("[[auth.tokens]]"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !entry.contains(&token),
        "the entry holds the hash, never the token"
    );
    (token, entry)
}

fn as_token(req: RequestBuilder, token: &str) -> RequestBuilder {
    req.header("Authorization", format!("Bearer {token}"))
}

async fn problem_status(req: RequestBuilder) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let res = req.send().await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

/// Every scope boundary: no token or an unknown one is 401 with a Bearer challenge, a token
/// without the scope is 403, a module or run outside a token's patterns is 404 and absent from
/// lists; created_by and cancelled_by name the tokens; `/healthz` stays open; no token and no
/// Authorization header ever reaches the log, even at debug.
#[tokio::test]
async fn scopes_and_module_patterns_are_enforced() {
    let (admin, admin_entry) = new_token(&["--name", "admin"]).await;
    let (ci, ci_entry) = new_token(&["--name", "ci", "--module", "echo", "--module", "l*"]).await;
    let (reader, reader_entry) = new_token(&[
        "--name",
        "reader",
        "--scope",
        "runs:read",
        "--scope",
        "modules:read",
    ])
    .await;
    let toml = format!(
        "{}\n{admin_entry}\n{ci_entry}\n{reader_entry}\n",
        base_config("")
    );
    let (_dir, path) = write_config(&toml);
    let mut server = start_server_with(&path, "127.0.0.1:0", &[("RUST_LOG", "debug")]).await;
    let c = Client::new();
    let url = |p: &str| server.url(p);

    // Open: the health check.
    assert_eq!(
        c.get(url("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );

    // No token, or one that is not configured: 401 with a challenge, on every protected route.
    let some_run = "/runs/01900000-0000-7000-8000-000000000000";
    for (method, path) in [
        ("GET", "/modules"),
        ("GET", "/modules/echo"),
        ("POST", "/runs"),
        ("GET", "/runs"),
        ("GET", some_run),
        ("DELETE", some_run),
    ] {
        let req = || c.request(method.parse().unwrap(), url(path));
        let (status, body, headers) = problem_status(req()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(body["status"], 401);
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let (status, _, headers) = problem_status(as_token(req(), "mrt_nope")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );
        let (status, _, _) =
            problem_status(req().header("Authorization", format!("Basic {admin}"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "not a Bearer token");
    }

    // A token without the scope: 403.
    let (status, body, _) =
        problem_status(as_token(c.post(url("/runs")), &reader).json(&json!({"module_id": "echo"})))
            .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("runs:create"));
    let (status, _, _) = problem_status(as_token(c.delete(url(some_run)), &reader)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A token sees only its modules.
    let mods: Value = as_token(c.get(url("/modules")), &ci)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = mods["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["echo", "lines", "limited", "longline"]);
    for path in ["/modules/silent", "/modules/sleep"] {
        let (status, _, _) = problem_status(as_token(c.get(url(path)), &ci)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _, _) =
        problem_status(as_token(c.post(url("/runs")), &ci).json(&json!({"module_id": "silent"})))
            .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a module it may not see does not exist for it"
    );

    // Runs: created_by; another token's run of a hidden module is 404 and absent from lists.
    let mine: Value = as_token(c.post(url("/runs?wait=10")), &ci)
        .json(&json!({"module_id": "echo", "parameters": {"word": "hi"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(mine["created_by"], "ci");
    let hidden: Value = as_token(c.post(url("/runs")), &admin)
        .json(&json!({"module_id": "sleep"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hidden["created_by"], "admin");
    let hidden_id = hidden["id"].as_str().unwrap();
    for path in [
        format!("/runs/{hidden_id}"),
        format!("/runs/{hidden_id}/output"),
        format!("/runs/{hidden_id}/stream"),
    ] {
        let (status, _, _) = problem_status(as_token(c.get(url(&path)), &ci)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _, _) =
        problem_status(as_token(c.delete(url(&format!("/runs/{hidden_id}"))), &ci)).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "cannot cancel what it cannot see"
    );
    let list: Value = as_token(c.get(url("/runs")), &ci)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [mine["id"].as_str().unwrap()]);
    let all: Value = as_token(c.get(url("/runs")), &reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        all["runs"].as_array().unwrap().len(),
        2,
        "reader sees every module"
    );

    // cancelled_by names the token that cancelled.
    let res = as_token(c.delete(url(&format!("/runs/{hidden_id}"))), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let start = std::time::Instant::now();
    let run = loop {
        let run: Value = as_token(c.get(url(&format!("/runs/{hidden_id}"))), &admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if run["status"] == "cancelled" {
            break run;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{run}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(run["cancelled_by"], "admin");
    assert_eq!(mine["cancelled_by"], Value::Null);

    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = server.log.lock().unwrap().join("\n");
    assert!(log.contains("DEBUG"), "the log ran at debug");
    for secret in [&admin, &ci, &reader] {
        assert!(!log.contains(secret.as_str()), "a token reached the log");
        assert!(
            !log.contains(&secret[4..20]),
            "part of a token reached the log"
        );
    }
    let header_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Bearer mrt") || l.contains("Basic mrt"))
        .collect();
    assert!(
        header_lines.is_empty(),
        "the header reached the log: {header_lines:?}"
    );
}

/// With no token configured, modrun refuses to listen beyond loopback (and says how to add a
/// token) unless `allow_anonymous` says the network is trusted; tokens can come from a file.
#[tokio::test]
async fn exposure_needs_a_token_or_an_explicit_opt_in() {
    let (_dir, path) = write_config(&base_config(""));
    let out = tokio::process::Command::new(binary())
        .args(["serve", "--bind", "0.0.0.0:0", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("modrun token new"), "{err}");

    let toml = format!("[auth]\nallow_anonymous = true\n{}", base_config(""));
    let (_dir, path) = write_config(&toml);
    let mut open = start_server_with(&path, "0.0.0.0:0", &[("RUST_LOG", "info")]).await;
    let res = Client::new()
        .get(open.url("/modules"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    signal(&open.child, Signal::SIGTERM);
    open.child.wait().await.unwrap();

    // Tokens from a mounted file (a container's secret), on a non-loopback address.
    let (token, entry) = new_token(&["--name", "from-file"]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    std::fs::write(&file, entry.replace("[[auth.tokens]]", "[[tokens]]")).unwrap();
    let toml = format!("[auth]\ntokens_file = {:?}\n{}", file, base_config(""));
    let (_dir, path) = write_config(&toml);
    let mut guarded = start_server_with(&path, "0.0.0.0:0", &[("RUST_LOG", "info")]).await;
    let c = Client::new();
    assert_eq!(
        c.get(guarded.url("/modules"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let res = as_token(c.post(guarded.url("/runs?wait=10")), &token)
        .json(&json!({"module_id": "silent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let run: Value = res.json().await.unwrap();
    assert_eq!(run["created_by"], "from-file");
    signal(&guarded.child, Signal::SIGTERM);
    guarded.child.wait().await.unwrap();
}
