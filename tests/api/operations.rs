//! Operating modrun: `modrun check-config`, and what `serve` says at start-up about modules
//! that cannot run.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::helpers::{base_config, binary, start_server_with, wait_until, write_config};

/// `modrun check-config --config PATH`: (exit code, stdout, stderr).
async fn check_config(path: &std::path::Path) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary())
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A config whose every program can start: exit 0, a line per module with the program it
/// found, and a summary.
#[tokio::test]
async fn check_config_passes_a_good_config() {
    let toml = r#"
[[modules]]
id = "shell"
command = ["sh", "-c", "echo hi"]
timeout = "30s"
max_concurrent = 2
[[modules.parameters]]
name = "n"
type = "integer"

[[modules]]
id = "script"
command = ["./run.sh"]
"#;
    let (dir, path) = write_config(toml);
    let script = dir.path().join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho ok\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, out, err) = check_config(&path).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("ok    shell "), "{out}");
    assert!(
        lines[0].contains("/sh (1 parameter, timeout 30s, max_concurrent 2)"),
        "{out}"
    );
    assert!(lines[1].starts_with("ok    script"), "{out}");
    assert!(lines[1].contains(&script.display().to_string()), "{out}");
    assert!(
        lines[2].contains("2 modules, 0 with a program that cannot be started"),
        "{out}"
    );
}

/// A missing program and a file without an execute bit: exit 2, each module named with why;
/// the modules that are fine are still listed.
#[tokio::test]
async fn check_config_names_modules_that_cannot_start() {
    let (_dir, path) = write_config(&base_config(""));
    let (code, out, _) = check_config(&path).await;
    assert_eq!(code, 2, "{out}");
    let line = |id: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id))
            .unwrap_or_else(|| panic!("no line for {id}: {out}"))
            .to_owned()
    };
    let missing = line("missing");
    assert!(missing.starts_with("FAIL"), "{missing}");
    assert!(missing.contains("no-such-program-modrun-test"), "{missing}");
    assert!(missing.contains("not found on PATH"), "{missing}");
    let noexec = line("noexec");
    assert!(noexec.starts_with("FAIL"), "{noexec}");
    assert!(noexec.contains("permission denied"), "{noexec}");
    assert!(line("echo").starts_with("ok"), "{out}");
    assert!(
        out.contains("with a program that cannot be started") && out.contains(", 2 with"),
        "{out}"
    );
}

/// A config `serve` would refuse is refused the same way: exit 2 and the dotted key.
#[tokio::test]
async fn check_config_refuses_what_serve_refuses() {
    let (_dir, path) = write_config(
        "[runner]\nmax_concurent = 3\n[[modules]]\nid = \"a\"\ncommand = [\"true\"]\n",
    );
    let (code, out, err) = check_config(&path).await;
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("runner.max_concurent"), "{err}");

    let (_dir, path) = write_config(
        "[[modules]]\nid = \"a\"\ncommand = [\"true\"]\nenv = { K = { from_env = \"MODRUN_TEST_UNSET_VAR\" } }\n",
    );
    let (code, _, err) = check_config(&path).await;
    assert_eq!(code, 2);
    assert!(err.contains("MODRUN_TEST_UNSET_VAR"), "{err}");

    let missing = std::path::Path::new("/nonexistent/modrun.toml");
    let (code, _, err) = check_config(missing).await;
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/modrun.toml"), "{err}");
}

/// `serve` starts with a module whose program is missing, and says so in a warning that names
/// the module.
#[tokio::test]
async fn serve_warns_about_a_missing_program() {
    let (_dir, path) = write_config(&base_config(""));
    let server = start_server_with(&path, "127.0.0.1:0", &[]).await;
    let warned = |id: &'static str| {
        let log = server.log.clone();
        move || {
            log.lock().unwrap().iter().any(|l| {
                l.contains("WARN")
                    && l.contains(&format!("module={id}"))
                    && l.contains("cannot be started")
            })
        }
    };
    assert!(
        wait_until(Duration::from_secs(5), warned("missing")).await,
        "{:?}",
        server.log.lock().unwrap()
    );
    assert!(wait_until(Duration::from_secs(5), warned("noexec")).await);
    assert!(!warned("echo")());
}

