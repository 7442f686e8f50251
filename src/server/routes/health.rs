//! Liveness, readiness (KServe paths and short aliases) and the Prometheus scrape endpoint.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::server::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
}

async fn live() -> impl IntoResponse {
    Json(json!({ "live": true }))
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let ready = state.health.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready })))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
