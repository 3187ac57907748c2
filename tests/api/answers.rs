//! Answers for scripts: run and get the output in one request (`?wait` with `Accept:
//! text/plain`, or `?include=output`), one stream of the output, and readable run JSON.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{base_config, spawn_app_with};

/// `POST /runs?wait` with `Accept: text/plain`: the finished run's output text, in capture
/// order (or one stream of it), the run in the `Modrun-*` headers.
#[tokio::test]
async fn run_and_answer_with_the_output_text() {
    let app = spawn_app_with(&base_config("")).await;
    let post = |query: &'static str, module: &'static str| {
        app.client
            .post(app.url(&format!("/runs?{query}")))
            .header("accept", "text/plain")
            .json(&json!({"module_id": module}))
            .send()
    };
    let res = post("wait=30", "mixed").await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let h = res.headers().clone();
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert_eq!(h["modrun-status"], "failed");
    assert_eq!(h["modrun-exit-code"], "3");
    let id = h["modrun-run-id"].to_str().unwrap().to_owned();
    assert_eq!(h["location"], format!("/runs/{id}").as_str());
    assert_eq!(res.text().await.unwrap(), "out1\nerr1\nout2\nerr2\n");
    let res = post("wait=30&stream=stdout", "mixed").await.unwrap();
    assert_eq!(res.text().await.unwrap(), "out1\nout2\n");
    let res = post("wait=30&stream=stderr", "mixed").await.unwrap();
    assert_eq!(res.text().await.unwrap(), "err1\nerr2\n");

    // More output than a run keeps in memory (3 MB): every line, in order, from the store.
    let res = app
        .client
        .post(app.url("/runs?wait=60"))
        .header("accept", "text/plain")
        .json(&json!({"module_id": "big", "parameters": {"lines": 30000, "width": 99}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.unwrap();
    assert_eq!(text.len(), 30000 * 100);
    assert!(
        text.lines()
            .all(|l| l.len() == 99 && l.bytes().all(|b| b == b'0'))
    );

    // Not finished in time: 202, a line saying where to follow it.
    let res = post("wait=1", "sleep").await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(res.headers()["modrun-status"], "running");
    let id = res.headers()["modrun-run-id"].to_str().unwrap().to_owned();
    let text = res.text().await.unwrap();
    assert!(text.contains(&format!("/runs/{id}/stream")), "{text}");
    app.cancel_run(&id).await;

    // A bad stream is a problem+json 422, not text.
    let res = post("wait=1&stream=both", "mixed").await.unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    app.stop().await;
}

/// `?include=output` adds the first lines (at most 1,000) to the JSON run, and says whether
/// there are more.
#[tokio::test]
async fn include_output_adds_the_first_lines() {
    let app = spawn_app_with(&base_config("")).await;
    let run: Value = app
        .post_to(
            "/runs?wait=30&include=output",
            json!({"module_id": "lines", "parameters": {"n": 3}}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "succeeded");
    let texts: Vec<&str> = run["output"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["line 1", "line 2", "line 3"]);
    assert_eq!(run["output"]["truncated"], false);
    let big: Value = app
        .post_to(
            "/runs?wait=30&include=output",
            json!({"module_id": "lines", "parameters": {"n": 1500}}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(big["output"]["lines"].as_array().unwrap().len(), 1000);
    assert_eq!(big["output"]["lines"][999]["line"], "line 1000");
    assert_eq!(big["output"]["truncated"], true);
    let res = app
        .post_to("/runs?include=everything", json!({"module_id": "lines"}))
        .await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    app.stop().await;
}

/// `GET /runs/{id}/output?stream=` keeps one stream, in JSON pages (the cursor still moves
/// past the other's lines) and in the text.
#[tokio::test]
async fn output_of_one_stream() {
    let app = spawn_app_with(&base_config("")).await;
    let run = app.start("mixed", json!({})).await;
    let id = run["id"].as_str().unwrap();
    app.wait_finished(id).await;
    let page: Value = app
        .get_json(&format!("/runs/{id}/output?stream=stderr"))
        .await;
    let lines = page["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["stream"] == "stderr"));
    assert_eq!(page["next_after"], 4);
    assert_eq!(page["complete"], true);
    let page: Value = app
        .get_json(&format!("/runs/{id}/output?stream=stdout&limit=1"))
        .await;
    assert_eq!(page["lines"][0]["line"], "out1");
    let page: Value = app
        .get_json(&format!("/runs/{id}/output?stream=stdout&after=1&limit=1"))
        .await;
    assert!(page["lines"].as_array().unwrap().is_empty(), "{page}");
    assert_eq!(page["next_after"], 2);
    assert_eq!(page["complete"], false);
    let text = app
        .client
        .get(app.url(&format!("/runs/{id}/output?stream=stdout")))
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, "out1\nout2\n");
    let res = app.get(&format!("/runs/{id}/output?stream=all")).await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    app.stop().await;
}

/// A run's JSON starts with what people look for (id, module, status), and whole seconds are
/// written without a fraction.
#[tokio::test]
async fn run_json_reads_well() {
    let app = spawn_app_with(&base_config("")).await;
    let run = app.start("silent", json!({})).await;
    let id = run["id"].as_str().unwrap();
    app.wait_finished(id).await;
    let text = app.get(&format!("/runs/{id}")).await.text().await.unwrap();
    assert!(
        text.starts_with(&format!(
            r#"{{"id":"{id}","module_id":"silent","module_name":"No output","status":"succeeded","#
        )),
        "{text}"
    );
    assert!(text.contains(r#""timeout_s":60,"#), "{text}");
    app.stop().await;
}
