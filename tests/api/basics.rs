//! Endpoints' happy paths and every error status of the API.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::spawn_app;

async fn problem(res: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(res.status(), status);
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "errors are problem+json"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].is_string() && body["title"].is_string() && body["detail"].is_string());
    body
}

/// Health and module catalog endpoints answer in config order without exposing commands.
#[tokio::test]
async fn health_and_modules() {
    let app = spawn_app().await;
    let h: Value = app.get_json("/healthz").await;
    assert_eq!(h, json!({"status": "ok", "store": "ok"}));

    let mods: Value = app.get_json("/modules").await;
    let list = mods["modules"].as_array().unwrap();
    assert_eq!(list[0]["id"], "echo");
    assert_eq!(list[1]["id"], "lines");
    assert!(list[0].get("command").is_none());

    let echo: Value = app.get_json("/modules/echo").await;
    assert_eq!(echo["timeout_s"], 60.0);
    assert_eq!(echo["max_concurrent"], Value::Null);
    let count = &echo["parameters"][0];
    assert_eq!(
        count,
        &json!({"name": "count", "type": "integer", "required": false, "default": 3, "min": 1,
                "max": 100, "choices": null, "pattern": null, "max_length": null, "multiline": false,
                "secret": false,
                "description": null})
    );
    assert_eq!(echo["parameters"][3]["choices"], json!(["red", "green"]));
    assert!(echo["parameters"][0].get("arg").is_none());

    let res = app.get("/modules/nope").await;
    problem(res, StatusCode::NOT_FOUND).await;
    // A path segment that is not UTF-8 is a parse error, in the same problem shape.
    for path in ["/modules/%FF", "/runs/%FF", "/runs/%FF/output"] {
        let res = app.get(path).await;
        problem(res, StatusCode::BAD_REQUEST).await;
    }
    let res = app.get("/no/such/route").await;
    problem(res, StatusCode::NOT_FOUND).await;
    let res = app.client.put(app.url("/runs")).send().await.unwrap();
    problem(res, StatusCode::METHOD_NOT_ALLOWED).await;
    app.stop().await;
}

/// A run is created at once with a Location, and records argv with options, positionals and
/// env parameters, defaults applied.
#[tokio::test]
async fn create_run_builds_argv_and_env() {
    let app = spawn_app().await;
    let res = app
        .post_run(json!({"module_id": "echo", "parameters":
            {"loud": true, "ratio": 2.5, "color": "red", "word": "hi there", "envp": "from env"}}))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let loc = res.headers()["location"].to_str().unwrap().to_owned();
    let run: Value = res.json().await.unwrap();
    let id = run["id"].as_str().unwrap();
    assert_eq!(loc, format!("/runs/{id}"));
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "7", "ids are UUID v7");
    assert_eq!(run["module_id"], "echo");
    assert_eq!(run["module_name"], "Echo");
    assert_eq!(run["mode"], "async", "auto reports the mode used");
    assert_eq!(run["timeout_s"], 60.0);
    assert_eq!(
        run["parameters"],
        json!({"count": 3, "ratio": 2.5, "loud": true, "color": "red", "word": "hi there", "envp": "from env"})
    );
    assert_eq!(
        run["argv"],
        json!([
            "sh",
            "-c",
            run["argv"][2],
            "echo",
            "--count",
            "3",
            "--ratio",
            "2.5",
            "--loud",
            "-c",
            "red",
            "hi there"
        ])
    );
    for key in [
        "created_at",
        "started_at",
        "finished_at",
        "exit_code",
        "signal",
        "pid",
        "error",
        "output_lines",
    ] {
        assert!(run.get(key).is_some(), "{key} is present");
    }
    let done = app.wait_finished(id).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["error"], Value::Null);
    assert!(done["finished_at"].is_string() && done["started_at"].is_string());
    assert!(done["pid"].as_u64().unwrap() > 1);
    let text: Vec<String> = app
        .output(id)
        .await
        .iter()
        .map(|l| l["line"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        text,
        [
            "--count",
            "3",
            "--ratio",
            "2.5",
            "--loud",
            "-c",
            "red",
            "hi there",
            "env=from env"
        ]
    );
    assert_eq!(done["output_lines"], 9);
    app.stop().await;
}

