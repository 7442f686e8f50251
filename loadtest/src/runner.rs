//! Runs a scenario against a server: each concurrency level in turn, closed loop (every client
//! sends its next request when the last one is answered), bounded by the scenario's seconds and
//! request count per level. Embeddings requests are timed whole; chat requests are streamed and
//! timed to the first content chunk (TTFT) and per output token after it (TPOT).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::report::{LevelResult, Percentiles, RunResults, TrafficInfo, TrafficResult};
use crate::scenario::{Scenario, Traffic};
use crate::{check_loopback, load_tokenizer, texts, word_texts, xorshift};

/// Texts made per traffic entry; requests take them in turn.
const TEXTS_PER_TRAFFIC: usize = 512;

/// Where to send the load.
#[derive(Clone, Default)]
pub struct Target {
    /// Base URL, e.g. `http://127.0.0.1:8080` (routes are appended).
    pub url: String,
    /// Sent as `Authorization: Bearer <key>` when the server has keys.
    pub api_key: Option<String>,
    /// Allow a non-loopback URL (a Service inside a cluster); loopback only otherwise.
    pub allow_remote: bool,
    /// PEM CA certificate(s) an `https://` server must chain to (the only roots trusted).
    pub ca_cert: Option<std::path::PathBuf>,
}

/// One traffic entry, ready to send: its route and request bodies (serialised once).
struct Prepared {
    label: String,
    path: String,
    /// Headers of every request besides the scenario's own (content type, binary header length).
    headers: reqwest::header::HeaderMap,
    bodies: Vec<Vec<u8>>,
    streaming: bool,
    next_body: AtomicUsize,
}

/// How one request went.
struct Sample {
    traffic: usize,
    outcome: Result<Measured, String>,
}

#[derive(Default)]
struct Measured {
    latency_ms: f64,
    ttft_ms: Option<f64>,
    tpot_ms: Option<f64>,
    completion_tokens: usize,
    prompt_tokens: Option<usize>,
}

/// Runs every level of `scenario` against `target`; `on_level` sees each level as it ends
/// (to print the table as the run goes).
pub async fn run_scenario(
    scenario: &Scenario,
    target: &Target,
    mut on_level: impl FnMut(&LevelResult),
) -> anyhow::Result<RunResults> {
    scenario.validate()?;
    if !target.allow_remote {
        check_loopback(&target.url).context("pass --allow-remote to load a non-loopback URL")?;
    }
    let base = target.url.trim_end_matches('/').to_string();
    let scheme = reqwest::Url::parse(&base)
        .with_context(|| format!("--url {base:?}"))?
        .scheme()
        .to_string();
    let ca = match &target.ca_cert {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Some(reqwest::Certificate::from_pem(&pem).with_context(|| path.display().to_string())?)
        }
        None if scheme == "https" => bail!("an https:// URL needs --ca-cert (the CA it chains to)"),
        None => None,
    };
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &target.api_key {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let plan = Arc::new(Plan {
        base: base.clone(),
        headers,
        ca,
        timeout: Duration::from_secs_f64(scenario.request_timeout_secs),
        seconds_per_level: scenario.seconds_per_level,
        max_requests_per_level: scenario.max_requests_per_level,
        traffic: scenario
            .traffic
            .iter()
            .map(prepare)
            .collect::<anyhow::Result<_>>()?,
        weights: scenario.traffic.iter().map(|t| t.weight()).collect(),
    });
    let started_at_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut levels = Vec::new();
    for (index, &concurrency) in scenario.concurrency.iter().enumerate() {
        let level = run_level(plan.clone(), concurrency, index as u64).await?;
        on_level(&level);
        levels.push(level);
    }
    Ok(RunResults {
        scenario: scenario.name.clone(),
        description: scenario.description.clone(),
        url: base,
        started_at_unix_s,
        tool: format!("ember-loadtest {}", env!("CARGO_PKG_VERSION")),
        seconds_per_level: scenario.seconds_per_level,
        max_requests_per_level: scenario.max_requests_per_level,
        traffic: scenario
            .traffic
            .iter()
            .map(|t| TrafficInfo {
                label: t.label(),
                kind: t.kind().to_string(),
                model: t.model().to_string(),
                weight: t.weight(),
            })
            .collect(),
        levels,
    })
}

