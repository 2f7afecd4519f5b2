//! The HTTP API. Feature modules contribute routes under `/v1/`; this module adds health, readiness,
//! metrics and per-route request metrics.

use crate::metrics::SidecarMetrics;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

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

pub fn build_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/readyz/backend", get(readyz_backend))
        .route("/metrics", get(metrics))
        .merge(crate::ratelimit::routes())
        .merge(crate::endpoints::api::router())
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
