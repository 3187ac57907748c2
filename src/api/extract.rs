//! Extractors whose rejections are problem+json: a JSON body, a run id in the path, and the
//! raw query pairs. Parsing failures are 400; what parses but is unacceptable is the handler's
//! 422.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::{StatusCode, header, request::Parts};
use serde_json::Value;

use super::error::ApiError;
use crate::run::RunId;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A JSON request body, parsed into a `Value` (shape checks are the handler's).
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ctype = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ctype
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !(essence == "application/json" || essence.ends_with("+json")) {
            return Err(ApiError::unsupported_media_type(format!(
                "the body must be JSON (Content-Type: application/json), got `{}`",
                if ctype.is_empty() { "nothing" } else { ctype }
            )));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(format!(
                    "the body is larger than {MAX_BODY_BYTES} bytes"
                ))
            } else {
                ApiError::bad_request(format!("cannot read the body: {rej}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
    }
}

/// The `{id}` path segment as text (a segment that is not valid UTF-8 is a 400).
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| IdPath(id))
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

/// The `{id}` path segment as a run id.
pub struct RunIdPath(pub RunId);

impl<S: Send + Sync> FromRequestParts<S> for RunIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let IdPath(raw) = IdPath::from_request_parts(parts, state).await?;
        raw.parse().map(RunIdPath).map_err(|_| {
            ApiError::bad_request(format!(
                "`{}` is not a valid run id (a UUID)",
                crate::module::echo(&raw)
            ))
        })
    }
}

/// The query string as name/value pairs.
pub struct QueryPairs(pub Vec<(String, String)>);

impl QueryPairs {
    /// The last value given for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// An optional unsigned integer: 400 if present and not one.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "query parameter `{name}` must be a non-negative integer, got `{}`",
                        crate::module::echo(v)
                    ))
                })
            })
            .transpose()
    }

    /// An optional integer checked against a range: 400 if not an integer, 422 if outside.
    pub fn u64_in(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, ApiError> {
        let v = self.u64(name)?;
        if let Some(n) = v
            && !range.contains(&n)
        {
            return Err(ApiError::invalid_field(
                name,
                format!(
                    "must be between {} and {}, got {n}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(v)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .map(QueryPairs)
            .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))
    }
}