/// Every bad field is reported at once with a 422; unparseable requests are 400, 413, 415.
#[tokio::test]
async fn create_run_errors() {
    let app = spawn_app().await;
    let res = app
        .post_run(
            json!({"module_id": "echo", "mode": "fast", "timeout_s": 1000,
            "parameters": {"count": "3", "ratio": "x", "loud": "yes", "color": "blue",
                           "word": "UPPER", "bogus": 1}}),
        )
        .await;
    let body = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    let mut fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "mode",
            "parameters.bogus",
            "parameters.color",
            "parameters.count",
            "parameters.loud",
            "parameters.ratio",
            "parameters.word",
            "timeout_s"
        ]
    );

    for (body, field) in [
        (
            json!({"module_id": "echo", "parameters": {"count": 2.5}}),
            "parameters.count",
        ),
        (
            json!({"module_id": "echo", "parameters": {"count": 0}}),
            "parameters.count",
        ),
        (json!({"module_id": "big"}), "parameters.lines"),
        (json!({"parameters": {}}), "module_id"),
        (json!({"module_id": 5}), "module_id"),
        (json!({"module_id": "echo", "extra": true}), "extra"),
        (json!({"module_id": "echo", "stdin": 3}), "stdin"),
        (json!({"module_id": "echo", "timeout_s": -1}), "timeout_s"),
        (json!([1, 2]), "body"),
    ] {
        let res = app.post_run(body.clone()).await;
        let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(p["errors"][0]["field"], field, "{body}");
    }

    let res = app.post_run(json!({"module_id": "nope"})).await;
    problem(res, StatusCode::NOT_FOUND).await;

    let post = |body: &'static str, ctype: &'static str| {
        app.client
            .post(app.url("/runs"))
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    problem(
        post("{not json", "application/json").await.unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    problem(
        post("{}", "text/plain").await.unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    )
    .await;
    let huge = format!(
        "{{\"module_id\":\"echo\",\"stdin\":\"{}\"}}",
        "a".repeat(1024 * 1024 + 10)
    );
    let res = app
        .client
        .post(app.url("/runs"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::PAYLOAD_TOO_LARGE).await;

    let res = app
        .post_to("/runs?wait=abc", json!({"module_id": "echo"}))
        .await;
    problem(res, StatusCode::BAD_REQUEST).await;
    let res = app
        .post_to("/runs?wait=301", json!({"module_id": "echo"}))
        .await;
    problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    app.stop().await;
}

/// A request may lower the timeout but never raise it past the module's.
#[tokio::test]
async fn timeout_can_only_be_lowered() {
    let app = spawn_app().await;
    let res = app
        .post_run(json!({"module_id": "short", "timeout_s": 3}))
        .await;
    problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    let res = app
        .post_run(json!({"module_id": "short", "timeout_s": 0.3}))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let run: Value = res.json().await.unwrap();
    assert_eq!(run["timeout_s"], 0.3);
    let done = app.wait_finished(run["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "timed_out");
    assert!(
        done["error"].as_str().unwrap().contains("timed out"),
        "{done}"
    );
    app.stop().await;
}

/// GET /runs/{id}: 400 for a malformed id, 404 for an unknown one, on every /runs/{id} route.
#[tokio::test]
async fn run_ids_are_checked() {
    let app = spawn_app().await;
    let unknown = "01900000-0000-7000-8000-000000000000";
    for path in ["", "/output", "/stream"] {
        let res = app.get(&format!("/runs/not-a-uuid{path}")).await;
        problem(res, StatusCode::BAD_REQUEST).await;
        let res = app.get(&format!("/runs/{unknown}{path}")).await;
        problem(res, StatusCode::NOT_FOUND).await;
    }
    problem(app.cancel_run("zzz").await, StatusCode::BAD_REQUEST).await;
    problem(app.cancel_run(unknown).await, StatusCode::NOT_FOUND).await;
    app.stop().await;
}

/// `?wait` returns the finished run with 200, or 202 when the run outlasts the wait.
#[tokio::test]
async fn wait_holds_the_response() {
    let app = spawn_app().await;
    let res = app
        .post_to("/runs?wait=10", json!({"module_id": "lines"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().contains_key("location"));
    let run: Value = res.json().await.unwrap();
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["output_lines"], 3);

    let started = std::time::Instant::now();
    let res = app
        .post_to("/runs?wait=1", json!({"module_id": "sleep"}))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(started.elapsed() >= Duration::from_millis(900));
    let run: Value = res.json().await.unwrap();
    assert_eq!(run["status"], "running");
    app.cancel_run(run["id"].as_str().unwrap()).await;
    app.stop().await;
}

/// The same Idempotency-Key and body return the first run; a different body is 409.
#[tokio::test]
async fn idempotency_key() {
    let app = spawn_app().await;
    let post = |body: Value, key: &'static str| {
        app.client
            .post(app.url("/runs"))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let body = json!({"module_id": "lines", "parameters": {"n": 2}});
    let first = post(body.clone(), "k-1").await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    // Same JSON, keys in another order.
    let again = post(json!({"parameters": {"n": 2}, "module_id": "lines"}), "k-1")
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert!(again.headers().contains_key("location"));
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    let other = post(json!({"module_id": "lines", "parameters": {"n": 3}}), "k-1")
        .await
        .unwrap();
    problem(other, StatusCode::CONFLICT).await;
    let fresh = post(body, "k-2").await.unwrap();
    assert_eq!(fresh.status(), StatusCode::ACCEPTED);
    let list: Value = app.get_json("/runs").await;
    assert_eq!(list["runs"].as_array().unwrap().len(), 2);
    app.stop().await;
}

/// dry_run spawns nothing: pid null, one stdout line with the shell-quoted argv, exit 0.
#[tokio::test]
async fn dry_run() {
    let app = spawn_app().await;
    let res = app
        .post_run(json!({"module_id": "echo", "mode": "dry_run", "parameters": {"word": "a b"}}))
        .await;
    let run: Value = res.json().await.unwrap();
    assert_eq!(run["mode"], "dry_run");
    let done = app.wait_finished(run["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["pid"], Value::Null);
    let lines = app.output(run["id"].as_str().unwrap()).await;
    assert_eq!(lines.len(), 1);
    let line = lines[0]["line"].as_str().unwrap();
    assert!(line.starts_with("sh -c 'for a in"), "{line}");
    assert!(line.ends_with("echo --count 3 'a b'"), "{line}");
    app.stop().await;
}

/// stdin is fed to the child and closed.
#[tokio::test]
async fn stdin_is_fed() {
    let app = spawn_app().await;
    let res = app
        .post_run(json!({"module_id": "cat", "stdin": "one\ntwo\n"}))
        .await;
    let run: Value = res.json().await.unwrap();
    let id = run["id"].as_str().unwrap();
    assert_eq!(app.wait_finished(id).await["status"], "succeeded");
    let text: Vec<Value> = app
        .output(id)
        .await
        .iter()
        .map(|l| l["line"].clone())
        .collect();
    assert_eq!(text, [json!("one"), json!("two")]);
    // Without stdin, cat reads a null stdin and ends at once.
    let run = app.start("cat", json!({})).await;
    assert_eq!(
        app.wait_finished(run["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    app.stop().await;
}

/// Listing: newest first, filters combine, cursor pages, bad values are 400/422.
#[tokio::test]
async fn list_runs() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let module = if i % 2 == 0 { "lines" } else { "mixed" };
        let run = app.start(module, json!({})).await;
        ids.push(run["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        app.wait_finished(id).await;
    }
    let get = |q: &'static str| app.client.get(app.url(&format!("/runs{q}"))).send();
    let all: Value = get("").await.unwrap().json().await.unwrap();
    let listed: Vec<&str> = all["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    assert_eq!(all["next_cursor"], Value::Null);

    let p1: Value = get("?limit=2").await.unwrap().json().await.unwrap();
    assert_eq!(p1["runs"].as_array().unwrap().len(), 2);
    let cursor = p1["next_cursor"].as_str().unwrap().to_owned();
    let p2: Value = app
        .get_json(&format!("/runs?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(p2["runs"][0]["id"], ids[2].as_str());

    let failed: Value = get("?status=failed").await.unwrap().json().await.unwrap();
    assert!(
        failed["runs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["module_id"] == "mixed")
    );
    assert_eq!(failed["runs"].as_array().unwrap().len(), 2);
    let both: Value = get("?status=failed,succeeded&module_id=lines")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(both["runs"].as_array().unwrap().len(), 3);
    let none: Value = get("?status=running").await.unwrap().json().await.unwrap();
    assert!(none["runs"].as_array().unwrap().is_empty());

    problem(
        get("?limit=0").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    problem(
        get("?limit=1001").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    problem(get("?limit=ten").await.unwrap(), StatusCode::BAD_REQUEST).await;
    problem(
        get("?status=done").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    problem(get("?cursor=abc").await.unwrap(), StatusCode::BAD_REQUEST).await;
    app.stop().await;
}

/// A module's program that is gone, not executable, or a folder by the time a run starts (it
/// was fine at start-up) fails that run with a message that says which, naming the program as
/// the module declares it; the server goes on, and the next run of a program that is back
/// succeeds.
#[tokio::test]
async fn a_program_that_changed_after_start_up_fails_its_run_with_the_reason() {
    use std::os::unix::fs::PermissionsExt;
    let bin = tempfile::tempdir().unwrap();
    let prog = bin.path().join("prog.sh");
    let write_prog = || {
        std::fs::write(&prog, "#!/bin/sh\necho ok\n").unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_prog();
    let module = format!(
        "\n[[modules]]\nid = \"fragile\"\ncommand = [\"{}\"]\n",
        prog.display()
    );
    let app = crate::helpers::spawn_app_with(&(crate::helpers::base_config("") + &module)).await;
    let run = || async {
        let res = app
            .post_to("/runs?wait=20", json!({"module_id": "fragile"}))
            .await;
        assert_eq!(res.status(), StatusCode::OK);
        res.json::<Value>().await.unwrap()
    };

    std::fs::remove_file(&prog).unwrap();
    let gone = run().await;
    assert_eq!(gone["status"], "failed", "{gone}");
    assert_eq!(
        gone["error"], "cannot start `prog.sh`: no such file",
        "{gone}"
    );

    std::fs::write(&prog, "#!/bin/sh\necho ok\n").unwrap();
    let plain = run().await;
    assert_eq!(plain["status"], "failed", "{plain}");
    assert_eq!(
        plain["error"], "cannot start `prog.sh`: permission denied (the file is not executable)",
        "{plain}"
    );

    std::fs::remove_file(&prog).unwrap();
    std::fs::create_dir(&prog).unwrap();
    let folder = run().await;
    assert_eq!(
        folder["error"], "cannot start `prog.sh`: permission denied (it is a directory)",
        "{folder}"
    );

    std::fs::remove_dir(&prog).unwrap();
    write_prog();
    let back = run().await;
    assert_eq!(back["status"], "succeeded", "{back}");
}
