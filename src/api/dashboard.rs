//! The dashboard's files: one page (`GET /`) and its script and style, compiled into the
//! binary (`ui/`), no build step and nothing fetched from elsewhere. The page reads everything
//! through the API (with the session cookie, `api::session`), so it offers exactly what the
//! signed-in token may do.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// A file of the page, with its type; the script and style are cached by their version.
fn file(body: &'static str, kind: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Scripts of this origin only, no inline script, no framing: what the page needs.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// `GET /`.
pub async fn page() -> Response {
    file(
        include_str!("../../ui/index.html"),
        "text/html; charset=utf-8",
    )
}

/// `GET /ui/app.js`.
pub async fn script() -> Response {
    file(
        include_str!("../../ui/app.js"),
        "text/javascript; charset=utf-8",
    )
}

/// `GET /ui/app.css`.
pub async fn style() -> Response {
    file(include_str!("../../ui/app.css"), "text/css; charset=utf-8")
}
