//! Routes by API: OpenAI-compatible (`/v1`), KServe v2 (`/v2`), health and metrics.

#[cfg(feature = "generate")]
pub(crate) mod completions;
pub(crate) mod health;
pub(crate) mod kserve;
pub(crate) mod openai;

use axum::extract::Request;
use axum::response::Response;
use axum::Router;

use super::error::{for_path, ApiError};
use super::AppState;

/// Every route of the cloud tier.
pub fn cloud() -> Router<AppState> {
    model_routes()
        .merge(openai::models_router())
        .merge(server_routes())
}

/// The routes that name a model (in the body or the path): the ones the edge places.
pub fn model_routes() -> Router<AppState> {
    let routes = Router::new()
        .merge(openai::router())
        .merge(kserve::model_router());
    #[cfg(feature = "generate")]
    let routes = routes.merge(completions::router());
    routes
}

/// The routes about the server itself: health, metrics, KServe server metadata, and the
/// answer for unknown paths.
pub fn server_routes() -> Router<AppState> {
    Router::new()
        .merge(kserve::server_router())
        .merge(health::router())
        .route("/openapi.json", axum::routing::get(openapi_json))
        .fallback(not_found)
}

async fn openapi_json() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi::json(),
    )
}

async fn not_found(req: Request) -> Response {
    for_path(
        req.uri().path(),
        ApiError::route_not_found(req.uri().path()),
    )
}

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::ModelLabel;
#[cfg(feature = "generate")]
use crate::registry::GenerationModel;
use crate::registry::{EmbeddingModel, LoadedModel};

fn lookup(state: &AppState, name: &str) -> Result<LoadedModel, ApiError> {
    state
        .registry
        .get(name)
        .ok_or_else(|| match state.registry.failure(name) {
            Some(reason) => ApiError::model_unavailable(name, &reason),
            None => ApiError::model_not_found(name),
        })
}

/// The task a model serves, as the API names it.
fn task_name(model: &LoadedModel) -> &'static str {
    match model {
        LoadedModel::Embed(_) => "embed",
        #[cfg(feature = "generate")]
        LoadedModel::Generate(_) => "generate",
        #[cfg(feature = "onnx")]
        LoadedModel::Tensor(_) => "tensor",
    }
}

/// A served model asked for the wrong kind of work: say which routes it does serve.
fn wrong_task(name: &str, model: &LoadedModel) -> ApiError {
    let routes = match model {
        LoadedModel::Embed(_) => "/v1/embeddings".to_string(),
        #[cfg(feature = "generate")]
        LoadedModel::Generate(_) => "/v1/chat/completions and /v1/completions".to_string(),
        #[cfg(feature = "onnx")]
        LoadedModel::Tensor(_) => format!("POST /v2/models/{name}/infer"),
    };
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "wrong_model_task",
        format!(
            "model {name:?} is a {} model; use {routes}",
            task_name(model)
        ),
    )
    .with_param("model")
}

fn embedding_model(state: &AppState, name: &str) -> Result<Arc<EmbeddingModel>, ApiError> {
    // Without generation every model embeds, and the second arm cannot match.
    #[cfg_attr(not(feature = "generate"), allow(unreachable_patterns))]
    match lookup(state, name)? {
        LoadedModel::Embed(m) => Ok(m),
        other => Err(wrong_task(name, &other)),
    }
}

#[cfg(feature = "generate")]
fn generation_model(state: &AppState, name: &str) -> Result<Arc<GenerationModel>, ApiError> {
    match lookup(state, name)? {
        LoadedModel::Generate(m) => Ok(m),
        other => Err(wrong_task(name, &other)),
    }
}

/// A response tagged with the model it was for, once the request named a served model.
struct Labeled<R>(Option<String>, R);

impl<R: IntoResponse> IntoResponse for Labeled<R> {
    fn into_response(self) -> Response {
        let mut response = self.1.into_response();
        if let Some(model) = self.0 {
            response.extensions_mut().insert(ModelLabel(model));
        }
        response
    }
}
