//! A response body with a deadline: frames pass through as they come (no buffering, so SSE
//! events reach the client one by one) until the deadline or a broken inner body. Then an event
//! stream ends cleanly with an OpenAI error event and `[DONE]` (what Ember's own streams send on
//! failure); any other body is cut, so the client sees a broken response rather than a short one
//! that looks whole. The inner body is dropped at once, which cancels the work behind it.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::error::{openai_body, ApiError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether a response is a server-sent event stream (its failures end with an error event).
pub fn is_event_stream(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Why a bounded body ended early.
pub enum Failure {
    /// The inner body failed, with its error.
    Broken(String),
    Deadline,
}

/// Turns a failure into the error the client is told (and does any bookkeeping).
pub type OnFailure = Box<dyn Fn(Failure) -> ApiError + Send + Sync>;

pub struct Bounded<B> {
    inner: Option<B>,
    deadline: Pin<Box<Sleep>>,
    sse: bool,
    on_failure: OnFailure,
}

impl<B> Bounded<B> {
    pub fn new(inner: B, deadline: Instant, sse: bool, on_failure: OnFailure) -> Self {
        Self {
            inner: Some(inner),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            sse,
            on_failure,
        }
    }

    fn fail(&mut self, why: Failure) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.inner = None;
        let error = (self.on_failure)(why);
        tracing::warn!(code = error.code, message = %error.message, "response body ended early");
        if self.sse {
            let event = format!("data: {}\n\ndata: [DONE]\n\n", openai_body(&error));
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
        } else {
            Poll::Ready(Some(Err(error.message.into())))
        }
    }
}

impl<B> Body for Bounded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => return Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                this.inner = None;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return this.fail(Failure::Broken(e.to_string())),
            Poll::Pending => {}
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return this.fail(Failure::Deadline);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) if !self.sse => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
