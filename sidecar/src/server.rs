//! The HTTP API. Feature modules contribute routes under `/v1/`; this module adds health, readiness,
//! metrics and per-route request metrics.

use crate::metrics::SidecarMetrics;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shared state of the whole sidecar.
pub struct AppState {
    pub metrics: SidecarMetrics,
    /// False until every backend is usable, and again while shutting down.
    pub ready: AtomicBool,
    /// token-limiter budgets (set once at startup by `ratelimit::install`).
    pub ratelimit: std::sync::OnceLock<Arc<crate::ratelimit::RateLimiter>>,
    /// Model-server endpoint snapshots per pool (inference-router).
    pub endpoints: crate::endpoints::EndpointsState,
}

impl AppState {
    pub fn new() -> anyhow::Result<Arc<AppState>> {
        Ok(Arc::new(AppState {
            metrics: SidecarMetrics::new()?,
            ready: AtomicBool::new(false),
            ratelimit: std::sync::OnceLock::new(),
            endpoints: Default::default(),
        }))
    }
}

/// Request bodies larger than this are answered 413 (the rate-limit calls are a few hundred bytes).
pub const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The API, each request's body read within `body_read_timeout` of its headers (see [`read_body`]).
pub fn build_router(state: Arc<AppState>, body_read_timeout: Duration) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/readyz/backend", get(readyz_backend))
        .route("/metrics", get(metrics))
        .merge(crate::ratelimit::routes())
        .merge(crate::endpoints::api::router())
        .layer(middleware::from_fn_with_state((state.clone(), body_read_timeout), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// Whether the rate-limit backend answers (Redis `PING`; the memory backend always does). Kept apart
/// from `/readyz` on purpose: run as a container of every gateway pod, a readiness probe on Redis would
/// take every gateway pod out of service during a Redis blip, where `failure_mode` is the intended
/// answer. Point a separate alert or a dedicated sidecar Deployment's probe here.
async fn readyz_backend(State(state): State<Arc<AppState>>) -> Response {
    let Some(rl) = state.ratelimit.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "rate limiter not configured").into_response();
    };
    match rl.backend.ping().await {
        Ok(()) => (StatusCode::OK, format!("{} ok", rl.backend.name())).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{}: {e}", rl.backend.name())).into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// Reads the request's whole body within `timeout` of its headers, before the handler runs. A body that
/// does not arrive in time is answered `408` with `connection: close` (hyper then closes the connection:
/// the rest of the body is never read) and counted in `body_read_timeouts_total`; one larger than
/// [`BODY_LIMIT`] is answered `413`. The connection's header timer (`serve.rs`) stops at the end of the
/// headers, so without this a client that trickled a body of up to 2 MB held its connection for as long
/// as it liked.
async fn read_body(State((state, timeout)): State<(Arc<AppState>, Duration)>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, BODY_LIMIT)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.into_inner().is::<http_body_util::LengthLimitError>();
            if too_large {
                json_error(StatusCode::PAYLOAD_TOO_LARGE, "request body larger than 2 MB")
            } else {
                json_error(StatusCode::BAD_REQUEST, "request body could not be read")
            }
        }
        Err(_) => {
            state.metrics.body_read_timeouts.inc();
            let mut r =
                json_error(StatusCode::REQUEST_TIMEOUT, "request body not received within --body-read-timeout-ms");
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

fn json_error(status: StatusCode, msg: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], serde_json::json!({"error": msg}).to_string())
        .into_response()
}

async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let class = match resp.status().as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    };
    state.metrics.http_requests.with_label_values(&[route.as_str(), class]).inc();
    state.metrics.http_latency.with_label_values(&[route.as_str()]).observe(start.elapsed().as_secs_f64());
    resp
}
