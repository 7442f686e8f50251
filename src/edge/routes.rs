//! The edge's HTTP glue: find the model a request names, place it, then hand the request to the
//! local routes or forward it, and mark the response with where it ran.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::placement::{self, Facts, Placement, Reason, SpillPolicy};
use super::upstream::{Forward, Upstream};
use crate::server::error::{body_bytes, for_path, ApiError};
use crate::server::routes::{model_routes, openai, server_routes};
use crate::server::{AppState, ModelLabel};

/// Which tier produced a response.
pub const SERVED_BY: &str = "x-ember-served-by";

pub struct Edge {
    state: AppState,
    /// The local models' routes, without the server-wide layers (the edge's own wrap them).
    local: Router,
    upstream: Arc<Upstream>,
    spill: SpillPolicy,
}

impl Edge {
    pub fn new(state: AppState, upstream: Arc<Upstream>, spill: SpillPolicy) -> Arc<Self> {
        Arc::new(Self {
            local: model_routes().with_state(state.clone()),
            state,
            upstream,
            spill,
        })
    }
}

pub fn router(edge: Arc<Edge>, state: &AppState) -> Router {
    let placed = Router::new()
        .route("/v1/embeddings", post(by_body))
        .route("/v1/chat/completions", post(by_body))
        .route("/v1/completions", post(by_body))
        .route("/v1/models", get(models))
        .route("/v2/models/{name}", get(by_path))
        .route("/v2/models/{name}/ready", get(by_path))
        .route("/v2/models/{name}/infer", post(by_path))
        .with_state(edge);
    crate::server::with_layers(
        placed.merge(server_routes().with_state(state.clone())),
        state,
    )
}

#[derive(Deserialize)]
struct Named {
    model: String,
}

/// OpenAI routes name the model in the JSON body. The body is read under the server's body
/// limit (the layer every tier shares), with the same errors as the local routes.
async fn by_body(
    State(edge): State<Arc<Edge>>,
    parts: Parts,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_bytes(body) {
        Ok(body) => body,
        Err(e) => return for_path(parts.uri.path(), e),
    };
    match serde_json::from_slice::<Named>(&body) {
        Ok(Named { model }) => edge.dispatch(parts, body, model).await,
        // No usable `model`: the local route gives its usual precise 400/422.
        Err(_) => edge.local(parts, body).await,
    }
}

/// KServe routes name the model in the path: `/v2/models/{name}/…`.
async fn by_path(
    State(edge): State<Arc<Edge>>,
    Path(model): Path<String>,
    parts: Parts,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match body_bytes(body) {
        Ok(body) => edge.dispatch(parts, body, model).await,
        Err(e) => for_path(parts.uri.path(), e),
    }
}

impl Edge {
    async fn dispatch(&self, parts: Parts, body: Bytes, model: String) -> Response {
        let local = self.state.registry.get(&model);
        let serves = self.upstream.serves(&model);
        let facts = Facts {
            local_wait: local.as_ref().map(|m| m.expected_wait()),
            upstream_available: self.upstream.is_available(),
            upstream_serves: serves,
        };
        // Metric labels name only models known here or upstream, so clients cannot grow them.
        let label = if local.is_some() || serves == Some(true) {
            model.as_str()
        } else {
            "other"
        };
        let decision = placement::place(facts, self.spill);
        let record = |target: &str, reason: Reason| {
            self.upstream
                .metrics
                .routing_decisions_total
                .with_label_values(&[label, target, reason.as_str()])
                .inc();
        };
        let path = parts.uri.path().to_owned();
        match decision {
            Placement::Local(reason) => {
                record("local", reason);
                self.local(parts, body).await
            }
            Placement::Upstream(reason) => {
                record("upstream", reason);
                self.forward(parts, body, label).await
            }
            Placement::Unavailable => for_path(&path, self.upstream.unavailable().into()),
            Placement::NotFound => for_path(&path, ApiError::model_not_found(&model)),
        }
    }

    async fn local(&self, mut parts: Parts, body: Bytes) -> Response {
        // The outer router's match (path parameters) must not leak into the inner one's.
        parts.extensions.clear();
        let request = Request::from_parts(parts, Body::from(body));
        let Ok(mut response) = self.local.clone().oneshot(request).await;
        response
            .headers_mut()
            .insert(SERVED_BY, HeaderValue::from_static("edge"));
        response
    }

    async fn forward(&self, parts: Parts, body: Bytes, label: &str) -> Response {
        let path = parts.uri.path().to_owned();
        let request = Forward {
            method: parts.method,
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| path.clone(), |p| p.as_str().to_owned()),
            sse: path.starts_with("/v1/"),
            headers: parts.headers,
            body,
            model_label: label.to_owned(),
        };
        match self.upstream.forward(request).await {
            Ok(mut response) => {
                response
                    .headers_mut()
                    .insert(SERVED_BY, HeaderValue::from_static("cloud"));
                if label != "other" {
                    response
                        .extensions_mut()
                        .insert(ModelLabel(label.to_owned()));
                }
                response
            }
            Err(e) => for_path(&path, e.into()),
        }
    }
}

/// The local models and the upstream's, each marked with where it runs (`served_by`); a local
/// model the upstream also serves says so (`upstream`), since it may spill there.
async fn models(State(edge): State<Arc<Edge>>) -> impl IntoResponse {
    let upstream = edge.upstream.models().unwrap_or_default();
    let mut data: Vec<Value> = openai::model_objects(&edge.state.registry)
        .into_iter()
        .map(|m| {
            let mut v = serde_json::to_value(m).expect("model objects serialise");
            let also = upstream.iter().any(|u| u["id"] == v["id"]);
            v["served_by"] = json!("edge");
            v["upstream"] = json!(also);
            v
        })
        .collect();
    let local: Vec<Value> = data.iter().map(|v| v["id"].clone()).collect();
    for mut m in upstream {
        if !local.contains(&m["id"]) {
            m["served_by"] = json!("cloud");
            data.push(m);
        }
    }
    Json(json!({ "object": "list", "data": data }))
}
