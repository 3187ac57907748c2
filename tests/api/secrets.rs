//! Secrets: secret parameters (env, stdin), module values from the server's environment or a
//! file, secret fixed args. Their values reach the child and nowhere else: not argv in /proc,
//! the Run JSON, the log, a dry run, an error answer, the stored or streamed output.

use std::time::Duration;

use nix::sys::signal::Signal;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{base_config, read_sse, signal, start_server_with, write_config};

const PARAM_SECRET: &str = "p4ram-s3cret-value";
const STDIN_SECRET: &str = "st1n-s3cret-value";
const ENV_SECRET: &str = "fr0m-env-s3cret";
const FILE_SECRET: &str = "fr0m-file-s3cret";
const ARG_SECRET: &str = "f1xed-arg-s3cret";
const SPLIT_SECRET: &str = "spl1t-acr0ss-reads";

fn modules() -> String {
    format!(
        r#"
[[modules]]
id = "leaky"
name = "Prints its secrets"
command = ["sh", "-c", 'echo "token=$API_TOKEN"; read pw; echo "pw=$pw"; echo "env=$FROM_ENV file=$FROM_FILE arg=$1"; printf "split=spl1t-"; sleep 0.2; printf "acr0ss-reads\n"; [ "$API_TOKEN" = "$(cat expected.txt)" ] && echo token-ok; sleep "$PAUSE"', "leaky", {{ value = "{ARG_SECRET}", secret = true }}]
env = {{ FROM_ENV = {{ from_env = "MODRUN_TEST_SECRET" }}, FROM_FILE = {{ from_file = "key.txt" }} }}
[[modules.parameters]]
name = "token"
type = "string"
secret = true
env = "API_TOKEN"
[[modules.parameters]]
name = "password"
type = "string"
secret = true
stdin = true
[[modules.parameters]]
name = "split"
type = "string"
secret = true
env = "SPLIT"
default = "{SPLIT_SECRET}"
[[modules.parameters]]
name = "level"
type = "choice"
choices = ["low", "high"]
secret = true
env = "LEVEL"
[[modules.parameters]]
name = "pause"
type = "number"
default = 0
env = "PAUSE"
"#
    )
}

fn all_secrets() -> [&'static str; 6] {
    [
        PARAM_SECRET,
        STDIN_SECRET,
        ENV_SECRET,
        FILE_SECRET,
        ARG_SECRET,
        SPLIT_SECRET,
    ]
}

fn assert_clean(what: &str, text: &str) {
    for s in all_secrets() {
        assert!(!text.contains(s), "{what} shows a secret ({s}):\n{text}");
    }
}

