//! OpenAI text generation: `POST /v1/chat/completions` and `POST /v1/completions`, whole or
//! streamed as server-sent events. Parsing and validation here; the model does the rest.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{generation_model, Labeled};
use crate::batching::scheduler::{Event, FinishReason};
use crate::engine::generate::{ChatMessage, SamplingParams};
use crate::registry::{GenerateParams, Generation, Prompt};
use crate::server::error::{openai_body, parse_json, ApiError, OpenAiError};
use crate::server::{request_id, AppState};

/// The OpenAPI description of these routes.
#[derive(utoipa::OpenApi)]
#[openapi(paths(chat, completions))]
pub struct Doc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
}

/// Most stop strings per request (OpenAI's limit).
const MAX_STOPS: usize = 4;

/// Sampling and length fields shared by both routes (and, by name, KServe's parameters).
#[derive(Deserialize, Default, utoipa::ToSchema)]
pub(super) struct SamplingFields {
    max_tokens: Option<u64>,
    /// The newer OpenAI name for `max_tokens` on chat.
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    repetition_penalty: Option<f64>,
    seed: Option<i64>,
    stop: Option<Value>,
    n: Option<u64>,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct ChatRequest {
    #[schema(example = "SmolLM2-135M-Instruct")]
    model: String,
    /// `[{"role": "system"|"user"|"assistant", "content": "..."}]`
    messages: Value,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct CompletionRequest {
    #[schema(example = "SmolLM2-135M-Instruct")]
    model: String,
    /// A string or an array of token ids (one prompt per request).
    prompt: Value,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Deserialize, Default, Clone, Copy, utoipa::ToSchema)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl SamplingFields {
    /// Checks every range; OpenAI's defaults where a field is absent (temperature 1, top_p 1).
    pub(super) fn into_params(self) -> Result<GenerateParams, ApiError> {
        let bad =
            |param: &'static str, message: String| ApiError::bad_request(message).with_param(param);
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(bad(
                "n",
                format!("n is {n}; this server returns one choice per request (n = 1)"),
            ));
        }
        let in_range = |param: &'static str, v: Option<f64>, lo: f64, hi: f64| match v {
            Some(x) if !(lo..=hi).contains(&x) => Err(bad(
                param,
                format!("{param} is {x}; it must be between {lo} and {hi}"),
            )),
            _ => Ok(v),
        };
        let temperature = in_range("temperature", self.temperature, 0.0, 2.0)?.unwrap_or(1.0);
        let top_p = in_range("top_p", self.top_p, 0.0, 1.0)?.unwrap_or(1.0);
        if top_p == 0.0 {
            return Err(bad(
                "top_p",
                "top_p is 0; it must be above 0 and at most 1".into(),
            ));
        }
        let presence = in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        let frequency = in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        let repetition = in_range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)?;
        let top_k = match self.top_k {
            Some(k) if k < 0 => {
                return Err(bad("top_k", format!("top_k is {k}; use 0 (off) or more")))
            }
            Some(0) | None => None,
            Some(k) => Some(k as usize),
        };
        let max_tokens = match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad(
                    "max_tokens",
                    "max_tokens and max_completion_tokens differ; send one".into(),
                ))
            }
            (a, b) => a.or(b).map(|n| n.min(usize::MAX as u64) as usize),
        };
        let stop = match self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(ApiError::unprocessable(format!(
                        "stop holds {other}; stop strings must be strings"
                    ))
                    .with_param("stop")),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(ApiError::unprocessable(format!(
                    "stop is {other}; use a string or an array of strings"
                ))
                .with_param("stop"))
            }
        };
        if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
            return Err(bad(
                "stop",
                format!("stop takes at most {MAX_STOPS} non-empty strings"),
            ));
        }
        Ok(GenerateParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                repetition_penalty: repetition.unwrap_or(1.0) as f32,
                presence_penalty: presence.unwrap_or(0.0) as f32,
                frequency_penalty: frequency.unwrap_or(0.0) as f32,
                seed: self.seed.map(|s| s as u64),
            },
            stop,
        })
    }
}

