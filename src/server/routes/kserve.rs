//! KServe v2 Open Inference Protocol: server and model metadata, readiness, and `infer`. An
//! embedding model takes a BYTES tensor of texts and returns an FP32 tensor of vectors; a
//! generation model takes one BYTES prompt (`text_input`, with sampling in the request's
//! `parameters`) and returns one BYTES `text_output`, as Triton's generation backends do.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[cfg(feature = "generate")]
use super::completions::{collect, SamplingFields};
use super::{lookup, Labeled};
use crate::registry::{EmbedInput, EmbeddingModel, LoadedModel};
#[cfg(feature = "generate")]
use crate::registry::{GenerationModel, Prompt};
use crate::server::error::{parse_json, ApiError, KServeError};
use crate::server::limits::Limits;
use crate::server::AppState;

/// The input and output tensor names of embedding models.
const TEXT_INPUT: &str = "text";
const EMBEDDING_OUTPUT: &str = "embedding";
/// The input and output tensor names of generation models.
#[cfg(feature = "generate")]
const PROMPT_INPUT: &str = "text_input";
#[cfg(feature = "generate")]
const GENERATED_OUTPUT: &str = "text_output";

/// The routes that name a model.
pub fn model_router() -> Router<AppState> {
    Router::new()
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
}

/// The OpenAPI description of these routes.
#[derive(utoipa::OpenApi)]
#[openapi(paths(server_metadata, model_metadata, model_ready, infer))]
pub struct Doc;

pub fn server_router() -> Router<AppState> {
    Router::new().route("/v2", get(server_metadata))
}

#[derive(Serialize, utoipa::ToSchema)]
struct ServerMetadata {
    name: &'static str,
    version: &'static str,
    extensions: Vec<String>,
}

/// KServe v2 server metadata.
#[utoipa::path(get, path = "/v2", tag = "KServe v2",
    responses((status = 200, description = "Server name and version", body = ServerMetadata)))]
async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "ember",
        version: env!("CARGO_PKG_VERSION"),
        extensions: Vec::new(),
    })
}

#[derive(Serialize, utoipa::ToSchema)]
struct ModelMetadata {
    name: String,
    versions: Vec<&'static str>,
    platform: &'static str,
    inputs: Vec<TensorMetadata>,
    outputs: Vec<TensorMetadata>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ModelReady {
    name: String,
    ready: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
struct TensorMetadata {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<i64>,
}

/// A model's inputs and outputs.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "KServe v2",
    params(("name" = String, Path, description = "The model's name", example = "all-MiniLM-L6-v2")),
    responses((status = 200, description = "The model's metadata", body = ModelMetadata)))]
async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, KServeError> {
    let (inputs, outputs) = match lookup(&state, &name)? {
        LoadedModel::Embed(m) => (
            TensorMetadata {
                name: TEXT_INPUT,
                datatype: "BYTES",
                shape: vec![-1],
            },
            TensorMetadata {
                name: EMBEDDING_OUTPUT,
                datatype: "FP32",
                shape: vec![-1, m.info().dimensions as i64],
            },
        ),
        #[cfg(feature = "generate")]
        LoadedModel::Generate(_) => (
            TensorMetadata {
                name: PROMPT_INPUT,
                datatype: "BYTES",
                shape: vec![1],
            },
            TensorMetadata {
                name: GENERATED_OUTPUT,
                datatype: "BYTES",
                shape: vec![1],
            },
        ),
    };
    Ok(Json(ModelMetadata {
        name,
        versions: vec!["1"],
        platform: "ember_candle",
        inputs: vec![inputs],
        outputs: vec![outputs],
    }))
}

/// Whether a model is loaded and serving.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "KServe v2",
    params(("name" = String, Path, description = "The model's name", example = "all-MiniLM-L6-v2")),
    responses((status = 200, description = "The model is ready", body = ModelReady)))]
