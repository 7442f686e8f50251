//! The edge tier: serves the repository's edge models on the gateway and forwards everything
//! else to the cloud tier, deciding per request (DESIGN.md, "Edge placement").
//!
//! [`placement`] is the decision, [`breaker`] the upstream's circuit, [`upstream`] the client
//! and its probe, [`routes`] the HTTP glue.

mod breaker;
mod placement;
mod routes;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;

pub use breaker::{BreakerConfig, CircuitState};
pub use placement::{Placement, Reason, SpillPolicy};
pub use upstream::{retry_secs, UpstreamConfig, UpstreamError};

use crate::config::EdgeArgs;
use crate::repository::{ModelSpec, Tier};
use crate::server::AppState;

/// Which models of the repository run here: edge-tier models within the size budget. Logs
/// each model's place.
pub fn local_specs(specs: Vec<ModelSpec>, budget_mb: Option<u64>) -> Vec<ModelSpec> {
    specs
        .into_iter()
        .filter(|spec| {
            if spec.tier != Tier::Edge {
                tracing::info!(model = %spec.name, "forwarded upstream: tier cloud");
                return false;
            }
            let Some(budget) = budget_mb else {
                return true;
            };
            let mb = spec.weights_bytes().div_ceil(1 << 20);
            if mb > budget {
                tracing::info!(model = %spec.name, weights_mb = mb, budget_mb = budget,
                    "forwarded upstream: weights over the edge's size budget");
                return false;
            }
            true
        })
        .collect()
}

/// The edge's application: placement routes over the local models and the upstream, plus the
/// server's own routes; starts the upstream's readiness probe.
pub fn app(args: &EdgeArgs, state: &AppState) -> Result<Router, String> {
    let metrics = state.metrics.edge();
    let config = UpstreamConfig {
        url: args.upstream.clone(),
        #[cfg(feature = "tls")]
        ca: args.upstream_ca.clone(),
        credential: args
            .upstream_api_key
            .as_ref()
            .map(|k| k.expose().to_owned()),
        connect_timeout: Duration::from_millis(args.upstream_connect_timeout_ms),
        first_byte_timeout: Duration::from_millis(args.upstream_first_byte_timeout_ms),
        total_timeout: Duration::from_millis(args.upstream_timeout_ms),
        retries: args.upstream_retries,
        breaker: BreakerConfig {
            failure_threshold: args.circuit_failure_threshold,
            open_for: Duration::from_millis(args.circuit_open_ms),
        },
    };
    #[cfg(feature = "tls")]
    if args.upstream_ca.is_some() && !args.upstream.tls {
        tracing::warn!(upstream = %args.upstream, "--upstream-ca is set but the upstream is plain http://; it is not used");
    }
    let upstream = Arc::new(upstream::Upstream::new(config, metrics)?);
    tokio::spawn(
        upstream
            .clone()
            .probe_forever(Duration::from_millis(args.upstream_probe_interval_ms)),
    );
    tracing::info!(upstream = %args.upstream, spillover = args.spillover,
        spill_queue_wait_ms = args.spill_queue_wait_ms, "edge tier: forwarding to the upstream");
    let edge = routes::Edge::new(
        state.clone(),
        upstream,
        SpillPolicy {
            enabled: args.spillover,
            threshold: Duration::from_millis(args.spill_queue_wait_ms),
        },
    );
    Ok(routes::router(edge, state))
}