/// Makes a traffic entry's texts (exact token counts with its tokenizer) and request bodies.
fn prepare(traffic: &Traffic) -> anyhow::Result<Prepared> {
    Ok(match traffic {
        Traffic::Embeddings {
            model,
            tokenizer,
            tokens,
            inputs_per_request,
            ..
        } => {
            let tokenizer = load_tokenizer(tokenizer)?;
            let texts = texts(&tokenizer, *tokens, TEXTS_PER_TRAFFIC)?;
            let bodies = (0..TEXTS_PER_TRAFFIC)
                .map(|i| {
                    let input = if *inputs_per_request == 1 {
                        json!(texts[i])
                    } else {
                        json!((0..*inputs_per_request)
                            .map(|k| &texts[(i + k) % texts.len()])
                            .collect::<Vec<_>>())
                    };
                    serde_json::to_vec(&json!({"model": model, "input": input}))
                })
                .collect::<Result<_, _>>()?;
            Prepared {
                label: traffic.label(),
                path: "/v1/embeddings".into(),
                headers: json_headers(),
                bodies,
                streaming: false,
                next_body: AtomicUsize::new(0),
            }
        }
        Traffic::Chat {
            model,
            prompt_tokens,
            tokenizer,
            max_tokens,
            ..
        } => {
            let prompts = match tokenizer {
                Some(path) => texts(&load_tokenizer(path)?, *prompt_tokens, TEXTS_PER_TRAFFIC)?,
                None => word_texts(*prompt_tokens, TEXTS_PER_TRAFFIC),
            };
            let bodies = prompts
                .iter()
                .map(|prompt| {
                    serde_json::to_vec(&json!({
                        "model": model,
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "stream": true,
                        "stream_options": {"include_usage": true},
                    }))
                })
                .collect::<Result<_, _>>()?;
            Prepared {
                label: traffic.label(),
                path: "/v1/chat/completions".into(),
                headers: json_headers(),
                bodies,
                streaming: true,
                next_body: AtomicUsize::new(0),
            }
        }
        Traffic::Tensor {
            model,
            input,
            shape,
            rows_per_request,
            binary,
            ..
        } => {
            let mut random = xorshift(0x5eed);
            let mut dims = vec![*rows_per_request];
            dims.extend(shape);
            let count: usize = dims.iter().product();
            let mut headers = reqwest::header::HeaderMap::new();
            let bodies = (0..TENSOR_BODIES)
                .map(|_| {
                    let values: Vec<f32> = (0..count)
                        .map(|_| (random() % 1_000_000) as f32 / 1_000_000.0)
                        .collect();
                    let (body, header_length) = tensor_body(input, &dims, &values, *binary);
                    if let Some(length) = header_length {
                        headers.insert(HEADER_LENGTH, length.into());
                    }
                    body
                })
                .collect();
            let content_type = if *binary {
                "application/octet-stream"
            } else {
                "application/json"
            };
            headers.insert(
                reqwest::header::CONTENT_TYPE,
                reqwest::header::HeaderValue::from_static(content_type),
            );
            Prepared {
                label: traffic.label(),
                path: format!("/v2/models/{model}/infer"),
                headers,
                bodies,
                streaming: false,
                next_body: AtomicUsize::new(0),
            }
        }
    })
}

/// Request bodies made per tensor traffic entry; requests take them in turn.
const TENSOR_BODIES: usize = 64;
/// The KServe binary extension's header: the length of the JSON part of the body.
const HEADER_LENGTH: &str = "inference-header-content-length";

fn json_headers() -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::CONTENT_TYPE,
        reqwest::header::HeaderValue::from_static("application/json"),
    );
    headers
}

/// A KServe v2 request of one FP32 input: JSON `data`, or (binary) a JSON header followed by the
/// values little-endian, with the header's length to send as `Inference-Header-Content-Length`.
fn tensor_body(
    input: &str,
    shape: &[usize],
    values: &[f32],
    binary: bool,
) -> (Vec<u8>, Option<usize>) {
    if !binary {
        let body = json!({"inputs": [{"name": input, "shape": shape, "datatype": "FP32", "data": values}]});
        return (body.to_string().into_bytes(), None);
    }
    let header = json!({"inputs": [{"name": input, "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": values.len() * 4}}]})
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    (body, Some(header.len()))
}

/// What every level of a run shares: where to send, how, and what.
struct Plan {
    base: String,
    headers: reqwest::header::HeaderMap,
    ca: Option<reqwest::Certificate>,
    timeout: Duration,
    seconds_per_level: f64,
    max_requests_per_level: usize,
    traffic: Vec<Prepared>,
    weights: Vec<f64>,
}

