//! The serve loop: accepts connections through the listener stack (the connection limit, then
//! TLS when configured), serves each with hyper's HTTP/1.1, and drains on shutdown. It is
//! axum's `serve` plus what that cannot set: hyper's timer, so a connection that sends no
//! request head within the idle timeout (an idle keep-alive connection, a slow-header client)
//! is closed and frees its slot.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::connections::{self, PeerAddr};
use super::AppState;

/// TLS for the listener; without the `tls` feature there is none to give.
#[cfg(feature = "tls")]
pub use super::tls::Tls;
#[cfg(not(feature = "tls"))]
pub enum Tls {}

/// Serves on `listener` (over TLS when given) until `shutdown` resolves, then drains:
/// readiness goes false, new inference is refused, in-flight requests get up to `grace` to
/// finish.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Tls>,
    app: Router,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    // Responses and SSE events go out as they are written, not after Nagle's delay.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    match tls {
        None => serve_until(listener, app, state, shutdown, grace).await,
        #[cfg(feature = "tls")]
        Some(tls) => serve_until(tls.listener(listener), app, state, shutdown, grace).await,
        #[cfg(not(feature = "tls"))]
        Some(never) => match never {},
    }
}

/// Serves connections from `listener` under the connection limit, which sits above TLS: a
/// refusal is an HTTPS answer too.
async fn serve_until<L>(
    listener: L,
    app: Router,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
{
    let (drain_tx, mut drain_rx) = tokio::sync::watch::channel(false);
    let health = state.health.clone();
    let metrics = state.metrics.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "shutting down: draining in-flight requests"
        );
        health.start_draining();
        metrics.ready.set(0);
        let _ = drain_tx.send(true);
    });

    let mut listener = connections::Limited::new(listener, state.limits.max_connections);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(state.limits.idle_timeout);
    let connections = GracefulShutdown::new();
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain_rx.wait_for(|draining| *draining) => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: axum::http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
            tower::ServiceExt::oneshot(app.clone(), req.map(Body::new))
        });
        let connection = connections.watch(http.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            // Resets, timeouts and malformed requests end one connection; nothing to report.
            if let Err(e) = connection.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    // New connections are refused from here; idle keep-alive connections close at once, busy
    // ones after their current response.
    drop(listener);
    if tokio::time::timeout(grace, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the connections still open");
    }
    Ok(())
}