/// `MODRUN_LOG_FORMAT=json` (or `[log] format = "json"`): every line is one JSON object; a
/// run's lines carry its id (in the span list); a client's text stays inside its field.
#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let (_dir, path) = write_config(&base_config(""));
    let server = start_server_with(
        &path,
        "127.0.0.1:0",
        &[("MODRUN_LOG_FORMAT", "json"), ("RUST_LOG", "debug")],
    )
    .await;
    let client = reqwest::Client::new();
    // A path that tries to end the line and forge an entry of its own.
    let forged = "/nope%0A%7B%22level%22%3A%22ERROR%22%2C%22forged%22%3Atrue%7D";
    let res = client.get(server.url(forged)).send().await.unwrap();
    assert_eq!(res.status(), reqwest::StatusCode::NOT_FOUND);
    let run: serde_json::Value = client
        .post(server.url("/runs?wait=10"))
        .header("x-request-id", "req-42")
        .json(&serde_json::json!({"module_id": "silent"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = run["id"].as_str().expect("a run").to_owned();
    let log = server.log.clone();
    let finished = {
        let id = id.clone();
        move || {
            // The request's own line comes when its answer is ready, after the run's end.
            let log = log.lock().unwrap();
            log.iter()
                .any(|l| l.contains("run finished") && l.contains(&id))
                && log.iter().any(|l| {
                    l.contains(r#""message":"request""#)
                        && l.contains(r#""method":"POST""#)
                        && l.contains("req-42")
                })
        }
    };
    assert!(
        wait_until(Duration::from_secs(5), finished).await,
        "{:?}",
        server.log.lock().unwrap()
    );
    let lines = server.log.lock().unwrap().clone();
    assert!(lines.len() > 3);
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        assert!(v.get("forged").is_none(), "a forged entry: {line}");
    }
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        parsed
            .iter()
            .find(|v| pred(v))
            .unwrap_or_else(|| panic!("no such line in {lines:#?}"))
            .clone()
    };
    // The run's lines: in its span, its id and the id of the request that made it.
    let span_has = |v: &serde_json::Value, key: &str, want: &str| {
        v["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s[key] == want))
    };
    let started = find(&|v| v["fields"]["message"] == "run started");
    assert!(started["fields"]["pid"].as_u64().is_some(), "{started}");
    assert!(span_has(&started, "run_id", &id), "{started}");
    assert!(span_has(&started, "request_id", "req-42"), "{started}");
    let end = find(&|v| v["fields"]["message"] == "run finished");
    assert_eq!(end["fields"]["status"], "succeeded", "{end}");
    assert_eq!(end["fields"]["exit_code"], 0, "{end}");
    assert!(end["fields"]["duration_ms"].as_f64().is_some(), "{end}");
    assert!(span_has(&end, "request_id", "req-42"), "{end}");
    // One line per request: the route template, never the raw path.
    let post = find(&|v| v["fields"]["message"] == "request" && v["fields"]["method"] == "POST");
    assert_eq!(post["level"], "INFO");
    assert_eq!(post["target"], "modrun::http");
    assert_eq!(post["fields"]["route"], "/runs", "{post}");
    assert_eq!(post["fields"]["status"], 200, "{post}");
    assert_eq!(post["fields"]["request_id"], "req-42", "{post}");
    assert_eq!(post["fields"]["token"], "-", "{post}");
    assert!(post["fields"]["duration_ms"].as_f64().is_some(), "{post}");
    let not_found = find(&|v| v["fields"]["message"] == "request" && v["fields"]["status"] == 404);
    assert_eq!(not_found["fields"]["route"], "-", "{not_found}");

    // A format modrun does not know is refused, naming where it came from.
    let (_dir, path) = write_config("[log]\nformat = \"xml\"\n");
    let (code, _, err) = check_config(&path).await;
    assert_eq!(code, 2);
    assert!(err.contains("log.format"), "{err}");
    let out = tokio::process::Command::new(binary())
        .args(["check-config", "--config"])
        .arg(write_config("").1)
        .env("MODRUN_LOG_FORMAT", "yaml")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MODRUN_LOG_FORMAT"));
}
