//! The dashboard's sign-in: `POST /session` takes an API token and sets it as an `HttpOnly`,
//! `SameSite=Strict` cookie (so that the page's EventSource streams carry it), `GET /session`
//! says who the page is signed in as and what it may do, `DELETE /session` signs out. The
//! cookie is the token itself: every node of a cluster accepts it, a reload that removes the
//! token ends the session, and no session state is kept anywhere.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::access::{CSRF_HEADER, SESSION_COOKIE, credentials};
use super::error::ApiError;
use super::extract::JsonBody;
use crate::auth::Caller;

/// What the page may do, for `caller` (`None`: nobody is signed in and the server needs a
/// token).
fn session_json(caller: Option<&Caller>) -> Value {
    match caller {
        Some(c) => json!({
            "signed_in": c.name().is_some(),
            "name": c.name(),
            "scopes": c.scopes().iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "needs_token": false,
        }),
        None => json!({"signed_in": false, "name": null, "scopes": [], "needs_token": true}),
    }
}

/// `GET /session`.
pub async fn get(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let auth = state.live.get().auth.clone();
    let caller = credentials(&auth, &headers).ok().map(|(c, _)| c);
    axum::Json(session_json(caller.as_deref())).into_response()
}

fn cookie(state: &AppState, value: &str, max_age: Option<u32>) -> HeaderValue {
    let secure = if state.config().server.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let age = max_age
        .map(|a| format!("; Max-Age={a}"))
        .unwrap_or_default();
    let text = format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{secure}{age}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `POST /session` with `{"token": "..."}` (and the CSRF header).
pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    if !headers.contains_key(CSRF_HEADER) {
        return Err(ApiError::forbidden(format!(
            "signing in needs the `{CSRF_HEADER}` header"
        )));
    }
    let Some(token) = body.get("token").and_then(Value::as_str) else {
        return Err(ApiError::validation(vec![crate::module::FieldError::new(
            "token",
            "must be a string",
        )]));
    };
    // What a cookie value may hold: a token never has anything else.
    if token.is_empty()
        || token.len() > 256
        || !token
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
    {
        return Err(ApiError::unauthorized("this token is not valid"));
    }
    let auth = state.live.get().auth.clone();
    let caller = auth
        .authenticate(Some(format!("Bearer {token}").as_bytes()))
        .map_err(|_| ApiError::unauthorized("this token is not valid"))?;
    let mut res = (StatusCode::OK, axum::Json(session_json(Some(&caller)))).into_response();
    res.headers_mut()
        .insert(header::SET_COOKIE, cookie(&state, token, None));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// `DELETE /session`: the cookie goes.
pub async fn sign_out(State(state): State<AppState>) -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    res.headers_mut()
        .insert(header::SET_COOKIE, cookie(&state, "", Some(0)));
    res
}
