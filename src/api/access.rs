//! Access control for every route: the scope each (method, route) needs, checked in one
//! middleware before any handler runs, so that a route cannot forget it. A route missing from
//! [`ROUTES`] is refused (fail closed); a test keeps the table, the router and `openapi.yaml` in
//! step.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::auth::{AuthError, Caller, Scope};

/// Every route the router serves, as (method, path template, scope it needs; `None`: open to
/// all). `openapi.yaml` documents exactly these.
pub const ROUTES: &[(&str, &str, Option<Scope>)] = &[
    ("GET", "/healthz", None),
    ("GET", "/readyz", None),
    ("GET", "/openapi.yaml", None),
    ("GET", "/metrics", Some(Scope::MetricsRead)),
    ("GET", "/modules", Some(Scope::ModulesRead)),
    ("GET", "/modules/{id}", Some(Scope::ModulesRead)),
    ("POST", "/runs", Some(Scope::RunsCreate)),
    ("GET", "/runs", Some(Scope::RunsRead)),
    ("GET", "/runs/{id}", Some(Scope::RunsRead)),
    ("DELETE", "/runs/{id}", Some(Scope::RunsCancel)),
    ("GET", "/runs/{id}/output", Some(Scope::RunsRead)),
    ("GET", "/runs/{id}/stream", Some(Scope::RunsRead)),
    ("GET", "/events", Some(Scope::RunsRead)),
    ("GET", "/", None),
    ("GET", "/ui/app.js", None),
    ("GET", "/ui/app.css", None),
    ("GET", "/session", None),
    ("POST", "/session", None),
    ("DELETE", "/session", None),
];

/// The scope a matched route needs: `Ok(None)` for an open route, `Err` for a route that is not
/// in the table.
fn required(method: &Method, path: &str) -> Result<Option<Scope>, ()> {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map(|(_, _, scope)| *scope)
        .ok_or(())
}

/// What the request log says of a routed request (a response extension set by [`authorize`]):
/// its route template (never the raw path) and the name of the token that made it.
#[derive(Debug, Clone)]
pub struct Served {
    /// The route template, e.g. `/runs/{id}`.
    pub route: String,
    /// The token's name, when a known token came with the request.
    pub token: Option<String>,
}

/// The middleware of every route: refuse while the server is unavailable (starting, draining),
/// authenticate the caller (`Authorization: Bearer <token>`), check the route's scope, and
/// hand the [`Caller`] to the handler as a request extension; the response says which route
/// served it, and for whom ([`Served`]).
pub async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(route) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
    else {
        return next.run(req).await;
    };
    // While starting or shutting down, 503 for everything but the probes, the metrics and
    // the spec (`/readyz` answers 503 itself, with the reason).
    if let Some(why) = super::unavailable_reason(&state)
        && !matches!(
            route.as_str(),
            "/healthz" | "/readyz" | "/metrics" | "/openapi.yaml"
        )
    {
        let mut res = ApiError::unavailable(why).into_response();
        res.extensions_mut().insert(Served { route, token: None });
        return res;
    }
    let (mut res, token) = check(&state, &route, req, next).await;
    res.extensions_mut().insert(Served { route, token });
    res
}

/// [`authorize`] for a matched route: the response, and the token's name when it was known.
async fn check(
    state: &AppState,
    route: &str,
    mut req: Request,
    next: Next,
) -> (Response, Option<String>) {
    let scope = match required(req.method(), route) {
        Ok(None) => return (next.run(req).await, None),
        Ok(Some(scope)) => scope,
        Err(()) => {
            let refused = ApiError::forbidden(format!("`{route}` has no access rule"));
            return (refused.into_response(), None);
        }
    };
    let auth = state.live.get().auth.clone();
    let (caller, by_cookie) = match credentials(&auth, req.headers()) {
        Ok(c) => c,
        Err(e) => return (unauthorized(e), None),
    };
    if by_cookie && !is_safe(req.method()) && !req.headers().contains_key(CSRF_HEADER) {
        let refused = ApiError::forbidden(format!(
            "a request signed in with the session cookie must carry the `{CSRF_HEADER}` header"
        ));
        return (refused.into_response(), caller.name().map(str::to_owned));
    }
    let token = caller.name().map(str::to_owned);
    if !caller.can(scope) {
        let refused = ApiError::forbidden(format!(
            "the token `{}` lacks the scope `{scope}`",
            caller.name().unwrap_or("-")
        ));
        return (refused.into_response(), token);
    }
    req.extensions_mut().insert(caller);
    (next.run(req).await, token)
}

/// The session cookie of the dashboard: the API token itself, `HttpOnly` (no script reads it)
/// and `SameSite=Strict` (no other site's page sends it).
pub const SESSION_COOKIE: &str = "modrun_session";

/// The header a state-changing request signed in by the session cookie must carry: another
/// site can make a browser send a cookie-bearing form, never a custom header (that needs a
/// CORS preflight, which modrun never grants).
pub const CSRF_HEADER: &str = "x-modrun-csrf";

fn is_safe(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The token of the session cookie, if the request has one.
pub fn session_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == SESSION_COOKIE && !v.is_empty()).then_some(v)
        })
}

/// Who is asking: the `Authorization` header when there is one, else the session cookie,
/// else anonymous (when the server allows it). `true` when the cookie was used.
pub fn credentials(
    auth: &crate::auth::Auth,
    headers: &axum::http::HeaderMap,
) -> Result<(Arc<Caller>, bool), AuthError> {
    if let Some(h) = headers.get(header::AUTHORIZATION) {
        return auth.authenticate(Some(h.as_bytes())).map(|c| (c, false));
    }
    match session_token(headers) {
        Some(token) => auth
            .authenticate(Some(format!("Bearer {token}").as_bytes()))
            .map(|c| (c, true)),
        None => auth.authenticate(None).map(|c| (c, false)),
    }
}

/// 401 with the challenge RFC 6750 asks for.
fn unauthorized(e: AuthError) -> Response {
    let challenge = match e {
        AuthError::Missing => r#"Bearer realm="modrun""#,
        AuthError::Invalid => r#"Bearer realm="modrun", error="invalid_token""#,
    };
    let mut res = ApiError::unauthorized(e.to_string()).into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    debug_assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    res
}

/// The caller of a request that passed [`authorize`] (a handler's extractor).
pub type CallerExt = axum::Extension<Arc<Caller>>;
