//! OpenAI-compatible routes: `POST /v1/embeddings`, `GET /v1/models`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{embedding_model, task_name, Labeled};
use crate::registry::{EmbedInput, ModelRegistry};
use crate::server::error::{parse_json, ApiError, OpenAiError};
use crate::server::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/embeddings", post(embeddings))
}

pub fn models_router() -> Router<AppState> {
    Router::new().route("/v1/models", get(models))
}

/// The OpenAPI description of these routes.
#[derive(utoipa::OpenApi)]
#[openapi(paths(embeddings, models))]
pub struct Doc;

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct EmbeddingsRequest {
    #[schema(example = "all-MiniLM-L6-v2")]
    model: String,
    /// A string, an array of strings, an array of token ids, or an array of arrays of ids.
    input: Value,
    #[serde(default)]
    encoding_format: EncodingFormat,
    dimensions: Option<u64>,
    /// Cut texts longer than the model takes (an Ember extension, as in TEI); `None`: the
    /// server's default.
    truncate: Option<bool>,
    /// Accepted for compatibility; never logged or used as a label.
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: String,
    usage: Usage,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct EmbeddingObject {
    object: &'static str,
    index: usize,
    embedding: Value,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
    /// How many inputs were cut at the model's `max_seq_length` (an Ember extension).
    truncated_inputs: usize,
}

/// Sentence embeddings (OpenAI shape).
#[utoipa::path(post, path = "/v1/embeddings", tag = "OpenAI",
    request_body = EmbeddingsRequest,
    responses((status = 200, description = "One vector per input, in input order", body = EmbeddingsResponse)))]
async fn embeddings(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Labeled<Result<Json<EmbeddingsResponse>, OpenAiError>> {
    let mut label = None;
    let result = embed(&state, body, &mut label).await;
    Labeled(label, result.map(Json).map_err(OpenAiError))
}

async fn embed(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    label: &mut Option<String>,
) -> Result<EmbeddingsResponse, ApiError> {
    let req: EmbeddingsRequest = parse_json(body)?;
    let embedder = embedding_model(state, &req.model)?;
    *label = Some(req.model.clone());
    let dims = embedder.info().dimensions;
    if let Some(d) = req.dimensions {
        if d != dims as u64 {
            return Err(ApiError::bad_request(format!(
                "model {} makes {dims}-dimensional embeddings and cannot shorten them; \
                 omit `dimensions` or set it to {dims}",
                req.model
            ))
            .with_param("dimensions"));
        }
    }
    let inputs = parse_input(req.input)?;
    state.limits.check_inputs(inputs.len())?;
    let truncate = req.truncate.unwrap_or(state.limits.truncate);
    let results = embedder.embed(inputs, truncate).await?;
    let prompt_tokens = results.iter().map(|r| r.tokens).sum();
    let truncated_inputs = results.iter().filter(|r| r.truncated).count();
    let data = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| EmbeddingObject {
            object: "embedding",
            index,
            embedding: match req.encoding_format {
                EncodingFormat::Float => Value::from(r.vector),
                EncodingFormat::Base64 => Value::from(base64_f32(&r.vector)),
            },
        })
        .collect();
    Ok(EmbeddingsResponse {
        object: "list",
        data,
        model: req.model,
        usage: Usage {
            prompt_tokens,
            total_tokens: prompt_tokens,
            truncated_inputs,
        },
    })
}

