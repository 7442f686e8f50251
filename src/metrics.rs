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
/// Time to first token: a short prompt's prefill up to a long wait for admission.
const TTFT_SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
];
/// Time per output token: a few milliseconds (small model, few streams) to a second.
const TPOT_SECONDS: &[f64] = &[
    0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
];
/// A whole generation: up to minutes for long outputs.
const GENERATION_SECONDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
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
    pub model_load_failed: IntGaugeVec,
    pub ready: IntGauge,
    cpu_kernels_info: IntGaugeVec,
    time_to_first_token_seconds: HistogramVec,
    time_per_output_token_seconds: HistogramVec,
    generation_duration_seconds: HistogramVec,
    prompt_tokens_total: IntCounterVec,
    prompt_cached_tokens_total: IntCounterVec,
    generated_tokens_total: IntCounterVec,
    running_sequences: IntGaugeVec,
    kv_cache_tokens: IntGaugeVec,
    kv_cache_usage_ratio: prometheus::GaugeVec,
}

/// The generation scheduler's metrics for one model, labels bound. Per-step figures (step
/// duration, sequences and tokens per step, waiting requests, cancellations) reuse the batcher's
/// metrics, so one dashboard reads both kinds of model.
#[derive(Clone)]
pub struct GenerateMetrics {
    pub batch: BatcherMetrics,
    pub time_to_first_token_seconds: Histogram,
    pub time_per_output_token_seconds: Histogram,
    pub generation_duration_seconds: Histogram,
    pub prompt_tokens_total: IntCounter,
    /// Prompt tokens taken from the prefix cache instead of computed.
    pub prompt_cached_tokens_total: IntCounter,
    pub generated_tokens_total: IntCounter,
    pub running_sequences: IntGauge,
    /// Tokens of KV cache reserved: by running sequences (prompt + max_tokens each) and by the
    /// prompts the prefix cache keeps.
    pub kv_cache_tokens: IntGauge,
    pub kv_cache_usage_ratio: prometheus::Gauge,
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
            model_load_failed: IntGaugeVec::new(
                Opts::new(
                    "ember_model_load_failed",
                    "1 for a model of the repository that failed to load (the log says why); \
                     the server serves the others.",
                ),
                &["model"],
            )
            .expect("valid gauge"),
            ready: IntGauge::new(
                "ember_ready",
                "1 when the server is ready: models loaded (see --strict-readiness) and not draining.",
            )
            .expect("valid gauge"),
            cpu_kernels_info: IntGaugeVec::new(
                Opts::new(
                    "ember_cpu_kernels_info",
                    "1, labelled with the widest instruction set Ember's CPU kernels use here and \
                     the --cpu-isa cap (none: all the CPU has).",
                ),
                &["isa", "cap"],
            )
            .expect("valid gauge"),
            time_to_first_token_seconds: histogram(
                "ember_time_to_first_token_seconds",
                "From a generation request's arrival to its first generated token.",
                TTFT_SECONDS,
                &["model"],
            ),
            time_per_output_token_seconds: histogram(
                "ember_time_per_output_token_seconds",
                "Mean time between generated tokens after the first, per request.",
                TPOT_SECONDS,
                &["model"],
            ),
            generation_duration_seconds: histogram(
                "ember_generation_duration_seconds",
                "A generation request end to end, arrival to last token.",
                GENERATION_SECONDS,
                &["model"],
            ),
            prompt_tokens_total: IntCounterVec::new(
                Opts::new(
                    "ember_prompt_tokens_total",
                    "Prompt tokens prefilled (computed; cached ones are counted apart).",
                ),
                &["model"],
            )
            .expect("valid counter"),
            prompt_cached_tokens_total: IntCounterVec::new(
                Opts::new(
                    "ember_prompt_cached_tokens_total",
                    "Prompt tokens whose KV cache came from the prefix cache instead of a forward pass.",
                ),
                &["model"],
            )
            .expect("valid counter"),
            generated_tokens_total: IntCounterVec::new(
                Opts::new("ember_generated_tokens_total", "Tokens generated."),
                &["model"],
            )
            .expect("valid counter"),
            running_sequences: IntGaugeVec::new(
                Opts::new(
                    "ember_running_sequences",
                    "Sequences admitted and decoding (waiting ones are ember_queue_depth_items).",
                ),
                &["model"],
            )
            .expect("valid gauge"),
            kv_cache_tokens: IntGaugeVec::new(
                Opts::new(
                    "ember_kv_cache_tokens",
                    "KV-cache tokens reserved by running sequences.",
                ),
                &["model"],
            )
            .expect("valid gauge"),
            kv_cache_usage_ratio: prometheus::GaugeVec::new(
                Opts::new(
                    "ember_kv_cache_usage_ratio",
                    "Reserved KV-cache tokens over the model's max_total_tokens.",
                ),
                &["model"],
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
            Box::new(m.model_load_failed.clone()),
            Box::new(m.ready.clone()),
            Box::new(m.cpu_kernels_info.clone()),
            Box::new(m.time_to_first_token_seconds.clone()),
            Box::new(m.time_per_output_token_seconds.clone()),
            Box::new(m.generation_duration_seconds.clone()),
            Box::new(m.prompt_tokens_total.clone()),
            Box::new(m.prompt_cached_tokens_total.clone()),
            Box::new(m.generated_tokens_total.clone()),
            Box::new(m.running_sequences.clone()),
            Box::new(m.kv_cache_tokens.clone()),
            Box::new(m.kv_cache_usage_ratio.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("each metric is registered once");
        }
        m
    }

