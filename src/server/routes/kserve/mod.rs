//! KServe v2 Open Inference Protocol: server and model metadata, readiness, and `infer`. An
//! embedding model takes a BYTES tensor of texts and returns an FP32 tensor of vectors; a
//! generation model takes one BYTES prompt (`text_input`, with sampling in the request's
//! `parameters`) and returns one BYTES `text_output`, as Triton's generation backends do; a
//! tensor model takes and returns the tensors its graph declares. The wire format of tensors
//! (JSON or binary) is [`codec`]'s.

mod codec;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{Map, Value};

use codec::{internal, InferRequest, InferResponse};

#[cfg(feature = "generate")]
use super::completions::{collect, SamplingFields};
use super::{lookup, Labeled};
use crate::engine::tensor::{HostTensor, TensorData};
#[cfg(feature = "onnx")]
use crate::registry::TensorModel;
use crate::registry::{EmbedInput, EmbeddingModel, LoadedModel};
#[cfg(feature = "generate")]
use crate::registry::{GenerationModel, Prompt};
use crate::server::error::{body_bytes, ApiError, KServeError};
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
    /// `ember_candle`, or `candle_onnx` for tensor models.
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
    name: String,
    datatype: &'static str,
    /// `-1` for a dimension of any size.
    shape: Vec<i64>,
}

impl TensorMetadata {
    fn new(name: &str, datatype: &'static str, shape: Vec<i64>) -> Self {
        Self {
            name: name.to_string(),
            datatype,
            shape,
        }
    }
}

/// A model's inputs and outputs.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "KServe v2",
    params(("name" = String, Path, description = "The model's name", example = "all-MiniLM-L6-v2")),
    responses((status = 200, description = "The model's metadata", body = ModelMetadata)))]
