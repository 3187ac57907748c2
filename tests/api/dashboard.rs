//! The dashboard's server side: its files, the feed of run changes (`GET /events`) and the
//! session cookie (sign in, CSRF, sign out). The page itself is tested in a real browser
//! (`tests/browser`, run by `.ci/run`).

use std::time::Duration;

use modrun::client::sse::{Event, Parser};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{base_config, spawn_app, spawn_app_with};

/// An open event stream, read event by event.
struct Events {
    res: reqwest::Response,
    parser: Parser,
    ready: std::collections::VecDeque<Event>,
}

impl Events {
    fn new(res: reqwest::Response) -> Self {
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        Self {
            res,
            parser: Parser::default(),
            ready: Default::default(),
        }
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(e) = self.ready.pop_front() {
                    return e;
                }
                let chunk = self.res.chunk().await.unwrap().expect("the stream goes on");
                let mut out = Vec::new();
                self.parser.push(&chunk, &mut out).unwrap();
                self.ready.extend(out);
            }
        })
        .await
        .expect("an event in time")
    }

    /// The next `run` event of run `id` with `status`, skipping the others.
    async fn until(&mut self, id: &str, status: &str) -> Event {
        loop {
            let e = self.next().await;
            if e.event == "run" {
                let run: Value = serde_json::from_str(&e.data).unwrap();
                if run["id"] == id && run["status"] == status {
                    return e;
                }
            }
        }
    }
}

/// The page and its files come from the binary, with a policy that allows only them.
#[tokio::test]
async fn the_page_is_served_by_modrun() {
    let app = spawn_app().await;
    for (path, kind) in [
        ("/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert_eq!(res.headers()["content-type"], kind);
        let csp = res.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        let text = res.text().await.unwrap();
        assert!(text.len() > 500, "{path}");
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{path}: nothing from elsewhere"
        );
    }
    app.stop().await;
}

/// `GET /events`: `ready`, then a `run` event for each change of each run; a subscriber that
/// comes back with its last id gets what it missed, one with an id the feed cannot resume
/// gets `reset`.
#[tokio::test]
async fn events_carry_every_change_and_resume() {
    let app = spawn_app().await;
    let mut feed = Events::new(app.client.get(app.url("/events")).send().await.unwrap());
    let ready = feed.next().await;
    assert_eq!(ready.event, "ready");
    let run = app.start("lines", json!({"n": 2})).await;
    let id = run["id"].as_str().unwrap();
    let first = feed.until(id, "running").await;
    let done = feed.until(id, "succeeded").await;
    let done_run: Value = serde_json::from_str(&done.data).unwrap();
    assert_eq!(done_run["exit_code"], 0);
    assert_eq!(done_run["output_lines"], 2);
    drop(feed);

    // Back with the id of the `running` event: the events after it, `succeeded` among them.
    let res = app
        .client
        .get(app.url("/events"))
        .header("last-event-id", first.id.clone().unwrap())
        .send()
        .await
        .unwrap();
    let mut feed = Events::new(res);
    let again = feed.until(id, "succeeded").await;
    assert_eq!(again.id, done.id);

    for bad in ["someone-else.3", "7", "not an id"] {
        let res = app
            .client
            .get(app.url("/events"))
            .header("last-event-id", bad)
            .send()
            .await
            .unwrap();
        let mut feed = Events::new(res);
        assert_eq!(feed.next().await.event, "reset", "{bad}");
    }
    app.stop().await;
}

fn hash(t: &str) -> String {
    modrun::auth::hex(&modrun::auth::sha256(t.as_bytes()))
}

/// Signing in sets the token as an HttpOnly, SameSite=Strict cookie that the API accepts;
/// a state-changing request by cookie needs the CSRF header; the feed shows only the runs of
/// the token's modules; signing out clears the cookie.
#[tokio::test]
async fn a_session_cookie_with_csrf_and_scopes() {
    let ui = "modrun_ui_token_0123456789abcdefghij";
    let admin = "modrun_admin_token_0123456789abcdefg";
    let toml = format!(
        "[[auth.tokens]]\nname = \"ui\"\nsha256 = \"{}\"\n\
         scopes = [\"modules:read\", \"runs:create\", \"runs:read\", \"runs:cancel\"]\n\
         modules = [\"lines\"]\n\
         [[auth.tokens]]\nname = \"admin\"\nsha256 = \"{}\"\nscopes = [\"runs:create\"]\n{}",
        hash(ui),
        hash(admin),
        base_config("")
    );
    let app = spawn_app_with(&toml).await;
    let c = &app.client;
    let session: Value = c
        .get(app.url("/session"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["needs_token"], true);
    assert_eq!(
        c.get(app.url("/events")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    let sign_in = |token: &str, csrf: bool| {
        let mut req = c.post(app.url("/session")).json(&json!({"token": token}));
        if csrf {
            req = req.header("x-modrun-csrf", "1");
        }
        req.send()
    };
    assert_eq!(
        sign_in(ui, false).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        sign_in("not-a-token", true).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let res = sign_in(ui, true).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let set = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with(&format!("modrun_session={ui};")), "{set}");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let me: Value = res.json().await.unwrap();
    assert_eq!(me["name"], "ui");
    assert!(
        me["scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("runs:cancel"))
    );
    let cookie = format!("modrun_session={ui}");

    // Reads by cookie; a write by cookie without the header is refused, with it accepted.
    let res = c
        .get(app.url("/runs"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let post = |csrf: bool, module: &str| {
        let mut req = c
            .post(app.url("/runs"))
            .header("cookie", &cookie)
            .json(&json!({"module_id": module}));
        if csrf {
            req = req.header("x-modrun-csrf", "1");
        }
        req.send()
    };
    let refused = post(false, "lines").await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: Value = refused.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("x-modrun-csrf"));

    let mut feed = Events::new(
        c.get(app.url("/events"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
    );
    assert_eq!(feed.next().await.event, "ready");
    // A run of a module the token does not see (started with another token) never reaches
    // this feed; the token's own does.
    let hidden = c
        .post(app.url("/runs?wait=30"))
        .bearer_auth(admin)
        .json(&json!({"module_id": "echo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(hidden.status(), StatusCode::OK);
    let res = post(true, "lines").await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let run: Value = res.json().await.unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    loop {
        let e = feed.next().await;
        if e.event != "run" {
            continue;
        }
        let seen: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(
            seen["module_id"], "lines",
            "only the token's modules: {seen}"
        );
        if seen["id"] == id.as_str() && seen["status"] == "succeeded" {
            assert_eq!(seen["created_by"], "ui");
            break;
        }
    }

    let out = c.delete(app.url("/session")).send().await.unwrap();
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    let set = out.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.starts_with("modrun_session=;") && set.contains("Max-Age=0"),
        "{set}"
    );
    app.stop().await;
}
