//! Every request carries an `x-request-id`: the client's when it sent one, a new one otherwise.
//! The response echoes it, the request log line carries it, the edge passes it upstream, and a
//! completion's `id` is built from it (as vLLM does), so one id follows a request across tiers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

pub const HEADER: &str = "x-request-id";

/// Longest client-sent id reused inside response bodies; longer ones still travel as headers.
const MAX_BODY_ID_LEN: usize = 128;

/// A new id, unique within this process and unlikely to repeat across restarts.
pub fn new_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:08x}{:08x}", nanos, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The request's id where it is short, printable text; otherwise a new one.
pub fn for_body(headers: &HeaderMap) -> String {
    headers
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= MAX_BODY_ID_LEN)
        .map_or_else(new_id, str::to_owned)
}

#[derive(Clone, Copy, Default)]
pub struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&new_id()).ok().map(RequestId::new)
    }
}
