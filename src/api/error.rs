//! Every error response, in one shape: RFC 9457 `application/problem+json`. Errors become
//! responses here and only here, and are logged here once. Domain errors map to statuses here
//! (`From` impls), not in handlers. A server error never shows its cause to the client: the
//! answer says "internal error" with the request id, and the log has the cause under that id.

use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::module::FieldError;
use crate::runner::{CancelError, SubmitError};
use crate::store::StoreError;

tokio::task_local! {
    /// The id of the request being handled (the `x-request-id` the server set or the client
    /// sent), for error answers and log lines. Set by the router's request-id layer.
    pub static REQUEST_ID: Arc<str>;
}

/// A cause known only as text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Message(pub String);

/// Field errors listed in one 422 answer, at most.
pub const MAX_FIELD_ERRORS: usize = 20;

/// The media type of error bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An HTTP error with its problem details.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {title}: {detail}")]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
    errors: Vec<FieldError>,
    retry_after: Option<u64>,
    /// What went wrong inside, for the log only.
    #[source]
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, title: &'static str, detail: String) -> Self {
        Self {
            status,
            kind,
            title,
            detail,
            errors: Vec::new(),
            retry_after: None,
            cause: None,
        }
    }

    /// 400: the request cannot be parsed.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail.into(),
        )
    }

    /// 401: no valid API token (the caller adds the `WWW-Authenticate` challenge).
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail.into(),
        )
    }

    /// 403: the token may not do this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            detail.into(),
        )
    }

    /// 404: no such resource.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            detail.into(),
        )
    }

    /// 404: no such route.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "no-route",
            "No such route",
            format!("no route for `{path}`; see openapi.yaml"),
        )
    }

    /// 405.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            format!("`{path}` does not accept {method}"),
        )
    }

    /// 409: the request conflicts with the resource's state.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "Conflict", detail.into())
    }

    /// 413: the body is too large.
    pub fn payload_too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            detail.into(),
        )
    }

    /// 414: the request target is too long.
    pub fn uri_too_long(max: usize) -> Self {
        Self::new(
            StatusCode::URI_TOO_LONG,
            "uri-too-long",
            "URI too long",
            format!("the request target is longer than {max} bytes"),
        )
    }

    /// 431: the request headers are too large.
    pub fn headers_too_large(max: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request headers too large",
            format!("the request headers take more than {max} bytes"),
        )
    }

    /// 415: the body is not JSON.
    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            detail.into(),
        )
    }

    /// 422 with one entry per bad field, at most [`MAX_FIELD_ERRORS`] of them (then one entry
    /// saying how many more), so that an error answer stays small whatever the request.
    pub fn validation(mut errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            many => format!("{} fields are invalid", many.len()),
        };
        if errors.len() > MAX_FIELD_ERRORS {
            let more = errors.len() - MAX_FIELD_ERRORS;
            errors.truncate(MAX_FIELD_ERRORS);
            errors.push(FieldError::new(
                "(more)",
                format!("{more} more invalid fields are not listed"),
            ));
        }
        Self {
            errors,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Invalid request",
                detail,
            )
        }
    }

    /// 422 for a single field.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError::new(field, message)])
    }

    /// 429 with `Retry-After`.
    pub fn too_many(detail: impl Into<String>, retry_after_s: u64) -> Self {
        Self {
            retry_after: Some(retry_after_s),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue-full",
                "Too many queued runs",
                detail.into(),
            )
        }
    }

    /// 429 with `Retry-After`: `sse.max_streams` streams are open.
    pub fn too_many_streams() -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                "Too many open streams",
                "the server's limit of open event streams is reached; try again later".into(),
            )
        }
    }

    /// 503 with `Retry-After`: shutting down, or the store cannot be used for now.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
                detail.into(),
            )
        }
    }

    /// 500: the client is told nothing but the request id; `cause` goes to the log.
    pub fn internal(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            cause: Some(Arc::new(cause)),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                String::new(),
            )
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ApiError::not_found(format!("no run {id}")),
            StoreError::WrongState(run) => {
                ApiError::conflict(format!("run {} is {}", run.id, run.status()))
            }
            StoreError::IdempotencyConflict => ApiError::conflict(
                "this Idempotency-Key was already used with a different request body",
            ),
            StoreError::QueueFull(n) => {
                ApiError::too_many(format!("{n} runs are already queued; try again later"), 1)
            }
            StoreError::Fenced(id) => {
                ApiError::conflict(format!("run {id} was taken over by another node"))
            }
            StoreError::Unavailable(outage, _) => Self {
                cause: Some(Arc::new(e.clone())),
                ..ApiError::unavailable(format!("the run store {outage}; try again later"))
            },
            StoreError::Backend(_) => ApiError::internal(e),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(n) => {
                ApiError::too_many(format!("{n} runs are already queued; try again later"), 1)
            }
            SubmitError::ShuttingDown => ApiError::unavailable("modrun is shutting down"),
            SubmitError::IdempotencyConflict => StoreError::IdempotencyConflict.into(),
            SubmitError::Store(e) => e.into(),
            e @ SubmitError::EmptyArgv => ApiError::internal(e),
        }
    }
}

impl From<CancelError> for ApiError {
    fn from(e: CancelError) -> Self {
        match e {
            CancelError::NotFound(id) => StoreError::NotFound(id).into(),
            CancelError::AlreadyFinished(run) => ApiError::conflict(format!(
                "run {} already finished ({})",
                run.id,
                run.status()
            )),
            CancelError::Store(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = REQUEST_ID.try_with(Arc::clone).ok();
        let id = request_id.as_deref().unwrap_or("-");
        let detail = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            format!(
                "an internal error occurred; the server's log has the details under request id {id}"
            )
        } else {
            self.detail.clone()
        };
        let cause = self.cause.as_ref().map(|c| c.to_string());
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), request_id = id, detail = ?detail, cause = ?cause, "request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), request_id = id, detail = ?detail, "request refused");
        }
        let body = Problem {
            kind: format!("urn:modrun:problem:{}", self.kind),
            title: self.title,
            status: self.status.as_u16(),
            detail: &detail,
            errors: &self.errors,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut res = (self.status, bytes).into_response();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}
