//! openapi.yaml documents exactly the routes the router serves.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::spawn_app;

fn documented() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let mut in_paths = false;
    let mut path = None;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        if let Some(p) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':'))
            && p.starts_with('/')
        {
            path = Some(p.to_owned());
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
            && ["get", "post", "put", "patch", "delete"].contains(&m)
        {
            out.insert((m.to_uppercase(), path.clone().expect("method under a path")));
        }
    }
    out
}

/// The documented (method, path) pairs are exactly the router's, and each one is served.
#[tokio::test]
async fn openapi_matches_the_router() {
    let served: BTreeSet<(String, String)> = modrun::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented(), served);

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
