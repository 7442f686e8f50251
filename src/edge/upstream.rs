//! The cloud tier as seen from the edge: a pooled keep-alive HTTP client with connect,
//! first-byte and total timeouts, retries while nothing has reached the client, the circuit
//! breaker, and the active readiness probe that also learns which models the upstream serves.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, Request, StatusCode};
use axum::response::Response;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::time::Instant;

use super::breaker::{Admission, Breaker, BreakerConfig, CircuitState};
use crate::config::url_arg::UpstreamUrl;
use crate::metrics::EdgeMetrics;
use crate::server::bounded_body::{is_event_stream, Bounded, Failure};
use crate::server::error::ApiError;

/// Why a request could not be forwarded; the server maps each to a status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream is unavailable (its circuit is open after failed requests or probes); retry in {}s", retry_secs(*.retry_after))]
    Unavailable { retry_after: Duration },
    #[error("cannot reach the upstream: {0}")]
    Connect(String),
    #[error("the upstream did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("the upstream failed: {0}")]
    Failed(String),
}

/// Whole seconds for `Retry-After`, at least one.
pub fn retry_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    /// PEM CA certificates for an `https://` upstream; `None`: the system's roots.
    #[cfg(feature = "tls")]
    pub ca: Option<std::path::PathBuf>,
    pub credential: Option<String>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub total_timeout: Duration,
    pub retries: u32,
    pub breaker: BreakerConfig,
}

/// One request to forward; its body is whole (the edge read it to find the model), which is
/// also what makes a retry possible.
pub struct Forward {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The metric label for the model (bounded: only names the edge knows).
    pub model_label: String,
    /// SSE responses end with an error event instead of a broken connection when the upstream
    /// fails mid-stream.
    pub sse: bool,
}

pub struct Upstream {
    config: UpstreamConfig,
    client: Client<Connector, Full<Bytes>>,
    credential: Option<HeaderValue>,
    breaker: Breaker,
    /// The `data` of the upstream's `GET /v1/models`, from the last successful probe.
    models: RwLock<Option<Vec<Value>>>,
    pub(super) metrics: EdgeMetrics,
}

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1), plus the ones
/// the edge sets itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

/// TCP with the connect timeout and no Nagle delay (small requests and SSE events must not
/// wait), under TLS for an `https://` upstream.
fn connector(config: &UpstreamConfig) -> Result<Connector, String> {
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(config.connect_timeout));
    tcp.set_nodelay(true);
    #[cfg(feature = "tls")]
    {
        tcp.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let provider = crate::server::tls::provider();
        let builder = match &config.ca {
            Some(path) => builder.with_tls_config(client_tls(path, provider)?),
            None if config.url.tls => builder
                .with_provider_and_native_roots(provider)
                .map_err(|e| {
                    format!("no usable system CA certificates ({e}); name the upstream's CA with --upstream-ca")
                })?,
            // A plain-HTTP upstream needs no roots (a host without any must still start).
            None => builder.with_tls_config(client_config(provider, rustls::RootCertStore::empty())?),
        };
        Ok(builder.https_or_http().enable_http1().wrap_connector(tcp))
    }
    #[cfg(not(feature = "tls"))]
    Ok(tcp)
}

/// A client configuration that trusts the CA certificates in the PEM file at `path`.
#[cfg(feature = "tls")]
fn client_tls(
    path: &std::path::Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    let named = |e: &dyn std::fmt::Display| format!("--upstream-ca {}: {e}", path.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| named(&e))? {
        roots
            .add(cert.map_err(|e| named(&e))?)
            .map_err(|e| named(&e))?;
    }
    if roots.is_empty() {
        return Err(named(&"no PEM certificate in the file"));
    }
    client_config(provider, roots)
}