/// Every place a run shows up, checked for every kind of secret; the child still gets them.
#[tokio::test]
async fn secrets_reach_the_child_and_nowhere_else() {
    let (dir, path) = write_config(&format!("{}{}", base_config(""), modules()));
    std::fs::write(dir.path().join("key.txt"), format!("{FILE_SECRET}\n")).unwrap();
    std::fs::write(dir.path().join("expected.txt"), PARAM_SECRET).unwrap();
    let mut server = start_server_with(
        &path,
        "127.0.0.1:0",
        &[("RUST_LOG", "debug"), ("MODRUN_TEST_SECRET", ENV_SECRET)],
    )
    .await;
    let c = Client::new();
    let body = json!({"module_id": "leaky", "parameters": {
        "token": PARAM_SECRET, "password": STDIN_SECRET, "pause": 1.5, "level": "high"}});

    // While it runs: the child's argv in /proc has no parameter secret.
    let started: Value = c
        .post(server.url("/runs"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["id"].as_str().unwrap().to_owned();
    assert_clean(
        "the created run",
        &started.to_string().replace(ARG_SECRET, ""),
    );
    assert_eq!(started["parameters"]["token"], "***");
    assert_eq!(started["parameters"]["password"], "***");
    assert_eq!(started["parameters"]["level"], "***");
    assert_eq!(started["parameters"]["pause"], 1.5);
    assert!(
        started["argv"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "***")
    );
    assert_clean("the created run", &started.to_string());
    let mut pid = None;
    let start = std::time::Instant::now();
    while pid.is_none() && start.elapsed() < Duration::from_secs(10) {
        let run: Value = c
            .get(server.url(&format!("/runs/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pid = run["pid"].as_u64();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = pid.expect("running");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    for s in [
        PARAM_SECRET,
        STDIN_SECRET,
        ENV_SECRET,
        FILE_SECRET,
        SPLIT_SECRET,
    ] {
        assert!(!cmdline.contains(s), "argv in /proc shows {s}");
    }

    // The stream, then the finished run, the output as JSON and as text.
    let stream = c
        .get(server.url(&format!("/runs/{id}/stream")))
        .send()
        .await
        .unwrap();
    let events = read_sse(stream, Duration::from_secs(30)).await;
    let lines: Vec<String> = events
        .iter()
        .filter(|e| e.event == "stdout")
        .map(|e| e.data["line"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        lines,
        [
            "token=***",
            "pw=***",
            "env=*** file=*** arg=***",
            "split=***",
            "token-ok",
        ],
        "the child got every value; the output shows none"
    );
    for e in &events {
        assert_clean("an SSE event", &e.data.to_string());
    }
    let run: Value = c
        .get(server.url(&format!("/runs/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_clean("the run", &run.to_string());
    let out = c
        .get(server.url(&format!("/runs/{id}/output")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_clean("the stored output", &out);
    let text = server.output_text(&id).await;
    assert_clean("the output as text", &text);
    assert!(text.contains("split=***"));

    // A dry run shows the command line with the secret fixed arg masked.
    let dry: Value = c
        .post(server.url("/runs?wait=10"))
        .json(&json!({"module_id": "leaky", "mode": "dry_run", "parameters": {"token": PARAM_SECRET}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dry_id = dry["id"].as_str().unwrap();
    let dry_out = c
        .get(server.url(&format!("/runs/{dry_id}/output")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(dry_out.contains("***"), "{dry_out}");
    assert_clean("a dry run", &dry_out);

    // An invalid value of a secret parameter is not echoed.
    let res = c
        .post(server.url("/runs"))
        .json(&json!({"module_id": "leaky", "parameters": {"level": PARAM_SECRET, "token": "a\u{0}b"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem = res.text().await.unwrap();
    assert_clean("an error answer", &problem);
    // The catalog marks secrets and never shows a secret default.
    let module: Value = c
        .get(server.url("/modules/leaky"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let split = &module["parameters"][2];
    assert_eq!(split["secret"], true);
    assert_eq!(split["default"], Value::Null);
    assert_clean("the catalog", &module.to_string());

    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = server.log.lock().unwrap().join("\n");
    assert!(log.contains("DEBUG"));
    assert_clean("the log", &log);
}

/// A queued run's secret parameters survive a restart (kept by the store while it is queued)
/// and reach the child when it starts after it.
#[tokio::test]
async fn a_queued_runs_secrets_survive_a_restart() {
    let toml = format!("{}{}", base_config(""), modules())
        .replace("max_concurrent = 4", "max_concurrent = 1");
    let (dir, path) = write_config(&toml);
    std::fs::write(dir.path().join("key.txt"), FILE_SECRET).unwrap();
    std::fs::write(dir.path().join("expected.txt"), PARAM_SECRET).unwrap();
    let env = [("RUST_LOG", "info"), ("MODRUN_TEST_SECRET", ENV_SECRET)];
    let mut server = start_server_with(&path, "127.0.0.1:0", &env).await;
    let c = Client::new();
    let blocker: Value = c
        .post(server.url("/runs"))
        .json(&json!({"module_id": "sleep", "parameters": {"s": 30}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(blocker["status"], "running");
    let queued: Value = c
        .post(server.url("/runs"))
        .json(&json!({"module_id": "leaky", "parameters": {"token": PARAM_SECRET, "password": STDIN_SECRET}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queued["status"], "queued");
    let id = queued["id"].as_str().unwrap().to_owned();
    signal(&server.child, Signal::SIGTERM);
    server.child.wait().await.unwrap();

    let mut again = start_server_with(&path, "127.0.0.1:0", &env).await;
    let start = std::time::Instant::now();
    let run = loop {
        let run: Value = c
            .get(again.url(&format!("/runs/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if run["status"] != "queued" && run["status"] != "running" {
            break run;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["parameters"]["token"], "***");
    let out = c
        .get(again.url(&format!("/runs/{id}/output")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        out.contains("token-ok"),
        "the child got the secret after the restart: {out}"
    );
    assert!(out.contains("pw=***"), "and its stdin: {out}");
    assert_clean("the output after a restart", &out);
    signal(&again.child, Signal::SIGTERM);
    again.child.wait().await.unwrap();
}
