//! Per-request limits: body size, inputs per request, truncation, and the request deadline
//! (the server's, or a shorter one the client asks for with `x-request-timeout`).

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use tokio::time::Instant;

use super::bounded_body::{is_event_stream, Bounded, Failure};
use super::error::{for_path, ApiError};
use super::AppState;

/// The header in which a client asks for a shorter deadline, in seconds (`2.5`).
pub const TIMEOUT_HEADER: &str = "x-request-timeout";

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Most inputs in one embeddings request; more get 413.
    pub max_inputs: usize,
    /// Whether texts longer than a model's `max_seq_length` are cut (or refused) when the
    /// request does not say.
    pub truncate: bool,
    /// The longest a request may take, streamed body included; past it, 504 and its work is
    /// cancelled.
    pub request_timeout: Duration,
    /// Most open client connections; one more is answered 503 and closed.
    pub max_connections: usize,
    /// How long a connection may wait for a request's head: between requests on a keep-alive
    /// connection, and while the head trickles in. Past it the connection is closed.
    pub idle_timeout: Duration,
}

impl Limits {
    pub fn check_inputs(&self, count: usize) -> Result<(), ApiError> {
        if count > self.max_inputs {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_inputs",
                format!(
                    "the request has {count} inputs; this server takes at most {} per request",
                    self.max_inputs
                ),
            )
            .with_param("input"));
        }
        Ok(())
    }

    /// This request's time limit: the server's, or the client's if shorter.
    fn timeout_for(&self, headers: &HeaderMap) -> Result<Duration, ApiError> {
        let Some(value) = headers.get(TIMEOUT_HEADER) else {
            return Ok(self.request_timeout);
        };
        let seconds = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{TIMEOUT_HEADER} must be a positive number of seconds"
                ))
            })?;
        Ok(Duration::from_secs_f64(
            seconds.min(self.request_timeout.as_secs_f64()),
        ))
    }
}

fn deadline_exceeded(limit: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
        format!(
            "the request passed its {} s deadline; its work was cancelled",
            limit.as_secs_f64()
        ),
    )
}

/// Runs the request under its deadline. A response not ready in time becomes 504 (dropping the
/// handler cancels its work: queued inputs are skipped, sequences freed); a streamed body that
/// outlives the deadline ends with an error event.
pub async fn enforce_deadline(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let limit = match state.limits.timeout_for(req.headers()) {
        Ok(limit) => limit,
        Err(e) => return for_path(&path, e),
    };
    let deadline = Instant::now() + limit;
    let Ok(response) = tokio::time::timeout_at(deadline, next.run(req)).await else {
        return for_path(&path, deadline_exceeded(limit));
    };
    let sse = is_event_stream(response.headers());
    let (parts, body) = response.into_parts();
    // A body whose size is known is already whole (JSON answers): nothing left to bound.
    if http_body::Body::size_hint(&body).exact().is_some() {
        return Response::from_parts(parts, body);
    }
    let on_failure = Box::new(move |why: Failure| match why {
        Failure::Deadline => deadline_exceeded(limit),
        Failure::Broken(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("the response failed: {e}"),
        ),
    });
    Response::from_parts(
        parts,
        Body::new(Bounded::new(body, deadline, sse, on_failure)),
    )
}
