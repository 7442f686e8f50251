//! Every Prometheus metric Ember exports, defined and registered once, in one registry per server.
//!
//! Names follow `ember_<what>_<unit>`; labels are bounded (model names come from the repository,
//! routes from the router's templates), never a request id or raw text.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency of a whole HTTP request: sub-millisecond health checks up to long batches.
const REQUEST_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Time waiting in a queue: from microseconds (idle server) to seconds (overload).
const QUEUE_SECONDS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// One forward pass: a few milliseconds for a short batch up to seconds for a long one on CPU.
const INFERENCE_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
const BATCH_ITEMS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const BATCH_TOKENS: &[f64] = &[
    16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    queue_duration_seconds: HistogramVec,
    inference_duration_seconds: HistogramVec,
    batch_size_items: HistogramVec,
    batch_size_tokens: HistogramVec,
    queue_depth_items: IntGaugeVec,
    cancelled_items_total: IntCounterVec,
    pub model_load_seconds: prometheus::GaugeVec,
    pub model_parameters: IntGaugeVec,
    pub ready: IntGauge,
}

/// The batcher's metrics for one model, with the label already bound so the hot path does no
/// label lookups.
#[derive(Clone)]
pub struct BatcherMetrics {
    pub queue_duration_seconds: Histogram,
    pub inference_duration_seconds: Histogram,
    pub batch_size_items: Histogram,
    pub batch_size_tokens: Histogram,
    pub queue_depth_items: IntGauge,
    pub cancelled_items_total: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn histogram(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid histogram definition")
        }
        let m = Self {
            requests_total: IntCounterVec::new(
                Opts::new(
                    "ember_requests_total",
                    "HTTP requests by model, route and status.",
                ),
                &["model", "route", "status"],
            )
            .expect("valid counter"),
            request_duration_seconds: histogram(
                "ember_request_duration_seconds",
                "HTTP request latency, from the request's arrival to its response.",
                REQUEST_SECONDS,
                &["model", "route"],
            ),
            queue_duration_seconds: histogram(
                "ember_queue_duration_seconds",
                "Time an input waited in its model's queue before its batch started.",
                QUEUE_SECONDS,
                &["model"],
            ),
            inference_duration_seconds: histogram(
                "ember_inference_duration_seconds",
                "Duration of one batched forward pass.",
                INFERENCE_SECONDS,
                &["model"],
            ),
            batch_size_items: histogram(
                "ember_batch_size_items",
                "Inputs in one batched forward pass.",
                BATCH_ITEMS,
                &["model"],
            ),
            batch_size_tokens: histogram(
                "ember_batch_size_tokens",
                "Tokens in one batched forward pass, counted padded.",
                BATCH_TOKENS,
                &["model"],
            ),
            queue_depth_items: IntGaugeVec::new(
                Opts::new(
                    "ember_queue_depth_items",
                    "Inputs waiting in the model's queue.",
                ),
                &["model"],
            )
            .expect("valid gauge"),
            cancelled_items_total: IntCounterVec::new(
                Opts::new(
                    "ember_cancelled_items_total",
                    "Inputs dropped before compute because their client went away.",
                ),
                &["model"],
            )
            .expect("valid counter"),
            model_load_seconds: prometheus::GaugeVec::new(
                Opts::new(
                    "ember_model_load_seconds",
                    "Time it took to load the model.",
                ),
                &["model"],
            )
            .expect("valid gauge"),
            model_parameters: IntGaugeVec::new(
                Opts::new("ember_model_parameters", "Parameters of the loaded model."),
                &["model"],
            )
            .expect("valid gauge"),
            ready: IntGauge::new(
                "ember_ready",
                "1 when every model is loaded and the server is not draining.",
            )
            .expect("valid gauge"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests_total.clone()),
            Box::new(m.request_duration_seconds.clone()),
            Box::new(m.queue_duration_seconds.clone()),
            Box::new(m.inference_duration_seconds.clone()),
            Box::new(m.batch_size_items.clone()),
            Box::new(m.batch_size_tokens.clone()),
            Box::new(m.queue_depth_items.clone()),
            Box::new(m.cancelled_items_total.clone()),
            Box::new(m.model_load_seconds.clone()),
            Box::new(m.model_parameters.clone()),
            Box::new(m.ready.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("each metric is registered once");
        }
        m
    }

    pub fn batcher(&self, model: &str) -> BatcherMetrics {
        BatcherMetrics {
            queue_duration_seconds: self.queue_duration_seconds.with_label_values(&[model]),
            inference_duration_seconds: self.inference_duration_seconds.with_label_values(&[model]),
            batch_size_items: self.batch_size_items.with_label_values(&[model]),
            batch_size_tokens: self.batch_size_tokens.with_label_values(&[model]),
            queue_depth_items: self.queue_depth_items.with_label_values(&[model]),
            cancelled_items_total: self.cancelled_items_total.with_label_values(&[model]),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl BatcherMetrics {
    /// Metrics bound to a registry nobody reads, for tests of the batcher alone.
    pub fn detached() -> Self {
        Metrics::new().batcher("test")
    }
}