/// OpenAI's base64 format: the little-endian bytes of the f32 values.
fn base64_f32(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `input` may be a string, an array of strings, an array of token ids, or an array of arrays
/// of token ids.
fn parse_input(input: Value) -> Result<Vec<EmbedInput>, ApiError> {
    const SHAPES: &str = "`input` must be a string, an array of strings, an array of token ids, \
                          or an array of arrays of token ids";
    // Wrong JSON types are valid JSON but unusable (422); an empty list is a bad request (400).
    let invalid = |what: String| ApiError::unprocessable(what).with_param("input");
    let token = |v: &Value, at: String| -> Result<u32, ApiError> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "{at} is {v}; token ids are integers from 0 to 4294967295"
                ))
            })
    };
    match input {
        Value::String(s) => Ok(vec![EmbedInput::Text(s)]),
        Value::Array(items) if items.is_empty() => Err(ApiError::bad_request(
            "`input` is an empty list; send at least one input",
        )
        .with_param("input")),
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(EmbedInput::Text(s)),
                    other => Err(invalid(format!(
                        "input[{i}] is {}; an array of strings must hold only strings",
                        kind(&other)
                    ))),
                })
                .collect(),
            Value::Number(_) => {
                let ids = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| token(v, format!("input[{i}]")))
                    .collect::<Result<_, _>>()?;
                Ok(vec![EmbedInput::Tokens(ids)])
            }
            Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Array(ids) => ids
                        .iter()
                        .enumerate()
                        .map(|(j, id)| token(id, format!("input[{i}][{j}]")))
                        .collect::<Result<_, _>>()
                        .map(EmbedInput::Tokens),
                    other => Err(invalid(format!(
                        "input[{i}] is {}; an array of token-id arrays must hold only arrays",
                        kind(other)
                    ))),
                })
                .collect(),
            other => Err(invalid(format!("input[0] is {}; {SHAPES}", kind(other)))),
        },
        other => Err(invalid(format!("`input` is {}; {SHAPES}", kind(&other)))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelObject {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    /// Ember extensions: what the model does and which tier it belongs to.
    task: &'static str,
    tier: &'static str,
}

/// The models served here (at the edge: also the upstream's, each marked with `served_by`).
#[utoipa::path(get, path = "/v1/models", tag = "OpenAI",
    responses((status = 200, description = "The model list", body = ModelList)))]
async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: model_objects(&state.registry),
    })
}

/// The OpenAI model objects of every loaded model.
pub fn model_objects(registry: &ModelRegistry) -> Vec<ModelObject> {
    registry
        .list()
        .iter()
        .map(|m| {
            let spec = m.spec();
            ModelObject {
                id: spec.name.clone(),
                object: "model",
                created: 0,
                owned_by: "ember",
                task: task_name(m),
                tier: match spec.tier {
                    crate::repository::Tier::Edge => "edge",
                    crate::repository::Tier::Cloud => "cloud",
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn input_shapes() {
        assert_eq!(
            parse_input(json!("a")).unwrap(),
            vec![EmbedInput::Text("a".into())]
        );
        assert_eq!(parse_input(json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(
            parse_input(json!([101, 102])).unwrap(),
            vec![EmbedInput::Tokens(vec![101, 102])]
        );
        assert_eq!(
            parse_input(json!([[101, 102], [101, 7, 102]])).unwrap(),
            vec![
                EmbedInput::Tokens(vec![101, 102]),
                EmbedInput::Tokens(vec![101, 7, 102])
            ]
        );
    }

    #[test]
    fn bad_inputs_say_where() {
        let msg = |v: Value| parse_input(v).unwrap_err().message;
        assert!(msg(json!([])).contains("empty"));
        assert!(msg(json!(["a", 1])).contains("input[1] is a number"));
        assert!(msg(json!([1, -2])).contains("input[1] is -2"));
        assert!(msg(json!([[1], "x"])).contains("input[1] is a string"));
        assert!(msg(json!({"text": "a"})).contains("`input` is an object"));
        assert!(msg(json!([1.5])).contains("input[0] is 1.5"));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Any JSON value, a few levels deep.
        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,8}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    prop::collection::hash_map(".{0,4}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            /// Whatever JSON comes as `input`, parsing answers (never panics), and a bad one is a
            /// client error naming `input`.
            #[test]
            fn any_input_is_parsed_or_refused_cleanly(v in json_value()) {
                if let Err(e) = parse_input(v) {
                    prop_assert!(e.status.is_client_error());
                    prop_assert!(e.param.as_deref().unwrap_or("").starts_with("input"));
                }
            }

            /// Arrays of strings come back as the same texts in the same order.
            #[test]
            fn string_arrays_keep_their_texts(texts in prop::collection::vec(".*", 1..20)) {
                let parsed = parse_input(Value::from(texts.clone())).unwrap();
                let want: Vec<EmbedInput> = texts.into_iter().map(EmbedInput::Text).collect();
                prop_assert_eq!(parsed, want);
            }

            /// Arrays of token-id arrays come back as the same ids.
            #[test]
            fn token_arrays_keep_their_ids(
                ids in prop::collection::vec(prop::collection::vec(any::<u32>(), 1..10), 1..6)
            ) {
                let parsed = parse_input(serde_json::to_value(&ids).unwrap()).unwrap();
                let want: Vec<EmbedInput> = ids.into_iter().map(EmbedInput::Tokens).collect();
                prop_assert_eq!(parsed, want);
            }
        }
    }
}
