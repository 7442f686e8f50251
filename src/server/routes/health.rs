//! Liveness, readiness (KServe paths and short aliases) and the Prometheus scrape endpoint.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::server::AppState;

/// The OpenAPI description of these routes.
#[derive(utoipa::OpenApi)]
#[openapi(paths(live, ready, metrics))]
pub struct Doc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
}

/// Liveness: the process answers (also at `/health/live`).
#[utoipa::path(get, path = "/v2/health/live", tag = "Health",
    responses((status = 200, description = "Alive", body = Object, example = json!({"live": true}))))]
async fn live() -> impl IntoResponse {
    Json(json!({ "live": true }))
}

/// Readiness: every model loaded (or, with `--strict-readiness false`, loading over) and not
/// draining (also at `/health/ready`). Models that failed to load are listed.
#[utoipa::path(get, path = "/v2/health/ready", tag = "Health",
    responses((status = 200, description = "Ready", body = Object, example = json!({"ready": true})),
              (status = 503, description = "Loading, draining, or a model failed to load", body = Object,
               example = json!({"ready": false, "failed_models": ["digits-cnn"]}))))]
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let ready = state.health.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let failed = state.registry.failed_names();
    if failed.is_empty() {
        (status, Json(json!({ "ready": ready })))
    } else {
        (
            status,
            Json(json!({ "ready": ready, "failed_models": failed })),
        )
    }
}

/// Prometheus metrics, text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "Health",
    responses((status = 200, description = "Every metric", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