/// OpenAI `messages` → chat messages: roles system, user, assistant (and developer, which is
/// system under a newer name); content a string or an array of text parts.
fn parse_messages(messages: Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(items) = messages else {
        return Err(
            ApiError::unprocessable("`messages` must be an array of messages")
                .with_param("messages"),
        );
    };
    if items.is_empty() {
        return Err(
            ApiError::bad_request("`messages` is empty; send at least one message")
                .with_param("messages"),
        );
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |what: &str| format!("messages[{i}].{what}");
            let bad =
                |what: &str, message: String| ApiError::bad_request(message).with_param(at(what));
            let role = match m.get("role").and_then(Value::as_str) {
                Some(r @ ("system" | "user" | "assistant")) => r.to_string(),
                Some("developer") => "system".to_string(),
                Some(other) => {
                    return Err(bad(
                        "role",
                        format!(
                            "{} is {other:?}; use \"system\", \"user\" or \"assistant\"",
                            at("role")
                        ),
                    ))
                }
                None => return Err(bad("role", format!("{} is missing", at("role")))),
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => text.push_str(t),
                            _ => {
                                return Err(bad(
                                    "content",
                                    format!(
                                        "{}[{j}] is not a text part; this model reads text only",
                                        at("content")
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(Value::Null) | None => {
                    return Err(bad("content", format!("{} is missing", at("content"))))
                }
                Some(other) => {
                    return Err(ApiError::unprocessable(format!(
                        "{} is {other}; use a string or an array of text parts",
                        at("content")
                    ))
                    .with_param(at("content")))
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// OpenAI `prompt` → one prompt: a string, an array of token ids, or a one-element array of
/// either (several prompts per request are refused: n = 1).
fn parse_prompt(prompt: Value) -> Result<Prompt, ApiError> {
    let invalid = |m: &str| ApiError::unprocessable(m.to_string()).with_param("prompt");
    match prompt {
        Value::String(s) => Ok(Prompt::Text(s)),
        Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => items
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .map(Prompt::Tokens)
            .ok_or_else(|| invalid("token ids are integers from 0 to 4294967295")),
        Value::Array(mut items) if items.len() == 1 => parse_prompt(items.remove(0)),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::bad_request("`prompt` is empty").with_param("prompt"))
        }
        Value::Array(_) => Err(ApiError::bad_request(
            "`prompt` holds several prompts; send one prompt per request",
        )
        .with_param("prompt")),
        _ => Err(invalid(
            "`prompt` must be a string or an array of token ids",
        )),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// Everything a response needs besides the generated text.
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Meta {
    fn new(kind: Kind, model: String, request_id: String) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        Self {
            kind,
            id: format!("{prefix}-{request_id}"),
            created,
            model,
        }
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.kind, streaming) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// One choice carrying `text` (and the finish reason when it is the last).
    fn choice(&self, text: Option<&str>, finish: Option<FinishReason>, streaming: bool) -> Value {
        let finish = finish.map(FinishReason::as_str);
        match self.kind {
            Kind::Chat if streaming => {
                let delta = text.map_or_else(|| json!({}), |t| json!({ "content": t }));
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text.unwrap_or_default()},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": 0, "text": text.unwrap_or_default(), "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }

    fn body(&self, choices: Vec<Value>, usage: Option<Value>, streaming: bool) -> Value {
        let mut v = json!({
            "id": self.id, "object": self.object(streaming), "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

/// OpenAI's usage object; `cached_tokens` counts the prompt tokens the prefix cache supplied.
fn usage(w: &Whole) -> Value {
    json!({
        "prompt_tokens": w.prompt_tokens,
        "completion_tokens": w.completion_tokens,
        "total_tokens": w.prompt_tokens + w.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": w.cached_tokens},
    })
}

/// Chat completion (OpenAI shape); `stream: true` answers with server-sent events.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI",
    request_body = ChatRequest,
    responses((status = 200, description = "A `chat.completion` object, or with `stream: true` \
        `chat.completion.chunk` events ending in `data: [DONE]`", content((Object = "application/json"), (String = "text/event-stream")))))]
async fn chat(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Labeled<Result<Response, OpenAiError>> {
    handle(&state, &headers, body, Kind::Chat, |req: ChatRequest| {
        let prompt = Prompt::Chat(parse_messages(req.messages)?);
        Ok((
            req.model,
            prompt,
            req.stream,
            req.stream_options,
            req.sampling,
        ))
    })
    .await
}

/// Text completion (OpenAI shape); `stream: true` answers with server-sent events.
#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI",
    request_body = CompletionRequest,
    responses((status = 200, description = "A `text_completion` object, or with `stream: true` \
        its chunks as events ending in `data: [DONE]`", content((Object = "application/json"), (String = "text/event-stream")))))]
async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Labeled<Result<Response, OpenAiError>> {
    handle(
        &state,
        &headers,
        body,
        Kind::Completion,
        |req: CompletionRequest| {
            let prompt = parse_prompt(req.prompt)?;
            Ok((
                req.model,
                prompt,
                req.stream,
                req.stream_options,
                req.sampling,
            ))
        },
    )
    .await
}

/// What both routes take from their request: model, prompt, stream flags and sampling.
type Parsed = (String, Prompt, bool, Option<StreamOptions>, SamplingFields);

/// Parse, check the model, generate, answer: the same for chat and completions once `parse`
/// has turned the route's request into a prompt.
async fn handle<R: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
    parse: impl FnOnce(R) -> Result<Parsed, ApiError>,
) -> Labeled<Result<Response, OpenAiError>> {
    let mut label = None;
    let result = async {
        let (name, prompt, stream, options, sampling) = parse(parse_json(body)?)?;
        let model = generation_model(state, &name)?;
        label = Some(name.clone());
        let generation = model.generate(prompt, sampling.into_params()?).await?;
        respond(
            Meta::new(kind, name, request_id::for_body(headers)),
            generation,
            stream,
            options.unwrap_or_default(),
        )
        .await
    }
    .await;
    Labeled(label, result.map_err(OpenAiError))
}

async fn respond(
    meta: Meta,
    generation: Generation,
    stream: bool,
    options: StreamOptions,
) -> Result<Response, ApiError> {
    if stream {
        return Ok(
            Sse::new(sse_stream(meta, generation, options.include_usage))
                .keep_alive(KeepAlive::default())
                .into_response(),
        );
    }
    let whole = collect(generation).await?;
    let body = meta.body(
        vec![meta.choice(Some(&whole.text), Some(whole.finish), false)],
        Some(usage(&whole)),
        false,
    );
    Ok(Json(body).into_response())
}

/// A finished generation, gathered.
pub(super) struct Whole {
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

impl Whole {
    /// The text so far and a Done event's figures; `None` for any other event.
    fn done(text: String, event: Event) -> Option<Self> {
        match event {
            Event::Done {
                finish,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            } => Some(Self {
                text,
                finish,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            }),
            _ => None,
        }
    }
}

/// Waits for the whole generation. If the client goes away meanwhile, this future is dropped
/// with the receiver, and the scheduler frees the sequence at its next step.
pub(super) async fn collect(mut generation: Generation) -> Result<Whole, ApiError> {
    let mut text = String::new();
    while let Some(event) = generation.events.recv().await {
        match event {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Failed(message) => return Err(generation_failed(message)),
            done => return Whole::done(text, done).ok_or_else(unfinished),
        }
    }
    Err(unfinished())
}

/// The event channel closed without a Done: the scheduler is gone.
fn unfinished() -> ApiError {
    generation_failed("the generation stopped without finishing".into())
}

fn generation_failed(message: String) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "generation_failed",
        message,
    )
}

/// The SSE body: a first chunk with the role (chat), one chunk per piece of text, a last chunk
/// with the finish reason, a usage chunk when asked, then `[DONE]`. Dropping the stream (client
/// gone) drops the receiver, which cancels the sequence.
fn sse_stream(
    meta: Meta,
    generation: Generation,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
    let state = (Some(generation), meta, true);
    futures::stream::unfold(state, move |(generation, meta, first)| async move {
        let mut generation = generation?;
        if first && meta.kind == Kind::Chat {
            let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": null, "finish_reason": null});
            let chunk = meta.body(vec![choice], None, true);
            return Some((vec![data(chunk)], (Some(generation), meta, false)));
        }
        let mut events = match generation.events.recv().await {
            Some(Event::Text { text, .. }) => {
                let chunk = meta.body(vec![meta.choice(Some(&text), None, true)], None, true);
                return Some((vec![data(chunk)], (Some(generation), meta, false)));
            }
            // Headers are sent: the error travels as a last event, in OpenAI's error shape.
            Some(Event::Failed(message)) => vec![data(openai_body(&generation_failed(message)))],
            None => vec![data(openai_body(&unfinished()))],
            Some(done) => match Whole::done(String::new(), done) {
                Some(whole) => {
                    let mut out = vec![data(meta.body(
                        vec![meta.choice(None, Some(whole.finish), true)],
                        None,
                        true,
                    ))];
                    if include_usage {
                        out.push(data(meta.body(Vec::new(), Some(usage(&whole)), true)));
                    }
                    out
                }
                None => vec![data(openai_body(&unfinished()))],
            },
        };
        events.push(Ok(SseEvent::default().data("[DONE]")));
        Some((events, (None, meta, false)))
    })
    .flat_map(futures::stream::iter)
}
