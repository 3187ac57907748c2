//! Output capture, the output endpoint and Server-Sent Events.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{SseEvent, read_sse, spawn_app};

fn line_events(events: &[SseEvent]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .filter(|e| e.event == "stdout" || e.event == "stderr")
        .map(|e| {
            assert_eq!(e.id.as_deref(), Some(e.data["seq"].to_string().as_str()));
            assert_eq!(e.event, e.data["stream"]);
            (
                e.data["seq"].as_u64().unwrap(),
                e.event.clone(),
                e.data["line"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A late subscriber gets a status event, the whole replay and `end`; stdout and stderr keep
/// their captured order with one contiguous seq.
#[tokio::test]
async fn late_subscriber_gets_everything_in_order() {
    let app = spawn_app().await;
    let run = app.start("mixed", json!({})).await;
    let id = run["id"].as_str().unwrap();
    app.wait_finished(id).await;
    let events = app.stream_run(id, None).await;
    assert_eq!(events.first().unwrap().event, "status");
    assert!(
        events.first().unwrap().id.is_none(),
        "status events carry no id"
    );
    let end = events.last().unwrap();
    assert_eq!(end.event, "end");
    assert!(end.id.is_none());
    assert_eq!(end.data["status"], "failed");
    assert_eq!(end.data["exit_code"], 3);
    assert_eq!(end.data["error"], "the process exited with code 3");
    assert_eq!(
        line_events(&events),
        [
            (1, "stdout".into(), "out1".into()),
            (2, "stderr".into(), "err1".into()),
            (3, "stdout".into(), "out2".into()),
            (4, "stderr".into(), "err2".into()),
        ]
    );
    app.stop().await;
}

/// Last-Event-ID (or ?after) resumes right after that seq: no gap, no duplicate; past the end
/// it gives no lines, then `end`.
#[tokio::test]
async fn resume_with_last_event_id() {
    let app = spawn_app().await;
    let run = app.start("lines", json!({"n": 10})).await;
    let id = run["id"].as_str().unwrap();
    app.wait_finished(id).await;
    let resumed = line_events(&app.stream_run(id, Some(7)).await);
    assert_eq!(resumed.iter().map(|l| l.0).collect::<Vec<_>>(), [8, 9, 10]);
    let past = app.stream_run(id, Some(50)).await;
    assert!(line_events(&past).is_empty());
    assert_eq!(past.last().unwrap().event, "end");
    let res = app.get(&format!("/runs/{id}/stream?after=9")).await;
    let via_query = line_events(&read_sse(res, Duration::from_secs(10)).await);
    assert_eq!(via_query.iter().map(|l| l.0).collect::<Vec<_>>(), [10]);
    let res = app
        .client
        .get(app.url(&format!("/runs/{id}/stream")))
        .header("Last-Event-ID", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}

/// Two subscribers attached while the run is live receive identical sequences, with status
/// changes, and the stream stays open until the run ends.
#[tokio::test]
async fn concurrent_subscribers_see_the_same_lines() {
    let app = spawn_app().await;
    let res = app
        .post_run(json!({"module_id": "big", "parameters": {"lines": 20000, "width": 50}}))
        .await;
    let run: Value = res.json().await.unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    let (a, b) = tokio::join!(app.stream_run(&id, None), app.stream_run(&id, None));
    let (la, lb) = (line_events(&a), line_events(&b));
    assert_eq!(la.len(), 20000);
    assert_eq!(la, lb);
    assert!(la.iter().enumerate().all(|(i, l)| l.0 == i as u64 + 1));
    assert_eq!(a.last().unwrap().data["status"], "succeeded");
    app.stop().await;
}

/// A live subscriber sees status changes and lines as they happen, and `end` even when a run
/// prints nothing.
#[tokio::test]
async fn live_stream_and_silent_run() {
    let app = spawn_app().await;
    let run = app.start("sleep", json!({"s": 0.5})).await;
    let events = app.stream_run(run["id"].as_str().unwrap(), None).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"status"));
    assert_eq!(kinds.last(), Some(&"end"));
    let lines: Vec<String> = line_events(&events).into_iter().map(|l| l.2).collect();
    assert_eq!(lines, ["started", "slept"]);

    let run = app.start("silent", json!({})).await;
    let events = app.stream_run(run["id"].as_str().unwrap(), None).await;
    assert!(line_events(&events).is_empty());
    assert_eq!(events.last().unwrap().event, "end");
    assert_eq!(events.last().unwrap().data["status"], "succeeded");
    app.stop().await;
}

/// Invalid UTF-8 is replaced, a final line without a newline is kept, a 1 MB line is split
/// into max_line_bytes pieces, and nothing fails the run.
#[tokio::test]
async fn bytes_are_never_fatal() {
    let app = spawn_app().await;
    let run = app.start("bytes", json!({})).await;
    let id = run["id"].as_str().unwrap();
    assert_eq!(app.wait_finished(id).await["status"], "succeeded");
    let lines: Vec<String> = app
        .output(id)
        .await
        .iter()
        .map(|l| l["line"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(lines, ["ok \u{fffd}\u{fffd} end", "no newline at end"]);
    // The bytes themselves are kept: base64 beside the text in JSON and SSE, as they are in
    // the text download.
    let raw = B64.encode(b"ok \xff\xfe end");
    let out = app.output(id).await;
    assert_eq!(out[0]["bytes"], raw.as_str());
    assert!(out[1].get("bytes").is_none(), "{}", out[1]);
    let events = app.stream_run(id, None).await;
    let events: Vec<&SseEvent> = events.iter().filter(|e| e.event == "stdout").collect();
    assert_eq!(events[0].data["bytes"], raw.as_str());
    assert!(events[1].data.get("bytes").is_none());
    let text = app
        .client
        .get(app.url(&format!("/runs/{id}/output")))
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&text[..], b"ok \xff\xfe end\nno newline at end\n");

    let run = app.start("longline", json!({})).await;
    let id = run["id"].as_str().unwrap();
    assert_eq!(app.wait_finished(id).await["status"], "succeeded");
    let lines = app.output(id).await;
    assert_eq!(lines.len(), 16 + 1, "1 MiB in 64 KiB pieces, then `after`");
    assert!(
        lines[..16]
            .iter()
            .all(|l| l["line"].as_str().unwrap().len() == 65536)
    );
    assert_eq!(lines[16]["line"], "after");
    app.stop().await;
}

/// The output endpoint pages with after/limit, says when it is complete, and downloads text.
#[tokio::test]
async fn output_endpoint() {
    let app = spawn_app().await;
    let run = app.start("lines", json!({"n": 25})).await;
    let id = run["id"].as_str().unwrap();
    app.wait_finished(id).await;
    let page = |q: String| {
        let url = app.url(&format!("/runs/{id}/output{q}"));
        let c = app.client.clone();
        async move { c.get(url).send().await.unwrap() }
    };
    let p: Value = page("?after=20&limit=3".into()).await.json().await.unwrap();
    assert_eq!(p["next_after"], 23);
    assert_eq!(p["complete"], false);
    assert_eq!(p["lines"][0]["seq"], 21);
    assert_eq!(p["lines"][0]["stream"], "stdout");
    assert_eq!(p["lines"][0]["line"], "line 21");
    assert!(p["lines"][0]["ts"].as_str().unwrap().ends_with('Z'));
    let p: Value = page("?after=23".into()).await.json().await.unwrap();
    assert_eq!(p["next_after"], 25);
    assert_eq!(p["complete"], true);
    let p: Value = page("?after=99".into()).await.json().await.unwrap();
    assert_eq!(p["next_after"], 99);
    assert_eq!(p["lines"], json!([]));
    assert_eq!(
        page("?limit=0".into()).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        page("?limit=10001".into()).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        page("?after=-1".into()).await.status(),
        StatusCode::BAD_REQUEST
    );

    let text = app
        .client
        .get(app.url(&format!("/runs/{id}/output?after=22")))
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap();
    assert!(
        text.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(text.text().await.unwrap(), "line 23\nline 24\nline 25\n");

    let running = app.start("sleep", json!({})).await;
    let rid = running["id"].as_str().unwrap();
    app.wait_status(rid, |s| s == "running", Duration::from_secs(5))
        .await;
    let p: Value = app.get_json(&format!("/runs/{rid}/output")).await;
    assert_eq!(p["complete"], false, "a running run is never complete");
    app.cancel_run(rid).await;
    app.stop().await;
}

/// A keep-alive comment is sent while a stream is quiet.
#[tokio::test]
async fn keep_alive_comments() {
    let app = spawn_app().await;
    let run = app.start("sleep", json!({"s": 30})).await;
    let id = run["id"].as_str().unwrap();
    let mut res = app.get(&format!("/runs/{id}/stream")).await;
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !seen.contains(": keep-alive") && std::time::Instant::now() < deadline {
        if let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(3), res.chunk()).await
        {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(seen.contains(": keep-alive"), "{seen}");
    app.cancel_run(id).await;
    app.stop().await;
}

/// A slow subscriber neither slows the run nor loses lines: the run finishes while the reader
/// has not read anything, and the reader then gets every line.
#[tokio::test]
async fn slow_subscriber_loses_nothing() {
    let app = spawn_app().await;
    let res = app
        .post_run(json!({"module_id": "big", "parameters": {"lines": 200000, "width": 100}}))
        .await;
    let run: Value = res.json().await.unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    let res = app.get(&format!("/runs/{id}/stream")).await;
    // Do not read until the run is over.
    let done = app.wait_finished(&id).await;
    assert_eq!(done["status"], "succeeded");
    let lines = line_events(&read_sse(res, Duration::from_secs(60)).await);
    assert_eq!(lines.len(), 200_000);
    assert!(
        lines
            .iter()
            .enumerate()
            .all(|(i, l)| l.0 == i as u64 + 1 && l.2.len() == 100)
    );
    app.stop().await;
}