async fn run_level(
    plan: Arc<Plan>,
    concurrency: usize,
    level_index: u64,
) -> anyhow::Result<LevelResult> {
    let mut client = reqwest::Client::builder()
        .default_headers(plan.headers.clone())
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true);
    if let Some(ca) = &plan.ca {
        client = client
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone());
    }
    let client = client.build()?;
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(plan.seconds_per_level);
    let budget = Arc::new(AtomicUsize::new(plan.max_requests_per_level));
    let mut workers = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let (client, plan, budget) = (client.clone(), plan.clone(), budget.clone());
        // A stream of its own per worker and level: the mix is reproducible run to run.
        let mut random = xorshift((level_index << 32) ^ ((worker as u64 + 1) * 0x9e37_79b9));
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < stop
                && budget
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                    .is_ok()
            {
                let traffic = pick(&plan.weights, random());
                let p = &plan.traffic[traffic];
                let body =
                    p.bodies[p.next_body.fetch_add(1, Ordering::Relaxed) % p.bodies.len()].clone();
                let request = client
                    .post(format!("{}{}", plan.base, p.path))
                    .headers(p.headers.clone())
                    .timeout(plan.timeout)
                    .body(body);
                let outcome = if p.streaming {
                    send_streaming(request).await
                } else {
                    send_whole(request).await
                };
                samples.push(Sample { traffic, outcome });
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await.context("a load worker panicked")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(summarise(&plan.traffic, concurrency, seconds, &samples))
}

/// Picks a traffic entry by weight from a random number.
fn pick(weights: &[f64], random: usize) -> usize {
    if weights.len() == 1 {
        return 0;
    }
    let total: f64 = weights.iter().sum();
    let mut x = (random % 1_000_000) as f64 / 1_000_000.0 * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

fn classify(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "broken"
    }
    .to_string()
}

/// A request answered in one body: timed until the whole body has arrived.
async fn send_whole(request: reqwest::RequestBuilder) -> Result<Measured, String> {
    let t0 = Instant::now();
    let response = request.send().await.map_err(|e| classify(&e))?;
    let status = response.status();
    let body = response.bytes().await;
    if !status.is_success() {
        return Err(status.as_u16().to_string());
    }
    body.map_err(|e| classify(&e))?;
    Ok(Measured {
        latency_ms: t0.elapsed().as_secs_f64() * 1000.0,
        ..Measured::default()
    })
}

/// A streamed chat completion: server-sent events until `data: [DONE]`.
async fn send_streaming(request: reqwest::RequestBuilder) -> Result<Measured, String> {
    let t0 = Instant::now();
    let response = request.send().await.map_err(|e| classify(&e))?;
    let status = response.status();
    if !status.is_success() {
        let _ = response.bytes().await;
        return Err(status.as_u16().to_string());
    }
    let mut stream = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let (mut first, mut last, mut chunks) = (None::<Instant>, None::<Instant>, 0usize);
    let mut usage: Option<(usize, usize)> = None;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| classify(&e))?;
        let now = Instant::now();
        buffer.extend_from_slice(&piece);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let Some(data) = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim().strip_prefix("data:"))
                .map(str::trim)
            else {
                continue;
            };
            if data == "[DONE]" {
                let (first, last) = match (first, last) {
                    (Some(f), Some(l)) => (f, l),
                    // A stream with no text at all: nothing to time per token.
                    _ => (now, now),
                };
                let completion = usage.map_or(chunks, |(_, c)| c);
                return Ok(Measured {
                    latency_ms: t0.elapsed().as_secs_f64() * 1000.0,
                    ttft_ms: (chunks > 0).then(|| (first - t0).as_secs_f64() * 1000.0),
                    tpot_ms: (completion >= 2)
                        .then(|| (last - first).as_secs_f64() * 1000.0 / (completion - 1) as f64),
                    completion_tokens: completion,
                    prompt_tokens: usage.map(|(p, _)| p),
                });
            }
            let event: Value = serde_json::from_str(data).map_err(|_| "broken".to_string())?;
            if event.get("error").is_some() {
                return Err("stream_error".to_string());
            }
            if let Some(u) = event.get("usage").filter(|u| u.is_object()) {
                let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
                usage = Some((n("prompt_tokens"), n("completion_tokens")));
            }
            let has_text = event["choices"].as_array().into_iter().flatten().any(|c| {
                c["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            });
            if has_text {
                chunks += 1;
                first.get_or_insert(now);
                last = Some(now);
            }
        }
    }
    // The body ended without `[DONE]`.
    Err("broken".to_string())
}

