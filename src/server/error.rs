//! The one place where errors become HTTP: a status and code per domain error, rendered in the
//! API's own shape (OpenAI under `/v1`, KServe v2 under `/v2`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::batching::BatchError;
use crate::registry::ModelError;

/// Seconds a client should wait before retrying an overloaded or draining server.
const RETRY_AFTER_SECONDS: u64 = 1;

/// An error with its HTTP meaning, before it is rendered in an API's shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable, machine-readable code (`model_not_found`, `queue_full`, …).
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, where there is one.
    pub param: Option<String>,
    /// Seconds for `Retry-After` on a 503, when the default does not fit.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message)
    }

    pub fn model_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model {name:?} does not exist; GET /v1/models lists the models served here"),
        )
        .with_param("model")
    }

    /// A model of the repository that failed to load. Retrying soon will not help: the
    /// operator must fix its files and restart.
    pub fn model_unavailable(name: &str, reason: &str) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_unavailable",
            format!("model {name:?} failed to load and is not served: {reason}"),
        )
        .with_param("model");
        e.retry_after = Some(60);
        e
    }

    pub fn draining() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down; retry on another replica",
        )
    }

    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {path}"),
        )
    }

    pub fn rate_limited(wait: std::time::Duration) -> Self {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests for this key; retry in {seconds} s"),
        );
        e.retry_after = Some(seconds);
        e
    }

    /// `Retry-After` seconds: every 503 and 429 says when to come back.
    fn retry_after(&self) -> Option<u64> {
        matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        )
        .then(|| self.retry_after.unwrap_or(RETRY_AFTER_SECONDS))
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        let status = match e {
            BatchError::QueueFull { .. } | BatchError::Stopped(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            BatchError::TooManyInputs { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BatchError::Engine { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = match e {
            BatchError::QueueFull { .. } => "queue_full",
            BatchError::Stopped(_) => "shutting_down",
            BatchError::TooManyInputs { .. } => "too_many_inputs",
            BatchError::Engine { .. } => "inference_failed",
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InvalidInput { message, index } => Self::bad_request(message)
                .with_param(index.map_or_else(|| "input".to_string(), |i| format!("input[{i}]"))),
            ModelError::InvalidParameter { param, message } => {
                Self::bad_request(message).with_param(param)
            }
            ModelError::Batch(b) => b.into(),
            ModelError::Internal(message) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
            }
        }
    }
}

#[cfg(feature = "edge")]
impl From<crate::edge::UpstreamError> for ApiError {
    fn from(e: crate::edge::UpstreamError) -> Self {
        use crate::edge::UpstreamError as U;
        let (status, code, retry_after) = match &e {
            U::Unavailable { retry_after } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                Some(crate::edge::retry_secs(*retry_after)),
            ),
            U::Connect(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                None,
            ),
            U::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", None),
            U::Failed(_) => (StatusCode::BAD_GATEWAY, "upstream_failed", None),
        };
        let mut error = Self::new(status, code, e.to_string());
        error.retry_after = retry_after;
        error
    }
}

/// An [`ApiError`] in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

/// An [`ApiError`] in KServe v2's shape: `{"error": "..."}`.
#[derive(Debug)]
pub struct KServeError(pub ApiError);

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl<E: Into<ApiError>> From<E> for KServeError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = openai_body(&self.0);
        finish(&self.0, Json(body).into_response())
    }
}

/// OpenAI's error shape.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct OpenAiErrorBody {
    error: OpenAiErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct OpenAiErrorDetail {
    message: String,
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`,
    /// `rate_limit_error`, `overloaded_error` or `server_error`.
    #[serde(rename = "type")]
    kind: &'static str,
    /// The request field at fault, if one is.
    param: Option<String>,
    /// A stable machine-readable code, e.g. `model_not_found`, `queue_full`.
    code: &'static str,
}

/// KServe v2's error shape.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct KServeErrorBody {
    error: String,
}

/// OpenAI's error body for `e`; also sent as the last event of a stream that fails.
pub fn openai_body(e: &ApiError) -> serde_json::Value {
    let kind = match e.status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 if e.code == "model_not_found" => "invalid_request_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    let body = OpenAiErrorBody {
        error: OpenAiErrorDetail {
            message: e.message.clone(),
            kind,
            param: e.param.clone(),
            code: e.code,
        },
    };
    serde_json::to_value(body).expect("an error body serialises")
}

impl IntoResponse for KServeError {
    fn into_response(self) -> Response {
        let body = KServeErrorBody {
            error: self.0.message.clone(),
        };
        finish(&self.0, Json(body).into_response())
    }
}

fn finish(e: &ApiError, mut response: Response) -> Response {
    *response.status_mut() = e.status;
    if let Some(seconds) = e.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if e.status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if e.status.is_server_error() {
        tracing::warn!(status = e.status.as_u16(), code = e.code, message = %e.message, "request failed");
    }
    response
}

/// Renders an error in the shape that the path's API uses.
pub fn for_path(path: &str, e: ApiError) -> Response {
    if path.starts_with("/v2") {
        KServeError(e).into_response()
    } else {
        OpenAiError(e).into_response()
    }
}

/// A request body, or why it could not be read: over the body limit is 413, else 400.
pub fn body_bytes(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    body.map_err(|r| {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(r.status(), code, r.body_text())
    })
}

/// Parses a JSON body: broken JSON is 400, JSON of the wrong shape 422, each saying where.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    parse_json_bytes(&body_bytes(body)?)
}

/// [`parse_json`] for bytes already read.
pub fn parse_json_bytes<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::unprocessable(format!("invalid request body: {e}")),
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad_request(format!("malformed JSON: {e}"))
            }
        }
    })
}
