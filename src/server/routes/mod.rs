//! Routes by API: OpenAI-compatible (`/v1`), KServe v2 (`/v2`), health and metrics.

mod health;
mod kserve;
mod openai;

use axum::extract::Request;
use axum::response::Response;
use axum::Router;

use super::error::{for_path, ApiError};
use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .merge(openai::router())
        .merge(kserve::router())
        .merge(health::router())
        .fallback(not_found)
}

async fn not_found(req: Request) -> Response {
    for_path(
        req.uri().path(),
        ApiError::route_not_found(req.uri().path()),
    )
}

use std::sync::Arc;

use axum::response::IntoResponse;

use super::ModelLabel;
use crate::registry::{EmbeddingModel, LoadedModel};

/// Looks a model up and checks it can embed.
fn embedding_model(state: &AppState, name: &str) -> Result<Arc<LoadedModel>, ApiError> {
    let model = state
        .registry
        .get(name)
        .ok_or_else(|| ApiError::model_not_found(name))?;
    match &*model {
        LoadedModel::Embed(_) => Ok(model),
    }
}

fn as_embedder(model: &LoadedModel) -> &EmbeddingModel {
    match model {
        LoadedModel::Embed(m) => m,
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
