//! The HTTP API: the router, its state, and the handlers. The only code that knows HTTP.

mod access;
mod dashboard;
mod dto;
mod error;
mod events;
mod extract;
mod runs;
pub mod server;
mod session;
mod sse;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{DefaultBodyLimit, OriginalUri, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

pub use access::ROUTES;
pub use dto::{LineDto, ModuleDto, RunDto, run_json};
pub use error::{ApiError, MAX_FIELD_ERRORS, PROBLEM_JSON};

use crate::auth::Auth;
use crate::config::{Config, Live, Snapshot};
use crate::runner::ModuleRunner;

/// Open SSE streams allowed when no limit is set.
const DEFAULT_STREAMS: usize = 1024;

/// What the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The configuration in force (replaced whole by a reload): the catalog, the tokens and
    /// the environment children may inherit.
    pub live: Arc<Live>,
    /// The runner (and through it, the store).
    pub runner: ModuleRunner,
    /// Fires at shutdown: open SSE streams send `end` and close; `?wait` requests answer.
    pub streams_end: CancellationToken,
    /// Set at shutdown: every new request gets 503.
    pub draining: Arc<AtomicBool>,
    /// Set while start-up recovery runs: requests other than the probes, the metrics and the
    /// spec get 503.
    pub starting: Arc<AtomicBool>,
    /// Open SSE streams hold a permit each (`sse.max_streams`). Overflow policy: a stream that
    /// finds none is refused with 429 and Retry-After.
    pub streams: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// Wire a runner to a configuration; `base_env` is what children may inherit.
    pub fn new(
        config: Arc<Config>,
        runner: ModuleRunner,
        base_env: Arc<Vec<(String, String)>>,
    ) -> Self {
        Self::with_live(
            Arc::new(Live::new(Snapshot {
                config,
                auth: Arc::new(Auth::new(&[], true)),
                base_env,
            })),
            runner,
        )
    }

    /// Serve the configuration `live` holds, which a reload may replace.
    pub fn with_live(live: Arc<Live>, runner: ModuleRunner) -> Self {
        Self {
            live,
            runner,
            streams_end: CancellationToken::new(),
            draining: Arc::new(AtomicBool::new(false)),
            starting: Arc::new(AtomicBool::new(false)),
            streams: Arc::new(tokio::sync::Semaphore::new(DEFAULT_STREAMS)),
        }
    }

    /// Allow at most `n` open SSE streams.
    pub fn with_stream_limit(mut self, n: usize) -> Self {
        self.streams = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    /// Check requests against `auth` (the default serves everyone anonymously, as on a
    /// loopback address with no token configured).
    pub fn with_auth(self, auth: Auth) -> Self {
        let now = self.live.get();
        self.live.replace(Snapshot {
            config: now.config.clone(),
            auth: Arc::new(auth),
            base_env: now.base_env.clone(),
        });
        self
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.live.get().config.clone()
    }
}

/// The router, without a socket (handler tests can drive it with `tower::ServiceExt::oneshot`).
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.yaml", get(openapi))
        .route("/metrics", get(metrics))
        .route("/modules", get(list_modules))
        .route("/modules/{id}", get(get_module))
        .route("/runs", get(runs::list).post(runs::create))
        .route("/runs/{id}", get(runs::get).delete(runs::cancel))
        .route("/runs/{id}/output", get(runs::output))
        .route("/runs/{id}/stream", get(sse::stream))
        .route("/events", get(events::events))
        .route("/", get(dashboard::page))
        .route("/ui/app.js", get(dashboard::script))
        .route("/ui/app.css", get(dashboard::style))
        .route(
            "/session",
            get(session::get)
                .post(session::sign_in)
                .delete(session::sign_out),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            access::authorize,
        ))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    // What every request goes through, once, around the whole router: a `Router::layer` wraps
    // each route on its own, and per request each such layer cost a clone of a boxed service
    // and a boxed future (about 50 allocations per request for five layers).
    let service = tower::ServiceBuilder::new()
        .layer(middleware::from_fn_with_state(state, front))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::debug_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            ApiError::internal(error::Message("a request handler panicked".into())).into_response()
        }))
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .service(routes);
    Router::new().fallback_service(service)
}

/// The longest request target accepted (414 past it).
const MAX_URI_BYTES: usize = 8 * 1024;
/// The most header bytes accepted (431 past it).
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// What every request goes through first: the size limits of its head, its id, its log line
/// and its count in the metrics.
async fn front(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if let Some(refused) = limit_head(&req) {
        return refused;
    }
    let (id, value) = request_id(&mut req);
    let method = req.method().clone();
    let start = std::time::Instant::now();
    let mut res = error::REQUEST_ID.scope(id.clone(), next.run(req)).await;
    log_request(&state, &method, &id, &res, start.elapsed());
    res.headers_mut().insert(REQUEST_ID_HEADER, value);
    res
}

/// Refuse an over-long target or over-large headers with a problem+json answer (below the
/// HTTP parser's own, larger limits, where it can only answer with a bare status).
fn limit_head(req: &Request) -> Option<Response> {
    let uri = req.uri();
    // The length of the target as written (without formatting it).
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return Some(ApiError::uri_too_long(MAX_URI_BYTES).into_response());
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > MAX_HEADER_BYTES {
        return Some(ApiError::headers_too_large(MAX_HEADER_BYTES).into_response());
    }
    None
}

/// The header that carries a request's id, both ways.
const REQUEST_ID_HEADER: &str = "x-request-id";