async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelReady>, KServeError> {
    lookup(&state, &name)?;
    Ok(Json(ModelReady { name, ready: true }))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct InferRequest {
    id: Option<String>,
    inputs: Vec<InferInput>,
    outputs: Option<Vec<RequestedOutput>>,
    /// Sampling settings of generation models; `truncate` for embedding models.
    parameters: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct RequestedOutput {
    name: String,
}

#[derive(Serialize, utoipa::ToSchema)]
struct InferResponse {
    model_name: String,
    model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    outputs: Vec<OutputTensor>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct OutputTensor {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<usize>,
    data: TensorData,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum TensorData {
    Fp32(Vec<f32>),
    #[cfg_attr(not(feature = "generate"), allow(dead_code))]
    Bytes(Vec<String>),
}

/// Inference: a BYTES tensor of texts for an embedding model (FP32 vectors back), one BYTES
/// prompt `text_input` for a generation model (`text_output` back; sampling in `parameters`).
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "KServe v2",
    params(("name" = String, Path, description = "The model's name", example = "all-MiniLM-L6-v2")),
    request_body = InferRequest,
    responses((status = 200, description = "The output tensors", body = InferResponse)))]
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
    let model = lookup(state, name)?;
    *label = Some(name.to_string());
    let req: InferRequest = parse_json(body)?;
    match model {
        LoadedModel::Embed(m) => infer_embed(&m, name, req, &state.limits).await,
        #[cfg(feature = "generate")]
        LoadedModel::Generate(m) => infer_generate(&m, name, req).await,
    }
}

/// Refuses a requested output the model does not have.
fn check_outputs(req: &InferRequest, name: &str, only: &str) -> Result<(), ApiError> {
    if let Some(bad) = req.outputs.iter().flatten().find(|o| o.name != only) {
        return Err(ApiError::bad_request(format!(
            "unknown output {:?}; model {name} has one output, {only:?}",
            bad.name
        )));
    }
    Ok(())
}

async fn infer_embed(
    embedder: &EmbeddingModel,
    name: &str,
    req: InferRequest,
    limits: &Limits,
) -> Result<InferResponse, ApiError> {
    let texts = texts_from(&req.inputs, TEXT_INPUT)?;
    check_outputs(&req, name, EMBEDDING_OUTPUT)?;
    let n = texts.len();
    limits.check_inputs(n)?;
    let truncate = match req.parameters.as_ref().and_then(|p| p.get("truncate")) {
        None => limits.truncate,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "parameter \"truncate\" must be true or false, not {other}"
            )))
        }
    };
    let results = embedder
        .embed(texts.into_iter().map(EmbedInput::Text).collect(), truncate)
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
        parameters: None,
        outputs: vec![OutputTensor {
            name: EMBEDDING_OUTPUT,
            datatype: "FP32",
            shape: vec![n, dims],
            data: TensorData::Fp32(data),
        }],
    })
}

#[cfg(feature = "generate")]
/// One prompt in, one text out; sampling comes from the request's `parameters` under the
/// OpenAI names (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`, penalties).
async fn infer_generate(
    model: &GenerationModel,
    name: &str,
    req: InferRequest,
) -> Result<InferResponse, ApiError> {
    let mut texts = texts_from(&req.inputs, PROMPT_INPUT)?;
    if texts.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "input {PROMPT_INPUT:?} holds {} prompts; send one (shape [1])",
            texts.len()
        )));
    }
    check_outputs(&req, name, GENERATED_OUTPUT)?;
    let fields: SamplingFields = match req.parameters {
        None => SamplingFields::default(),
        Some(map) => serde_json::from_value(Value::Object(map))
            .map_err(|e| ApiError::bad_request(format!("parameters: {e}")))?,
    };
    let generation = model
        .generate(Prompt::Text(texts.remove(0)), fields.into_params()?)
        .await?;
    let whole = collect(generation).await?;
    Ok(InferResponse {
        model_name: name.to_string(),
        model_version: "1",
        id: req.id,
        parameters: Some(serde_json::json!({
            "finish_reason": whole.finish.as_str(),
            "prompt_tokens": whole.prompt_tokens,
            "completion_tokens": whole.completion_tokens,
        })),
        outputs: vec![OutputTensor {
            name: GENERATED_OUTPUT,
            datatype: "BYTES",
            shape: vec![1],
            data: TensorData::Bytes(vec![whole.text]),
        }],
    })
}

/// The texts of the one BYTES input, checked against its declared shape.
fn texts_from(inputs: &[InferInput], expected: &str) -> Result<Vec<String>, ApiError> {
    let [input] = inputs else {
        return Err(ApiError::bad_request(format!(
            "expected exactly one input tensor ({expected:?}, BYTES), got {}",
            inputs.len()
        )));
    };
    let at = |message: String| ApiError::bad_request(format!("input {:?}: {message}", input.name));
    if input.name != expected {
        return Err(at(format!(
            "unknown input; this model's input is {expected:?}"
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn tensor(shape: Vec<i64>, data: Value) -> Vec<InferInput> {
        vec![InferInput {
            name: TEXT_INPUT.into(),
            shape,
            datatype: "BYTES".into(),
            data,
        }]
    }

    proptest! {
        /// A BYTES tensor decodes to its texts in row-major order, flat or nested, as [n] or
        /// [n, 1]; a shape that does not match the data is refused.
        #[test]
        fn bytes_tensors_decode_in_row_major_order(
            texts in prop::collection::vec(".*", 1..16),
            nested in any::<bool>(),
            column in any::<bool>(),
            wrong_by in 1i64..3,
        ) {
            let n = texts.len() as i64;
            let data = if nested {
                Value::from(texts.iter().map(|t| vec![t.clone()]).collect::<Vec<_>>())
            } else {
                Value::from(texts.clone())
            };
            let shape = if column { vec![n, 1] } else { vec![n] };
            prop_assert_eq!(texts_from(&tensor(shape, data.clone()), TEXT_INPUT).unwrap(), texts);
            let err = texts_from(&tensor(vec![n + wrong_by], data), TEXT_INPUT).unwrap_err();
            prop_assert!(err.message.contains("declares"), "{}", err.message);
        }

        /// Non-string data is a 400 naming the input, whatever it is.
        #[test]
        fn non_string_data_is_refused(x in any::<i64>(), b in any::<bool>()) {
            for data in [Value::from(vec![Value::from(x)]), Value::from(vec![Value::from(b)])] {
                let err = texts_from(&tensor(vec![1], data), TEXT_INPUT).unwrap_err();
                prop_assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
                prop_assert!(err.message.contains("\"text\""), "{}", err.message);
            }
        }
    }
}
