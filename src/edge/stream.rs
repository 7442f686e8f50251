//! The body of a forwarded response: the upstream's frames passed on as they arrive (no
//! buffering, so SSE events reach the client one by one), bounded by the total timeout. If the
//! upstream breaks off or the deadline passes mid-body, an event stream ends cleanly with an
//! OpenAI error event and `[DONE]` (what Ember's own streams send on failure); any other body is
//! cut, so the client sees a broken response rather than a truncated one that looks whole.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Bytes;
use axum::http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::upstream::Upstream;
use crate::server::error::{openai_body, ApiError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct ProxyBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    sse: bool,
    upstream: Arc<Upstream>,
    done: bool,
}

impl ProxyBody {
    pub fn new(inner: Incoming, deadline: Instant, sse: bool, upstream: Arc<Upstream>) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            sse,
            upstream,
            done: false,
        }
    }

    fn fail(
        &mut self,
        error: ApiError,
        kind: &str,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.upstream.failed(kind);
        tracing::warn!(kind, message = %error.message, "forwarded response broke off");
        if self.sse {
            let event = format!("data: {}\n\ndata: [DONE]\n\n", openai_body(&error));
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
        } else {
            Poll::Ready(Some(Err(error.message.into())))
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => return Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                let error = ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    format!("the upstream broke off the response: {e}"),
                );
                return this.fail(error, "stream");
            }
            Poll::Pending => {}
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            let error = ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream's response passed the edge's total timeout",
            );
            return this.fail(error, "timeout");
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