    /// Records which CPU kernels this process runs (after any cap was set).
    pub fn set_cpu_kernels(&self, isa: &str, cap: &str) {
        self.cpu_kernels_info.with_label_values(&[isa, cap]).set(1);
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

    pub fn generate(&self, model: &str) -> GenerateMetrics {
        let l = &[model];
        GenerateMetrics {
            batch: self.batcher(model),
            time_to_first_token_seconds: self.time_to_first_token_seconds.with_label_values(l),
            time_per_output_token_seconds: self.time_per_output_token_seconds.with_label_values(l),
            generation_duration_seconds: self.generation_duration_seconds.with_label_values(l),
            prompt_tokens_total: self.prompt_tokens_total.with_label_values(l),
            prompt_cached_tokens_total: self.prompt_cached_tokens_total.with_label_values(l),
            generated_tokens_total: self.generated_tokens_total.with_label_values(l),
            running_sequences: self.running_sequences.with_label_values(l),
            kv_cache_tokens: self.kv_cache_tokens.with_label_values(l),
            kv_cache_usage_ratio: self.kv_cache_usage_ratio.with_label_values(l),
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

/// The edge tier's placement and forwarding metrics; labels bound per use.
#[derive(Clone)]
pub struct EdgeMetrics {
    /// `model`, `target` (local|upstream), `reason` (tier|spillover|fallback).
    pub routing_decisions_total: IntCounterVec,
    /// Time from sending a forwarded request to the upstream's response headers, by model.
    pub upstream_response_seconds: HistogramVec,
    /// `kind`: connect, broken (sent, then the connection failed before the response), timeout, status (a 5xx answer), stream (broken mid-body), circuit_open.
    pub upstream_errors_total: IntCounterVec,
    /// 0 closed, 1 half-open, 2 open.
    pub circuit_state: IntGauge,
    /// 1 while the last readiness probe of the upstream succeeded.
    pub upstream_up: IntGauge,
}

impl Metrics {
    /// Creates and registers the edge's metrics; call once per server.
    pub fn edge(&self) -> EdgeMetrics {
        let m = EdgeMetrics {
            routing_decisions_total: IntCounterVec::new(
                Opts::new(
                    "ember_edge_routing_decisions_total",
                    "Where the edge sent each inference request, and why.",
                ),
                &["model", "target", "reason"],
            )
            .expect("valid counter"),
            upstream_response_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "ember_edge_upstream_response_seconds",
                    "Time from forwarding a request to the upstream's response headers.",
                )
                .buckets(REQUEST_SECONDS.to_vec()),
                &["model"],
            )
            .expect("valid histogram"),
            upstream_errors_total: IntCounterVec::new(
                Opts::new(
                    "ember_edge_upstream_errors_total",
                    "Forwarding failures by kind (connect, broken, timeout, status, stream, circuit_open).",
                ),
                &["kind"],
            )
            .expect("valid counter"),
            circuit_state: IntGauge::new(
                "ember_edge_circuit_state",
                "The upstream's circuit breaker: 0 closed, 1 half-open, 2 open.",
            )
            .expect("valid gauge"),
            upstream_up: IntGauge::new(
                "ember_edge_upstream_up",
                "1 while the upstream's last readiness probe succeeded.",
            )
            .expect("valid gauge"),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.routing_decisions_total.clone()),
            Box::new(m.upstream_response_seconds.clone()),
            Box::new(m.upstream_errors_total.clone()),
            Box::new(m.circuit_state.clone()),
            Box::new(m.upstream_up.clone()),
        ];
        for c in collectors {
            self.registry
                .register(c)
                .expect("the edge's metrics are registered once");
        }
        m
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

impl GenerateMetrics {
    /// Metrics bound to a registry nobody reads, for tests of the scheduler alone.
    pub fn detached() -> Self {
        Metrics::new().generate("test")
    }
}
