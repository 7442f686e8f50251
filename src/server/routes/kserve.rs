//! KServe v2 Open Inference Protocol: server and model metadata, readiness, and `infer` with a
//! BYTES tensor of texts in and an FP32 tensor of embeddings out.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{as_embedder, embedding_model, Labeled};
use crate::registry::EmbedInput;
use crate::server::error::{parse_json, ApiError, KServeError};
use crate::server::AppState;

/// The input and output tensor names of embedding models.
const TEXT_INPUT: &str = "text";
const EMBEDDING_OUTPUT: &str = "embedding";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "ember",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
}

#[derive(Serialize)]
struct TensorMetadata {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<i64>,
}

async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, KServeError> {
    let model = embedding_model(&state, &name)?;
    let dims = as_embedder(&model).info().dimensions as i64;
    Ok(Json(json!({
        "name": name,
        "versions": ["1"],
        "platform": "ember_candle",
        "inputs": [TensorMetadata { name: TEXT_INPUT, datatype: "BYTES", shape: vec![-1] }],
        "outputs": [TensorMetadata { name: EMBEDDING_OUTPUT, datatype: "FP32", shape: vec![-1, dims] }],
    })))
}

async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, KServeError> {
    embedding_model(&state, &name)?;
    Ok(Json(json!({ "name": name, "ready": true })))
}

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    inputs: Vec<InferInput>,
    outputs: Option<Vec<RequestedOutput>>,
    #[serde(default, rename = "parameters")]
    _parameters: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
}

#[derive(Serialize)]
struct InferResponse {
    model_name: String,
    model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<OutputTensor>,
}

#[derive(Serialize)]
struct OutputTensor {
    name: &'static str,
    datatype: &'static str,
    shape: [usize; 2],
    data: Vec<f32>,
}

async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Labeled<Result<Json<InferResponse>, KServeError>> {
    let mut label = None;
    let result = run_infer(&state, &name, body, &mut label).await;
    Labeled(label, result.map(Json).map_err(KServeError))
}

async fn run_infer(
    state: &AppState,
    name: &str,
    body: Result<Bytes, BytesRejection>,
    label: &mut Option<String>,
) -> Result<InferResponse, ApiError> {
    let model = embedding_model(state, name)?;
    *label = Some(name.to_string());
    let req: InferRequest = parse_json(body)?;
    let texts = texts_from(&req.inputs)?;
    if let Some(outputs) = &req.outputs {
        if let Some(bad) = outputs.iter().find(|o| o.name != EMBEDDING_OUTPUT) {
            return Err(ApiError::bad_request(format!(
                "unknown output {:?}; model {name} has one output, {EMBEDDING_OUTPUT:?}",
                bad.name
            )));
        }
    }
    let embedder = as_embedder(&model);
    let n = texts.len();
    let results = embedder
        .embed(texts.into_iter().map(EmbedInput::Text).collect())
        .await?;
    let dims = embedder.info().dimensions;
    let mut data = Vec::with_capacity(n * dims);
    for r in results {
        data.extend_from_slice(&r.vector);
    }
    Ok(InferResponse {
        model_name: name.to_string(),
        model_version: "1",
        id: req.id,
        outputs: vec![OutputTensor {
            name: EMBEDDING_OUTPUT,
            datatype: "FP32",
            shape: [n, dims],
            data,
        }],
    })
}

/// The texts of the one BYTES input, checked against its declared shape.
fn texts_from(inputs: &[InferInput]) -> Result<Vec<String>, ApiError> {
    let [input] = inputs else {
        return Err(ApiError::bad_request(format!(
            "expected exactly one input tensor ({TEXT_INPUT:?}, BYTES), got {}",
            inputs.len()
        )));
    };
    let at = |message: String| ApiError::bad_request(format!("input {:?}: {message}", input.name));
    if input.name != TEXT_INPUT {
        return Err(at(format!(
            "unknown input; this model's input is {TEXT_INPUT:?}"
        )));
    }
    if input.datatype != "BYTES" {
        return Err(at(format!(
            "datatype is {}; this input takes BYTES",
            input.datatype
        )));
    }
    let mut texts = Vec::new();
    flatten_strings(&input.data, &mut texts).map_err(at)?;
    let declared = match input.shape.as_slice() {
        [n] | [n, 1] if *n >= 0 => *n as usize,
        _ => {
            return Err(at(format!(
                "shape {:?} is not allowed; use [n] or [n, 1]",
                input.shape
            )))
        }
    };
    if declared != texts.len() {
        return Err(at(format!(
            "shape {:?} declares {declared} elements but data holds {}",
            input.shape,
            texts.len()
        )));
    }
    if texts.is_empty() {
        return Err(at("holds no texts; send at least one".into()));
    }
    Ok(texts)
}

/// Row-major data may be flat or nested; BYTES elements in JSON are strings.
fn flatten_strings(data: &Value, out: &mut Vec<String>) -> Result<(), String> {
    match data {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => {
            for item in items {
                flatten_strings(item, out)?;
            }
        }
        other => return Err(format!("BYTES data must be strings, found {other}")),
    }
    Ok(())
}