async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, KServeError> {
    let (platform, inputs, outputs) = match lookup(&state, &name)? {
        LoadedModel::Embed(m) => (
            "ember_candle",
            vec![TensorMetadata::new(TEXT_INPUT, "BYTES", vec![-1])],
            vec![TensorMetadata::new(
                EMBEDDING_OUTPUT,
                "FP32",
                vec![-1, m.info().dimensions as i64],
            )],
        ),
        #[cfg(feature = "generate")]
        LoadedModel::Generate(_) => (
            "ember_candle",
            vec![TensorMetadata::new(PROMPT_INPUT, "BYTES", vec![1])],
            vec![TensorMetadata::new(GENERATED_OUTPUT, "BYTES", vec![1])],
        ),
        #[cfg(feature = "onnx")]
        LoadedModel::Tensor(m) => {
            let list = |specs: &[crate::engine::tensor::signature::TensorSpec]| {
                specs
                    .iter()
                    .map(|t| TensorMetadata::new(&t.name, t.datatype.name(), t.shape.clone()))
                    .collect()
            };
            let signature = m.signature();
            (
                "candle_onnx",
                list(&signature.inputs),
                list(&signature.outputs),
            )
        }
    };
    Ok(Json(ModelMetadata {
        name,
        versions: vec!["1"],
        platform,
        inputs,
        outputs,
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

/// Inference. An embedding model takes a BYTES tensor of texts (`text`, FP32 `embedding` back);
/// a generation model one BYTES prompt `text_input` (`text_output` back; sampling in
/// `parameters`); a tensor model its own inputs (`GET /v2/models/{name}` lists them). Tensors
/// come as JSON `data` or, with `Inference-Header-Content-Length`, as binary data after the JSON.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "KServe v2",
    params(("name" = String, Path, description = "The model's name", example = "all-MiniLM-L6-v2")),
    request_body = InferRequest,
    responses((status = 200, description = "The output tensors", body = InferResponse)))]
async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Labeled<Result<Response, KServeError>> {
    let mut label = None;
    let result = run_infer(&state, &name, &headers, body, &mut label).await;
    Labeled(label, result.map_err(KServeError))
}

async fn run_infer(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    label: &mut Option<String>,
) -> Result<Response, ApiError> {
    let model = lookup(state, name)?;
    *label = Some(name.to_string());
    let mut req = codec::decode(headers, &body_bytes(body)?)?;
    let inputs = std::mem::take(&mut req.inputs);
    let (parameters, outputs) = match model {
        LoadedModel::Embed(m) => {
            req.check_outputs(name, [EMBEDDING_OUTPUT].into_iter())?;
            (
                None,
                infer_embed(&m, inputs, &req.parameters, &state.limits).await?,
            )
        }
        #[cfg(feature = "generate")]
        LoadedModel::Generate(m) => {
            req.check_outputs(name, [GENERATED_OUTPUT].into_iter())?;
            let parameters = std::mem::take(&mut req.parameters);
            infer_generate(&m, inputs, parameters).await?
        }
        #[cfg(feature = "onnx")]
        LoadedModel::Tensor(m) => {
            let outputs = m.signature().outputs.iter().map(|o| o.name.as_str());
            req.check_outputs(name, outputs)?;
            (
                None,
                infer_tensor(&m, inputs, &req.parameters, &state.limits).await?,
            )
        }
    };
    req.respond(name, parameters, outputs)
}

type Outputs = Vec<(String, HostTensor)>;

async fn infer_embed(
    embedder: &EmbeddingModel,
    inputs: Vec<(String, HostTensor)>,
    parameters: &Map<String, Value>,
    limits: &Limits,
) -> Result<Outputs, ApiError> {
    let texts = texts_from(inputs, TEXT_INPUT)?;
    let n = texts.len();
    limits.check_inputs(n)?;
    let mut truncate = limits.truncate;
    for (key, value) in parameters {
        match (key.as_str(), value) {
            ("truncate", Value::Bool(b)) => truncate = *b,
            ("truncate", other) => {
                return Err(ApiError::bad_request(format!(
                    "parameter \"truncate\" must be true or false, not {other}"
                )))
            }
            _ => return Err(unknown_parameter(key, "truncate, binary_data_output")),
        }
    }
    let results = embedder
        .embed(texts.into_iter().map(EmbedInput::Text).collect(), truncate)
        .await?;
    let dims = embedder.info().dimensions;
    let mut data = Vec::with_capacity(n * dims);
    for r in results {
        data.extend_from_slice(&r.vector);
    }
    let tensor = HostTensor::new(vec![n, dims], TensorData::F32(data)).map_err(internal)?;
    Ok(vec![(EMBEDDING_OUTPUT.to_string(), tensor)])
}

#[cfg(feature = "generate")]
/// One prompt in, one text out; sampling comes from the request's `parameters` under the
/// OpenAI names (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`, penalties).
async fn infer_generate(
    model: &GenerationModel,
    inputs: Vec<(String, HostTensor)>,
    parameters: Map<String, Value>,
) -> Result<(Option<Value>, Outputs), ApiError> {
    let mut texts = texts_from(inputs, PROMPT_INPUT)?;
    if texts.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "input {PROMPT_INPUT:?} holds {} prompts; send one (shape [1])",
            texts.len()
        )));
    }
    let fields: SamplingFields = serde_json::from_value(Value::Object(parameters))
        .map_err(|e| ApiError::bad_request(format!("parameters: {e}")))?;
    let generation = model
        .generate(Prompt::Text(texts.remove(0)), fields.into_params()?)
        .await?;
    let whole = collect(generation).await?;
    let parameters = serde_json::json!({
        "finish_reason": whole.finish.as_str(),
        "prompt_tokens": whole.prompt_tokens,
        "cached_tokens": whole.cached_tokens,
        "completion_tokens": whole.completion_tokens,
    });
    let text = HostTensor::new(vec![1], TensorData::Bytes(vec![whole.text.into_bytes()]))
        .map_err(internal)?;
    Ok((Some(parameters), vec![(GENERATED_OUTPUT.to_string(), text)]))
}

