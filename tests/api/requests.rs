//! What a request can do to a child, tried as an attacker would: no value becomes an option,
//! no control character gets through, the kernel's limits are checked before anything is
//! spawned, only allowed run modes, and error answers stay small.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{base_config, spawn_app, spawn_app_with};

/// Modules for these tests.
const MODULES: &str = r#"
[[modules]]
id = "args"
name = "Prints its arguments"
command = ["sh", "-c", 'for a in "$@"; do echo "[$a]"; done', "args"]
[[modules.parameters]]
name = "word"
type = "string"
positional = true
[[modules.parameters]]
name = "flagged"
type = "string"
[[modules.parameters]]
name = "dashy"
type = "string"
positional = true
allow_leading_dash = true
[[modules.parameters]]
name = "text"
type = "string"
multiline = true
env = "TEXT"
[[modules.parameters]]
name = "n"
type = "integer"
positional = true

[[modules]]
id = "eoo"
name = "End of options"
end_of_options = true
command = ["sh", "-c", 'for a in "$@"; do echo "[$a]"; done', "eoo"]
[[modules.parameters]]
name = "dashy"
type = "string"
positional = true
allow_leading_dash = true
[[modules.parameters]]
name = "v"
type = "boolean"
arg = "-v"
"#;

async fn problem(res: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(res.status(), status);
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "problem+json"
    );
    res.json().await.unwrap()
}

