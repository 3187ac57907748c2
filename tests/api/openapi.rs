//! openapi.yaml documents exactly the routes the router serves.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::spawn_app;

/// (method, path, scope) of every operation in openapi.yaml; the scope is what its one-line
/// `security:` names (`None` for `security: []`).
fn documented() -> BTreeSet<(String, String, Option<String>)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let mut in_paths = false;
    let mut path = None;
    let mut method: Option<String> = None;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if !in_paths {
            continue;
        }
        if !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        if let Some(p) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':'))
            && p.starts_with('/')
        {
            path = Some(p.to_owned());
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
            && ["get", "post", "put", "patch", "delete"].contains(&m)
        {
            method = Some(m.to_uppercase());
        } else if let Some(sec) = line.trim().strip_prefix("security:") {
            let m = method.take().expect("security under an operation");
            let scope = sec.split('"').nth(1).map(str::to_owned);
            out.insert((m, path.clone().expect("method under a path"), scope));
        }
    }
    out
}

/// The documented (method, path, scope) triples are exactly the router's access table, each
/// one is served, and each protected one refuses a request without a token.
#[tokio::test]
async fn openapi_matches_the_router() {
    let table: BTreeSet<(String, String, Option<String>)> = modrun::api::ROUTES
        .iter()
        .map(|(m, p, s)| (m.to_string(), p.to_string(), s.map(|s| s.to_string())))
        .collect();
    assert_eq!(documented(), table);
    let served: BTreeSet<(String, String)> = table
        .iter()
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect();

    let app = spawn_app().await;
    for (method, path) in &served {
        let concrete = if path.starts_with("/modules/") {
            path.replace("{id}", "echo")
        } else {
            path.replace("{id}", "01900000-0000-7000-8000-000000000000")
        };
        let req = app.client.request(
            Method::from_bytes(method.as_bytes()).unwrap(),
            app.url(&concrete),
        );
        let req = if method == "POST" {
            req.json(&serde_json::json!({"module_id": "silent"}))
        } else {
            req
        };
        let res = req.send().await.unwrap();
        assert_ne!(
            res.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        if res.status() == StatusCode::NOT_FOUND {
            let body: Value = res.json().await.unwrap();
            assert_ne!(
                body["type"], "urn:modrun:problem:no-route",
                "{method} {path} is routed"
            );
        }
    }
    app.stop().await;
}

/// `GET /openapi.yaml` serves this very file, as YAML, to anyone (it names no secret: the
/// routes and their shapes), also when tokens are required everywhere else.
#[tokio::test]
async fn the_spec_is_served() {
    let app = crate::helpers::spawn_app_with(&format!(
        "{}\n[auth]\n[[auth.tokens]]\nname = \"t\"\nsha256 = \"{}\"\nscopes = [\"runs:read\"]\n",
        crate::helpers::base_config(""),
        "0".repeat(64)
    ))
    .await;
    let res = app
        .client
        .get(app.url("/openapi.yaml"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/yaml");
    let body = res.text().await.unwrap();
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    assert_eq!(body, file);
    let runs = app.client.get(app.url("/runs")).send().await.unwrap();
    assert_eq!(
        runs.status(),
        StatusCode::UNAUTHORIZED,
        "tokens are required"
    );
    app.stop().await;
}