#[cfg(feature = "onnx")]
/// The model's own tensors in, every output back (the response picks the requested ones).
async fn infer_tensor(
    model: &TensorModel,
    inputs: Vec<(String, HostTensor)>,
    parameters: &Map<String, Value>,
    limits: &Limits,
) -> Result<Outputs, ApiError> {
    if let Some(key) = parameters.keys().next() {
        return Err(unknown_parameter(key, "binary_data_output"));
    }
    limits.check_inputs(model.rows(inputs.first().map(|(_, t)| t)))?;
    let outputs = model.infer(inputs).await?;
    Ok(model
        .signature()
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .zip(outputs)
        .collect())
}

fn unknown_parameter(key: &str, known: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unknown parameter {key:?}; this model takes {known}"
    ))
}

/// The texts of the one BYTES input, as `[n]` or `[n, 1]`.
fn texts_from(inputs: Vec<(String, HostTensor)>, expected: &str) -> Result<Vec<String>, ApiError> {
    let count = inputs.len();
    let Ok([(name, tensor)]) = <[_; 1]>::try_from(inputs) else {
        return Err(ApiError::bad_request(format!(
            "expected exactly one input tensor ({expected:?}, BYTES), got {count}"
        )));
    };
    let at = |message: String| ApiError::bad_request(format!("input {name:?}: {message}"));
    if name != expected {
        return Err(at(format!(
            "unknown input; this model's input is {expected:?}"
        )));
    }
    let (shape, data) = tensor.into_parts();
    let TensorData::Bytes(elements) = data else {
        return Err(at(format!(
            "datatype is {}; this input takes BYTES",
            data.datatype()
        )));
    };
    if !matches!(shape.as_slice(), [_] | [_, 1]) {
        return Err(at(format!(
            "shape {shape:?} is not allowed; use [n] or [n, 1]"
        )));
    }
    if elements.is_empty() {
        return Err(at("holds no texts; send at least one".into()));
    }
    elements
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            String::from_utf8(bytes).map_err(|_| at(format!("element {i} is not valid UTF-8")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The texts of a JSON request with one BYTES input of this shape and data.
    fn texts(shape: Vec<i64>, data: Value) -> Result<Vec<String>, ApiError> {
        let body = serde_json::json!({
            "inputs": [{"name": TEXT_INPUT, "shape": shape, "datatype": "BYTES", "data": data}]
        });
        let req = codec::decode(&HeaderMap::new(), &Bytes::from(body.to_string()))?;
        texts_from(req.inputs, TEXT_INPUT)
    }

    proptest! {
        /// A BYTES tensor decodes to its texts in row-major order, flat or nested, as [n] or
        /// [n, 1]; a shape that does not match the data is refused.
        #[test]
        fn bytes_tensors_decode_in_row_major_order(
            strings in prop::collection::vec(".*", 1..16),
            nested in any::<bool>(),
            column in any::<bool>(),
            wrong_by in 1i64..3,
        ) {
            let n = strings.len() as i64;
            let data = if nested {
                Value::from(strings.iter().map(|t| vec![t.clone()]).collect::<Vec<_>>())
            } else {
                Value::from(strings.clone())
            };
            let shape = if column { vec![n, 1] } else { vec![n] };
            prop_assert_eq!(texts(shape, data.clone()).unwrap(), strings);
            let err = texts(vec![n + wrong_by], data).unwrap_err();
            prop_assert!(err.message.contains("declares"), "{}", err.message);
        }

        /// Non-string data is a 400 naming the input, whatever it is.
        #[test]
        fn non_string_data_is_refused(x in any::<i64>(), b in any::<bool>()) {
            for data in [Value::from(vec![Value::from(x)]), Value::from(vec![Value::from(b)])] {
                let err = texts(vec![1], data).unwrap_err();
                prop_assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
                prop_assert!(err.message.contains("\"text\""), "{}", err.message);
            }
        }
    }
}