/// A client configuration that trusts exactly `roots`.
#[cfg(feature = "tls")]
fn client_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    roots: rustls::RootCertStore,
) -> Result<rustls::ClientConfig, String> {
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Upstream {
    pub fn new(config: UpstreamConfig, metrics: EdgeMetrics) -> Result<Self, String> {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector(&config)?);
        let credential = config
            .credential
            .as_deref()
            .map(|key| {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| "the upstream API key holds characters a header cannot carry")?;
                v.set_sensitive(true);
                Ok::<_, String>(v)
            })
            .transpose()?;
        Ok(Self {
            breaker: Breaker::new(config.breaker),
            config,
            client,
            credential,
            models: RwLock::new(None),
            metrics,
        })
    }

    /// The circuit is not open: requests may go (a half-open circuit lets its trial through).
    pub fn is_available(&self) -> bool {
        self.breaker.state(std::time::Instant::now()) != CircuitState::Open
    }

    /// The error for a request refused because the circuit is open; counts the refusal.
    pub fn unavailable(&self) -> UpstreamError {
        self.refused(self.breaker.remaining_open(std::time::Instant::now()))
    }

    fn refused(&self, retry_after: Duration) -> UpstreamError {
        self.metrics
            .upstream_errors_total
            .with_label_values(&["circuit_open"])
            .inc();
        self.publish_state();
        UpstreamError::Unavailable { retry_after }
    }

    /// Whether the upstream's last model list has `model`; `None` before any list arrived.
    pub fn serves(&self, model: &str) -> Option<bool> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .as_ref()
            .map(|list| list.iter().any(|m| m["id"].as_str() == Some(model)))
    }

    pub fn models(&self) -> Option<Vec<Value>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forwards one request. Retries (after a connection failure or a 503) happen only here,
    /// before anything has reached the client, and only while the circuit admits them.
    pub async fn forward(self: &Arc<Self>, request: Forward) -> Result<Response, UpstreamError> {
        let started = Instant::now();
        let deadline = started + self.config.total_timeout;
        let mut attempt = 0;
        loop {
            match self.breaker.admit(std::time::Instant::now()) {
                Admission::Refused { retry_after } => return Err(self.refused(retry_after)),
                Admission::Allowed | Admission::Trial => {}
            }
            let sent = Instant::now();
            let wait = self
                .config
                .first_byte_timeout
                .min(deadline.saturating_duration_since(sent));
            let outcome =
                tokio::time::timeout(wait, self.client.request(self.build(&request))).await;
            let retry = attempt < self.config.retries;
            match outcome {
                Ok(Ok(response)) => {
                    self.metrics
                        .upstream_response_seconds
                        .with_label_values(&[&request.model_label])
                        .observe(sent.elapsed().as_secs_f64());
                    let status = response.status();
                    let unhealthy = matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    );
                    if unhealthy {
                        self.failed("status");
                        // A 503 was not processed (overload or drain): another replica behind
                        // the same Service may take it.
                        if status == StatusCode::SERVICE_UNAVAILABLE && retry {
                            attempt += 1;
                            backoff(attempt).await;
                            continue;
                        }
                    } else {
                        self.breaker.on_success();
                        self.publish_state();
                    }
                    return Ok(self.respond(response, deadline, request.sse));
                }
                Ok(Err(e)) if e.is_connect() => {
                    self.failed("connect");
                    if retry {
                        attempt += 1;
                        backoff(attempt).await;
                        continue;
                    }
                    return Err(UpstreamError::Connect(error_chain(&e)));
                }
                // Sent, then broken: the upstream may have acted on it, so no retry.
                Ok(Err(e)) => {
                    self.failed("broken");
                    return Err(UpstreamError::Failed(error_chain(&e)));
                }
                Err(_) => {
                    self.failed("timeout");
                    return Err(UpstreamError::Timeout(wait));
                }
            }
        }
    }

    fn build(&self, request: &Forward) -> Request<Full<Bytes>> {
        let url = &self.config.url;
        let uri = format!("{url}{}", request.path_and_query);
        let mut builder = Request::builder().method(request.method.clone()).uri(uri);
        if let Some(headers) = builder.headers_mut() {
            for (name, value) in &request.headers {
                // The client's credential is for the edge; the upstream gets the edge's own.
                if is_hop_by_hop(name)
                    || name == header::AUTHORIZATION
                    || name == header::CONTENT_LENGTH
                {
                    continue;
                }
                headers.append(name, value.clone());
            }
            if let Some(credential) = &self.credential {
                headers.insert(header::AUTHORIZATION, credential.clone());
            }
        }
        builder
            .body(Full::new(request.body.clone()))
            .expect("method, URI and headers were valid already")
    }

    fn respond(
        self: &Arc<Self>,
        response: hyper::Response<hyper::body::Incoming>,
        deadline: Instant,
        sse: bool,
    ) -> Response {
        let (mut parts, body) = response.into_parts();
        let hop: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|n| is_hop_by_hop(n))
            .cloned()
            .collect();
        for name in hop {
            parts.headers.remove(name);
        }
        let upstream = self.clone();
        let on_failure = Box::new(move |why: Failure| match why {
            Failure::Broken(e) => {
                upstream.failed("stream");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    format!("the upstream broke off the response: {e}"),
                )
            }
            Failure::Deadline => {
                upstream.failed("timeout");
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "the upstream's response passed the edge's total timeout",
                )
            }
        });
        let sse = sse && is_event_stream(&parts.headers);
        let body = Bounded::new(body, deadline, sse, on_failure);
        Response::from_parts(parts, Body::new(body))
    }

    /// A failed exchange: count it and tell the breaker.
    pub(super) fn failed(&self, kind: &str) {
        self.metrics
            .upstream_errors_total
            .with_label_values(&[kind])
            .inc();
        self.breaker.on_failure(std::time::Instant::now());
        self.publish_state();
    }

    fn publish_state(&self) {
        let state = self.breaker.state(std::time::Instant::now());
        self.metrics.circuit_state.set(state.gauge());
    }

    /// Probes readiness (and refreshes the model list) every `interval`, forever.
    pub async fn probe_forever(self: Arc<Self>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_ready = None;
        loop {
            ticks.tick().await;
            let verdict = self.probe(interval).await;
            let ready = verdict.is_ok();
            self.metrics.upstream_up.set(i64::from(ready));
            self.breaker.on_probe(ready, std::time::Instant::now());
            self.publish_state();
            if was_ready != Some(ready) {
                match verdict {
                    Ok(()) => tracing::info!(upstream = %self.config.url, "upstream is ready"),
                    Err(why) => {
                        tracing::warn!(upstream = %self.config.url, "upstream is not ready: {why}")
                    }
                }
                was_ready = Some(ready);
            }
        }
    }

    /// One probe: readiness, then the model list. A timeout or error is "not ready", and says
    /// why (a refused connection and an untrusted certificate need different fixes).
    async fn probe(&self, timeout: Duration) -> Result<(), String> {
        match self.get("/v2/health/ready", timeout).await? {
            (StatusCode::OK, _) => {}
            (status, _) => return Err(format!("its readiness probe answered {status}")),
        }
        let list = self
            .get("/v1/models", timeout)
            .await
            .ok()
            .filter(|(status, _)| *status == StatusCode::OK)
            .and_then(|(_, body)| serde_json::from_slice::<Value>(&body).ok())
            .and_then(|v| v.get("data").and_then(Value::as_array).cloned());
        if let Some(list) = list {
            *self.models.write().unwrap_or_else(|p| p.into_inner()) = Some(list);
        }
        Ok(())
    }

    async fn get(&self, path: &str, timeout: Duration) -> Result<(StatusCode, Bytes), String> {
        let request = Forward {
            method: Method::GET,
            path_and_query: path.to_string(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            model_label: String::new(),
            sse: false,
        };
        let exchange = async {
            let response = self
                .client
                .request(self.build(&request))
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| error_chain(&e))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", timeout.as_millis())))
    }
}

async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(25 << attempt.min(4))).await;
}

/// The error and its causes on one line (hyper's top-level messages alone say little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
