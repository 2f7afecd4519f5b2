//! `GET /v1/pools` and `GET /v1/pools/{pool}/endpoints` (ETag = `"<version>"`; `If-None-Match` with
//! the current version answers `304` with no body).

use crate::server::AppState;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/v1/pools", get(list)).route("/v1/pools/{pool}/endpoints", get(endpoints))
}

async fn list(State(state): State<Arc<AppState>>) -> Response {
    let pools: Vec<serde_json::Value> = state
        .endpoints
        .list()
        .into_iter()
        .map(|(name, s)| {
            let fresh = s.endpoints.iter().filter(|e| e.fresh).count();
            serde_json::json!({"pool": name, "version": s.version, "endpoints": s.endpoints.len(), "fresh": fresh})
        })
        .collect();
    axum::Json(serde_json::json!({ "pools": pools })).into_response()
}

async fn endpoints(State(state): State<Arc<AppState>>, Path(pool): Path<String>, headers: HeaderMap) -> Response {
    let Some(s) = state.endpoints.get(&pool) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{{\"error\":\"unknown pool {}\"}}", serde_json::Value::String(pool)),
        )
            .into_response();
    };
    let etag = format!("\"{}\"", s.version);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, "no-cache".to_string()),
        ],
        s.body.to_string(),
    )
        .into_response()
}