fn summarise(
    prepared: &[Prepared],
    concurrency: usize,
    seconds: f64,
    samples: &[Sample],
) -> LevelResult {
    let errors_of = |traffic: Option<usize>| {
        let mut errors = BTreeMap::new();
        for s in samples {
            if let (Err(cause), true) = (&s.outcome, traffic.is_none_or(|t| t == s.traffic)) {
                *errors.entry(cause.clone()).or_insert(0) += 1;
            }
        }
        errors
    };
    let ok: Vec<(usize, &Measured)> = samples
        .iter()
        .filter_map(|s| s.outcome.as_ref().ok().map(|m| (s.traffic, m)))
        .collect();
    let all_latencies: Vec<f64> = ok.iter().map(|(_, m)| m.latency_ms).collect();
    let traffic = (0..prepared.len())
        .map(|t| {
            let mine: Vec<&Measured> = ok
                .iter()
                .filter(|(i, _)| *i == t)
                .map(|(_, m)| *m)
                .collect();
            let latencies: Vec<f64> = mine.iter().map(|m| m.latency_ms).collect();
            let streaming = prepared[t].streaming;
            let collect = |f: fn(&Measured) -> Option<f64>| {
                Percentiles::of(&mine.iter().filter_map(|m| f(m)).collect::<Vec<_>>())
            };
            let prompt: Vec<f64> = mine
                .iter()
                .filter_map(|m| m.prompt_tokens.map(|p| p as f64))
                .collect();
            TrafficResult {
                label: prepared[t].label.clone(),
                requests: mine.len(),
                errors: errors_of(Some(t)),
                requests_per_s: mine.len() as f64 / seconds,
                latency_ms: Percentiles::of(&latencies),
                ttft_ms: streaming.then(|| collect(|m| m.ttft_ms)),
                tpot_ms: streaming.then(|| collect(|m| m.tpot_ms)),
                output_tokens_per_s: streaming.then(|| {
                    mine.iter().map(|m| m.completion_tokens).sum::<usize>() as f64 / seconds
                }),
                prompt_tokens_mean: (streaming && !prompt.is_empty())
                    .then(|| prompt.iter().sum::<f64>() / prompt.len() as f64),
            }
        })
        .collect();
    LevelResult {
        concurrency,
        seconds,
        requests: ok.len(),
        errors: errors_of(None),
        requests_per_s: ok.len() as f64 / seconds,
        latency_ms: Percentiles::of(&all_latencies),
        traffic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_tensor_bodies_are_a_json_header_then_little_endian_floats() {
        let (body, header) = tensor_body("x", &[1, 2], &[1.5, -2.0], true);
        let header = header.unwrap();
        let json: Value = serde_json::from_slice(&body[..header]).unwrap();
        assert_eq!(json["inputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(json["inputs"][0]["shape"], json!([1, 2]));
        assert_eq!(
            &body[header..],
            [1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat()
        );
        let (body, header) = tensor_body("x", &[1, 2], &[1.5, -2.0], false);
        assert_eq!(header, None);
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["inputs"][0]["data"], json!([1.5, -2.0]));
    }

    #[test]
    fn pick_follows_the_weights() {
        let weights = [3.0, 1.0];
        let mut random = xorshift(7);
        let mut counts = [0usize; 2];
        for _ in 0..40_000 {
            counts[pick(&weights, random())] += 1;
        }
        let share = counts[0] as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "{counts:?}");
        assert_eq!(pick(&[1.0], 12345), 0);
    }

    #[tokio::test]
    async fn a_remote_url_needs_allow_remote() {
        let scenario: Scenario = toml::from_str(
            "name = \"s\"\nconcurrency = [1]\nseconds_per_level = 1\nmax_requests_per_level = 1\n\
             [[traffic]]\nkind = \"chat\"\nmodel = \"m\"\nprompt_tokens = 4\nmax_tokens = 4\n",
        )
        .unwrap();
        let target = Target {
            // A cluster name that does not resolve here: nothing could be sent even if the
            // guard failed.
            url: "http://ember-cloud.inference.svc:8080".into(),
            ..Target::default()
        };
        let e = run_scenario(&scenario, &target, |_| {}).await.unwrap_err();
        assert!(format!("{e:#}").contains("--allow-remote"), "{e:#}");
    }
}