/// Give every request an id: the client's `x-request-id` when it is a plain token (at most 64
/// of `[A-Za-z0-9._-]`), else a fresh UUID. It is set on the request (for the log span); the
/// caller scopes it for error answers ([`error::REQUEST_ID`]) and sends it back on the
/// response.
fn request_id(req: &mut Request) -> (Arc<str>, HeaderValue) {
    let given = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        })
        .map(str::to_owned);
    let id: Arc<str> = given
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
        .into();
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("-"));
    req.headers_mut().insert(REQUEST_ID_HEADER, value.clone());
    (id, value)
}

/// One log line per request, when its answer (for a stream: its head) is ready: method, route
/// template (`-` when nothing matched: the raw path is client text), status, duration, request
/// id and token name. At info; the probes (`/healthz`, `/readyz`) at debug, or they would fill
/// the log.
fn log_request(
    state: &AppState,
    method: &Method,
    request_id: &str,
    res: &Response,
    took: std::time::Duration,
) {
    let duration_ms = crate::telemetry::millis(took);
    let served = res.extensions().get::<access::Served>();
    let route = served.map_or("-", |s| s.route.as_str());
    let token = served.and_then(|s| s.token.as_deref()).unwrap_or("-");
    let status = res.status().as_u16();
    count_request(state, method, route, status, took);
    if route == "/healthz" || route == "/readyz" || route == "/metrics" {
        tracing::debug!(target: "modrun::http", %method, route, status, duration_ms, request_id, token, "request");
    } else {
        tracing::info!(target: "modrun::http", %method, route, status, duration_ms, request_id, token, "request");
    }
}

/// The request in the metrics: by route template, method and status; its time to the
/// response head unless it is an SSE stream; a refused `POST /runs` by reason.
fn count_request(
    state: &AppState,
    method: &Method,
    route: &str,
    status: u16,
    took: std::time::Duration,
) {
    use crate::metrics::{HttpLabels, ReasonLabel, Rejection, RouteLabels};
    let metrics = state.runner.registry().metrics();
    // Only the standard methods: a label never carries client text.
    let method = match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route: route.to_owned(),
            status,
        })
        .inc();
    if route != "/runs/{id}/stream" {
        metrics
            .http_duration
            .get_or_create(&RouteLabels {
                method,
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
    }
    if route == "/runs" && method == "POST" && status >= 400 {
        let reason = Rejection::from_status(status).as_str();
        metrics
            .runs_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

/// Why the server takes no requests now (beyond the probes), if it does not.
fn unavailable_reason(state: &AppState) -> Option<&'static str> {
    if state.draining.load(Ordering::Relaxed) {
        Some("modrun is shutting down")
    } else if state.starting.load(Ordering::Relaxed) {
        Some("modrun is starting: it is recovering the runs of its previous start")
    } else {
        None
    }
}

async fn no_route(OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::no_route(&crate::module::echo(uri.path()))
}

async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::method_not_allowed(
        &crate::module::echo(method.as_str()),
        &crate::module::echo(uri.path()),
    )
}

/// Alive; says whether the store takes writes (and, in a cluster, which node this is).
async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    let registry = state.runner.registry();
    let store = registry
        .health()
        .outage()
        .map_or_else(|| "ok".to_owned(), |o| o.to_string());
    let mut body = json!({"status": "ok", "store": store});
    if let Some(cluster) = registry.cluster() {
        body["node_id"] = json!(cluster.node_id().to_string());
    }
    Json(body)
}

/// The API's description (OpenAPI 3.1), as built into this binary.
async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/yaml"),
        )],
        include_str!("../../openapi.yaml"),
    )
}

/// The metrics, in the Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    let mut load = state.runner.load();
    if let Some(cluster) = state.runner.registry().cluster() {
        // A cluster's queue is the database's, shared by every node: each node says the same.
        match cluster.queued_by_module().await {
            Ok(queued) => load.queued = queued,
            Err(e) => tracing::debug!(error = %e, "cannot count the cluster's queued runs"),
        }
    }
    load.modules = state
        .config()
        .modules
        .iter()
        .map(|m| m.id.clone())
        .collect();
    let text = state.runner.registry().metrics().render(&load);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        text,
    )
        .into_response()
}

/// Ready to accept runs: not shutting down, and the store takes writes.
async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(why) = unavailable_reason(&state) {
        return Err(ApiError::unavailable(why));
    }
    if let Some(outage) = state.runner.registry().health().outage() {
        return Err(ApiError::unavailable(format!("the run store {outage}")));
    }
    Ok(Json(json!({"status": "ready"})))
}

async fn list_modules(
    State(state): State<AppState>,
    Extension(caller): access::CallerExt,
) -> Json<serde_json::Value> {
    let c = &state.config();
    let modules: Vec<ModuleDto> = c
        .modules
        .iter()
        .filter(|m| caller.sees_module(&m.id))
        .map(|m| ModuleDto::new(m, c.module_timeout(m)))
        .collect();
    Json(json!({ "modules": modules }))
}

async fn get_module(
    State(state): State<AppState>,
    Extension(caller): access::CallerExt,
    extract::IdPath(id): extract::IdPath,
) -> Result<Json<serde_json::Value>, ApiError> {
    let c = &state.config();
    let m = c
        .module(&id)
        .filter(|m| caller.sees_module(&m.id))
        .ok_or_else(|| ApiError::not_found(format!("no module `{}`", crate::module::echo(&id))))?;
    Ok(Json(
        serde_json::to_value(ModuleDto::new(m, c.module_timeout(m))).map_err(ApiError::internal)?,
    ))
}
