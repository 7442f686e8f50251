//! The HTTP layer: axum router, shared state, cross-cutting layers and the serve loop with
//! graceful shutdown. Routes live in [`routes`]; errors become responses in [`error`].

pub mod auth;
pub mod bounded_body;
pub mod connections;
pub mod error;
pub mod keep_alive;
pub mod limits;
pub mod openapi;
pub mod rate_limit;
pub mod request_id;
pub mod routes;
mod serve;
#[cfg(feature = "tls")]
pub mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;

pub use serve::{serve, Tls};

use crate::metrics::Metrics;
use crate::registry::ModelRegistry;

/// Whether the server should get traffic: models loaded and not draining.
#[derive(Default)]
pub struct Health {
    loaded: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::SeqCst);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::SeqCst) && !self.is_draining()
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub access: Arc<auth::AccessPolicy>,
    pub limits: limits::Limits,
    /// Per-key (or per-address) request rate; `None`: unlimited.
    pub rate_limiter: Option<Arc<rate_limit::RateLimiter>>,
    pub registry: Arc<ModelRegistry>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// The model a response was for, set by handlers so the metrics layer can label it. Only names
/// of served models are set, so the label stays bounded.
#[derive(Clone)]
pub struct ModelLabel(pub String);

/// The cloud tier's application: every route, with the cross-cutting layers.
pub fn router(state: AppState) -> Router {
    with_layers(routes::cloud().with_state(state.clone()), &state)
}

/// Wraps an application in the layers every tier shares, outermost first: `Connection: close`
/// for a response that left its body unread, request id (kept or created, echoed on the
/// response), metrics and the request log line, access control, the request deadline, the body
/// limit, refusal while draining.
pub fn with_layers(app: Router, state: &AppState) -> Router {
    use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
    let id = axum::http::HeaderName::from_static(request_id::HEADER);
    app.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        refuse_while_draining,
    ))
    .layer(axum::extract::DefaultBodyLimit::max(
        state.limits.max_body_bytes,
    ))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        limits::enforce_deadline,
    ))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        require_key,
    ))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        record_metrics,
    ))
    .layer(PropagateRequestIdLayer::new(id.clone()))
    .layer(SetRequestIdLayer::new(id, request_id::NewRequestId))
    .layer(axum::middleware::from_fn(keep_alive::close_if_body_unread))
}

/// Refuses a request without the key its route needs, or over its caller's rate, before
/// anything else looks at it.
async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    use rate_limit::Caller;
    let path = req.uri().path();
    let granted = match state.access.check(path, req.headers()) {
        Ok(granted) => granted,
        Err(e) => return error::for_path(path, e),
    };
    if let Some(limiter) = &state.rate_limiter {
        let caller = match granted {
            auth::Granted::Key(i) => Some(Caller::Key(i)),
            auth::Granted::Anonymous => req
                .extensions()
                .get::<axum::extract::ConnectInfo<connections::PeerAddr>>()
                .map(|c| Caller::Address(c.0 .0.ip())),
            auth::Granted::Exempt => None,
        };
        if let Some(caller) = caller {
            if let Err(wait) = limiter.take(caller, std::time::Instant::now()) {
                return error::for_path(path, error::ApiError::rate_limited(wait));
            }
        }
    }
    next.run(req).await
}

/// During the drain, inference is refused at once; probes and metrics still answer.
async fn refuse_while_draining(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let is_inference = path.starts_with("/v1/") && req.method() == axum::http::Method::POST
        || path.ends_with("/infer");
    if is_inference && state.health.is_draining() {
        return error::for_path(path, error::ApiError::draining());
    }
    next.run(req).await
}

async fn record_metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    // The request log line is debug-level: only then is its id and method copied.
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        let id = req
            .headers()
            .get(request_id::HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        (id, req.method().clone())
    });
    let response = next.run(req).await;
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map(|m| m.0.as_str())
        .unwrap_or("");
    let status = response.status().as_u16().to_string();
    state
        .metrics
        .requests_total
        .with_label_values(&[model, &route, &status])
        .inc();
    state
        .metrics
        .request_duration_seconds
        .with_label_values(&[model, &route])
        .observe(started.elapsed().as_secs_f64());
    if let Some((id, method)) = logged {
        tracing::debug!(request_id = %id, %method, %route, model, status, ms = started.elapsed().as_millis() as u64, "request");
    }
    response
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