fn field_messages(p: &Value) -> Vec<(String, String)> {
    p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["field"].as_str().unwrap().to_owned(),
                e["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn lines_of(app: &crate::helpers::TestApp, body: Value) -> Vec<String> {
    let res = app.post_to("/runs?wait=10", body).await;
    assert_eq!(res.status(), StatusCode::OK);
    let run: Value = res.json().await.unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    app.output(run["id"].as_str().unwrap())
        .await
        .iter()
        .map(|l| l["line"].as_str().unwrap().to_owned())
        .collect()
}

/// A string value that starts with `-` is refused (option or positional) unless the parameter
/// allows it; numbers keep their sign; `end_of_options` puts `--` before the positionals.
#[tokio::test]
async fn values_never_become_options() {
    let app = spawn_app_with(&format!("{}{MODULES}", base_config(""))).await;
    for (name, value) in [("word", "--shout"), ("flagged", "-x"), ("word", "-")] {
        let res = app
            .post_run(json!({"module_id": "args", "parameters": {name: value}}))
            .await;
        let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        let errors = field_messages(&p);
        assert_eq!(errors.len(), 1, "{p}");
        assert_eq!(errors[0].0, format!("parameters.{name}"));
        assert!(errors[0].1.contains("must not start with `-`"), "{p}");
    }
    // The greet module of the bundled config, as the security review tried it.
    let lines = lines_of(
        &app,
        json!({"module_id": "args", "parameters": {"dashy": "--help", "n": -5, "word": "a-b"}}),
    )
    .await;
    assert_eq!(lines, ["[a-b]", "[--help]", "[-5]"]);
    let lines = lines_of(
        &app,
        json!({"module_id": "eoo", "parameters": {"dashy": "-rf", "v": true}}),
    )
    .await;
    assert_eq!(lines, ["[-v]", "[--]", "[-rf]"]);
    app.stop().await;
}

/// NUL and other control characters are refused (tab always passes, line breaks only where
/// `multiline` is set); the error does not echo the raw value.
#[tokio::test]
async fn control_characters_are_refused() {
    let app = spawn_app_with(&format!("{}{MODULES}", base_config(""))).await;
    for (name, value, expect) in [
        ("word", "a\u{0}b", "NUL"),
        ("word", "forged\nINFO line", "single line"),
        ("word", "esc\u{1b}[31m", "control characters"),
        ("text", "nul\u{0}", "NUL"),
        ("text", "bell\u{7}", "control characters"),
    ] {
        let res = app
            .post_run(json!({"module_id": "args", "parameters": {name: value}}))
            .await;
        let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        let errors = field_messages(&p);
        assert!(errors[0].1.contains(expect), "{name}={value:?}: {p}");
        assert!(!p.to_string().contains("INFO line"), "{p}");
    }
    let res = app
        .post_to(
            "/runs?wait=10",
            json!({"module_id": "args", "parameters": {"word": "tab\there", "text": "two\nlines"}}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    app.stop().await;
}

/// One value over the kernel's limit for one argument, and argv + environment over the
/// system's limit, are 422 at validation, not a spawn failure.
#[tokio::test]
async fn kernel_limits_are_checked_before_spawning() {
    let big_env: String = (0..12)
        .map(|i| format!("BIG{i} = \"{}\"\n", "e".repeat(100_000)))
        .collect();
    let params: String = (0..8)
        .map(|i| {
            format!("[[modules.parameters]]\nname = \"p{i}\"\ntype = \"string\"\nenv = \"P{i}\"\n")
        })
        .collect();
    let toml = format!(
        "{}{MODULES}\n[[modules]]\nid = \"huge\"\ncommand = [\"true\"]\n[modules.env]\n{big_env}{params}",
        base_config("")
    );
    let app = spawn_app_with(&toml).await;

    let res = app
        .post_run(json!({"module_id": "args", "parameters": {"word": "w".repeat(131_072)}}))
        .await;
    let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(p["detail"].as_str().unwrap().contains("kernel"), "{p}");

    let values: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("p{i}"), json!("v".repeat(120_000))))
        .collect();
    let res = app
        .post_run(json!({"module_id": "huge", "parameters": values}))
        .await;
    let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(field_messages(&p)[0].0, "parameters");
    assert!(
        p["detail"].as_str().unwrap().contains("system's limit"),
        "{p}"
    );
    // Well within the limits, the same module runs.
    let res = app
        .post_to(
            "/runs?wait=10",
            json!({"module_id": "huge", "parameters": {"p0": "small"}}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let run: Value = res.json().await.unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    app.stop().await;
}

/// Only the modes in `runner.request_modes` may be asked for: `local` is refused by default.
#[tokio::test]
async fn run_modes_are_an_allow_list() {
    let app = spawn_app().await;
    let res = app
        .post_run(json!({"module_id": "silent", "mode": "local"}))
        .await;
    let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(
        p["detail"].as_str().unwrap().contains("may not be chosen"),
        "{p}"
    );
    for mode in ["auto", "async", "threaded", "dry_run"] {
        let res = app
            .post_run(json!({"module_id": "silent", "mode": mode}))
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED, "{mode}");
    }
    app.stop().await;

    let app = spawn_app_with(&base_config("request_modes = [\"local\"]")).await;
    let res = app
        .post_to(
            "/runs?wait=10",
            json!({"module_id": "silent", "mode": "local"}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = app
        .post_run(json!({"module_id": "silent", "mode": "async"}))
        .await;
    problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    app.stop().await;
}

/// `timeout_s` below 1 ms (5e-324 was accepted and timed out at once) is refused with a message
/// that says the bound.
#[tokio::test]
async fn timeout_has_a_floor() {
    let app = spawn_app().await;
    for t in [5e-324, 0.0001, -1.0, 0.0] {
        let res = app
            .post_run(json!({"module_id": "silent", "timeout_s": t}))
            .await;
        let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(
            p["detail"].as_str().unwrap().contains("at least 0.001"),
            "{t}: {p}"
        );
    }
    let res = app
        .post_run(json!({"module_id": "silent", "timeout_s": 0.001}))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    app.stop().await;
}

/// 50,000 unknown parameters in a 1 MiB body: the 422 lists 20 of them and says how many
/// more, with long names cut short: a few KiB, not megabytes.
#[tokio::test]
async fn error_answers_stay_small() {
    let app = spawn_app().await;
    let params: serde_json::Map<String, Value> =
        (0..50_000).map(|i| (format!("u{i}"), json!(1))).collect();
    let res = app
        .post_run(json!({"module_id": "echo", "parameters": params}))
        .await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = res.bytes().await.unwrap();
    assert!(body.len() < 8 * 1024, "{} bytes", body.len());
    let p: Value = serde_json::from_slice(&body).unwrap();
    let errors = p["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 21);
    assert!(
        errors[20]["message"]
            .as_str()
            .unwrap()
            .contains("49980 more"),
        "{p}"
    );

    let long = "n".repeat(10_000);
    let res = app
        .post_run(json!({"module_id": "echo", "parameters": {long.clone(): 1}}))
        .await;
    let body = res.bytes().await.unwrap();
    assert!(body.len() < 2 * 1024, "{} bytes", body.len());
    let res = app.post_run(json!({"module_id": long})).await;
    let body = res.bytes().await.unwrap();
    assert!(body.len() < 2 * 1024, "{} bytes", body.len());
    app.stop().await;
}

/// An over-long request target is 414 and over-large headers are 431, both problem+json.
#[tokio::test]
async fn oversized_request_heads_get_problem_answers() {
    let app = spawn_app().await;
    let long = format!("/runs?module_id={}", "m".repeat(9000));
    let res = app.get(&long).await;
    let p = problem(res, StatusCode::URI_TOO_LONG).await;
    assert_eq!(p["status"], 414);
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("x-big", "h".repeat(40_000))
        .send()
        .await
        .unwrap();
    let p = problem(res, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).await;
    assert_eq!(p["status"], 431);
    app.stop().await;
}
