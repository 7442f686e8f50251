//! The edge tier over real HTTP: a real cloud `ember serve` and a real `ember edge` on loopback
//! with the real models, plus small fake upstreams (in this process) for what a healthy cloud
//! never does: stall, or show the edge's outgoing headers.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

const SERVED_BY: &str = "x-ember-served-by";

fn chat(content: &str, max_tokens: u64, stream: bool) -> Value {
    json!({"model": SMOLLM, "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0, "stream": stream})
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Until the edge's probe has fetched the upstream's model list.
async fn wait_for_upstream_models(edge: &Server) {
    wait_for(
        "the upstream's model list",
        Duration::from_secs(10),
        async || {
            let (_, list) = edge.get("/v1/models").await;
            list["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["served_by"] == "cloud" || m["upstream"] == true)
        },
    )
    .await;
}

fn gauge(metrics: &str, sample: &str) -> f64 {
    metric(metrics, sample).unwrap_or_else(|| panic!("no sample {sample}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_edge_serves_its_model_and_streams_the_heavy_one_from_the_cloud() {
    let cloud = Server::start_default().await;
    let edge = Server::start_edge(&repo_root().join("models"), &cloud.base, &[]).await;
    wait_for_upstream_models(&edge).await;

    // The encoder is edge-tier: served here, and still the real model.
    let reference = &reference_cases()[0];
    let r = edge
        .send(
            "/v1/embeddings",
            &json!({"model": MINILM, "input": reference.text}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, SERVED_BY), "edge");
    let body: Value = r.json().await.unwrap();
    let cos = cosine(&vector(&body["data"][0]["embedding"]), &reference.embedding);
    assert!(cos >= 0.9999, "cosine to the reference {cos}");

    // The generator is cloud-tier: forwarded, and its greedy output is llama.cpp's.
    let case = decisive_completion();
    let r = edge
        .send("/v1/completions", &greedy_stream_request(&case))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, SERVED_BY), "cloud");
    let events = Events::new(r).rest().await;
    assert_eq!(stream_text(&events), case["greedy_text"].as_str().unwrap());

    // Chunk by chunk: the first event is here while the cloud is still generating, and the
    // request id the client chose is the one the cloud used.
    let r = edge
        .client
        .post(edge.url("/v1/chat/completions"))
        .header("x-request-id", "edge-test-42")
        .json(&chat(
            "Write a long story about a lighthouse keeper.",
            200,
            true,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-request-id"), "edge-test-42");
    let mut events = Events::new(r);
    let first: Value = serde_json::from_str(&events.next().await.unwrap()).unwrap();
    assert_eq!(first["id"], "chatcmpl-edge-test-42", "the cloud saw the id");
    // The role chunk goes out before the sequence is admitted; wait for generated text.
    while delta_text(&events.next().await.expect("generated text")).is_empty() {}
    let running = gauge(
        &cloud.metrics().await,
        &format!("ember_running_sequences{{model=\"{SMOLLM}\"}}"),
    );
    assert_eq!(
        running, 1.0,
        "the first text arrived before generation ended"
    );
    let rest = events.rest().await;
    assert!(rest.len() > 10, "the stream came in {} events", rest.len());
    assert_eq!(rest.last().unwrap(), "[DONE]");

    // Without a client id, the edge makes one and the cloud uses it.
    let r = edge
        .send("/v1/chat/completions", &chat("Hi", 2, false))
        .await;
    let id = header(&r, "x-request-id").to_string();
    assert!(!id.is_empty());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["id"], format!("chatcmpl-{id}"));

    // KServe routes are placed by the model in the path.
    let r = edge
        .send(
            &format!("/v2/models/{SMOLLM}/infer"),
            &json!({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                  "data": ["Hello"]}], "parameters": {"max_tokens": 3}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, SERVED_BY), "cloud");
    let (status, meta) = edge.get(&format!("/v2/models/{MINILM}")).await;
    assert_eq!((status, meta["name"].as_str()), (200, Some(MINILM)));

    // The model list says where each model runs; a model unknown everywhere is a 404.
    let (_, list) = edge.get("/v1/models").await;
    let place = |id: &str| {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["served_by"].clone())
    };
    assert_eq!(place(MINILM), Some(json!("edge")));
    assert_eq!(place(SMOLLM), Some(json!("cloud")));
    let (status, body) = edge
        .post("/v1/embeddings", json!({"model": "nope", "input": "x"}))
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");

    let m = edge.metrics().await;
    let decisions = |model: &str, target: &str| {
        metric(
            &m,
            &format!(
                "ember_edge_routing_decisions_total{{model=\"{model}\",reason=\"tier\",target=\"{target}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    // The embedding and the metadata request.
    assert_eq!(decisions(MINILM, "local"), 2.0);
    assert!(decisions(SMOLLM, "upstream") >= 3.0);
    assert_eq!(gauge(&m, "ember_edge_circuit_state"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_death_ends_streams_cleanly_fails_fast_and_recovery_needs_no_restart() {
    let models = smollm_repository("");
    let cloud = Server::start(&models, &[]).await;
    let addr = cloud.base.trim_start_matches("http://").to_string();
    let edge_models = repository_with(&[("local-encoder", "")]);
    let edge = Server::start_edge(
        &edge_models,
        &cloud.base,
        &[
            "--upstream-probe-interval-ms",
            "200",
            "--circuit-open-ms",
            "2000",
        ],
    )
    .await;
    wait_for_upstream_models(&edge).await;

    // Killed mid-stream: the client's stream ends with an error event and [DONE], no hang.
    let r = edge
        .send(
            "/v1/chat/completions",
            &chat("Tell me everything about the ocean.", 400, true),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut events = Events::new(r);
    events.next().await.expect("a first event");
    drop(cloud);
    let rest = events.rest().await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_failed", "{error}");

    // Down: once the circuit is open, forwarded requests fail at once; local ones still work.
    wait_for("the circuit to open", Duration::from_secs(5), async || {
        metric(&edge.metrics().await, "ember_edge_circuit_state") == Some(2.0)
    })
    .await;
    let mut elapsed = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let r = edge
            .send("/v1/chat/completions", &chat("Hi", 4, false))
            .await;
        elapsed.push(started.elapsed());
        assert_eq!(r.status(), 503);
        let retry: u64 = header(&r, "retry-after").parse().unwrap();
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_unavailable");
    }
    elapsed.sort();
    assert!(
        elapsed[2] < Duration::from_millis(100),
        "an open circuit answers without waiting for the upstream: {elapsed:?}"
    );
    let m = edge.metrics().await;
    assert!(
        gauge(
            &m,
            "ember_edge_upstream_errors_total{kind=\"circuit_open\"}"
        ) >= 5.0
    );
    let r = edge
        .send(
            "/v1/embeddings",
            &json!({"model": "local-encoder", "input": "still here"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, SERVED_BY), "edge");
    let (status, _) = edge.get("/health/ready").await;
    assert_eq!(
        status, 200,
        "the edge stays ready: its own models still serve"
    );

    // Back on the same address: the probe closes the circuit and forwarding resumes.
    let _cloud = Server::start_at(&models, &addr, &[]).await;
    wait_for(
        "the circuit to close",
        Duration::from_secs(10),
        async || metric(&edge.metrics().await, "ember_edge_circuit_state") == Some(0.0),
    )
    .await;
    let r = edge
        .send("/v1/chat/completions", &chat("Hi", 4, false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, SERVED_BY), "cloud");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saturated_local_model_spills_to_the_cloud_and_returns_when_load_drops() {
    let cloud = Server::start(&repository_with(&[(MINILM, "")]), &[]).await;
    // One single-input instance: its queue grows as soon as a few clients send at once.
    let edge_models = repository_with(&[(
        MINILM,
        "max_batch_size = 1\ninstances = 1\nmax_queue_delay_ms = 0",
    )]);
    let edge = Server::start_edge(
        &edge_models,
        &cloud.base,
        &["--spill-queue-wait-ms", "5", "--compute-threads", "1"],
    )
    .await;
    wait_for_upstream_models(&edge).await;

    let text =
        "A gateway near the data answers small models itself and sends the rest on. ".repeat(4);
    let clients = (0..16).map(|_| {
        let (client, url, text) = (
            edge.client.clone(),
            edge.url("/v1/embeddings"),
            text.clone(),
        );
        async move {
            let mut served = Vec::new();
            for _ in 0..8 {
                let r = client
                    .post(&url)
                    .json(&json!({"model": MINILM, "input": text}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                served.push(header(&r, SERVED_BY).to_string());
            }
            served
        }
    });
    let served: Vec<String> = futures::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect();
    let spilled = served.iter().filter(|s| *s == "cloud").count();
    assert!(
        spilled > 0 && spilled < served.len(),
        "under load some requests spill and some stay: {spilled} of {} spilled",
        served.len()
    );
    let m = edge.metrics().await;
    let spills = gauge(
        &m,
        &format!(
            "ember_edge_routing_decisions_total{{model=\"{MINILM}\",reason=\"spillover\",target=\"upstream\"}}"
        ),
    );
    assert_eq!(spills as usize, spilled);

    // Load gone: the queue is empty, so the next request is local again.
    let r = edge
        .send("/v1/embeddings", &json!({"model": MINILM, "input": text}))
        .await;
    assert_eq!(header(&r, SERVED_BY), "edge");
}

/// A fake upstream on a free port: ready, serves `remote`, echoes the headers it received on
/// `/v1/chat/completions`, and stalls on `/v1/completions` (one SSE event, then nothing).
async fn fake_upstream() -> SocketAddr {
    async fn echo(headers: HeaderMap) -> Json<Value> {
        let get = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_string());
        Json(json!({"authorization": get("authorization"), "x-request-id": get("x-request-id")}))
    }
    async fn stall(Json(body): Json<Value>) -> axum::response::Response {
        if body["stream"] == true {
            let first = futures::stream::once(async {
                Ok::<_, std::convert::Infallible>("data: {\"choices\":[]}\n\n")
            });
            let body = first.chain(futures::stream::pending());
            (
                [("content-type", "text/event-stream")],
                axum::body::Body::from_stream(body),
            )
                .into_response()
        } else {
            futures::future::pending::<()>().await;
            unreachable!()
        }
    }
    let app = Router::new()
        .route(
            "/v2/health/ready",
            get(|| async { Json(json!({"ready": true})) }),
        )
        .route(
            "/v1/models",
            get(|| async { Json(json!({"object": "list", "data": [{"id": "remote"}]})) }),
        )
        .route("/v1/chat/completions", post(echo))
        .route("/v1/completions", post(stall));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn the_edge_presents_its_own_credential_and_bounds_a_stalled_upstream() {
    let upstream = fake_upstream().await;
    let edge = Server::start_edge(
        &repository_with(&[("local-encoder", "")]),
        &format!("http://{upstream}"),
        &[
            "--upstream-api-key",
            "edge-secret",
            "--upstream-first-byte-timeout-ms",
            "300",
            "--upstream-timeout-ms",
            "1500",
        ],
    )
    .await;

    let r = edge
        .client
        .post(edge.url("/v1/chat/completions"))
        .header("authorization", "Bearer client-secret")
        .header("x-request-id", "cred-1")
        .json(&json!({"model": "remote", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["authorization"], "Bearer edge-secret");
    assert_eq!(seen["x-request-id"], "cred-1");

    // No response headers in time: 504 in the API's shape.
    let r = edge
        .send(
            "/v1/completions",
            &json!({"model": "remote", "prompt": "x"}),
        )
        .await;
    assert_eq!(r.status(), 504);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");

    // A stream that stalls after its first event ends at the total timeout with an error event.
    let r = edge
        .send(
            "/v1/completions",
            &json!({"model": "remote", "prompt": "x", "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let events = Events::new(r).rest().await;
    assert_eq!(events.len(), 3, "{events:?}");
    let error: Value = serde_json::from_str(&events[1]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_timeout");
    assert_eq!(events[2], "[DONE]");
    let m = edge.metrics().await;
    assert!(gauge(&m, "ember_edge_upstream_errors_total{kind=\"timeout\"}") >= 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_a_config_file_and_bad_keys_are_named() {
    // The file also sets a size budget the encoder (87 MB) does not fit: it is forwarded.
    let upstream = fake_upstream().await;
    let dir = repository_with(&[("local-encoder", "")]);
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "upstream = \"http://{upstream}\"\nupstream_api_key = \"from-file\"\n\
             edge_max_model_mb = 50\n"
        ),
    )
    .unwrap();
    let edge = Server::spawn(&[
        "edge".into(),
        "--config".into(),
        config.display().to_string(),
        "--models".into(),
        dir.display().to_string(),
        "--addr".into(),
        "127.0.0.1:0".into(),
    ])
    .await;
    let r = edge
        .send(
            "/v1/chat/completions",
            &json!({"model": "remote", "messages": []}),
        )
        .await;
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["authorization"], "Bearer from-file");
    let (_, list) = edge.get("/v1/models").await;
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["id"] != "local-encoder"),
        "over the budget, the edge-tier encoder is not loaded here: {list}"
    );
    let r = edge
        .send(
            "/v1/embeddings",
            &json!({"model": "local-encoder", "input": "x"}),
        )
        .await;
    assert_eq!(header(&r, SERVED_BY), "cloud");

    std::fs::write(
        &config,
        "upstream = \"http://127.0.0.1:9\"\nupstreem_retries = 2\n",
    )
    .unwrap();
    let stderr = refused_start(&["edge", "--config", config.to_str().unwrap()], &[]);
    assert!(
        stderr.contains("unknown key `upstreem_retries`") && stderr.contains("edge.toml"),
        "{stderr}"
    );
}

/// Tensor models at the edge: a small classifier is served where it is, a cloud-tier one is
/// forwarded, binary tensor data and its header going through both ways untouched.
#[tokio::test(flavor = "multi_thread")]
async fn the_edge_serves_a_small_classifier_and_forwards_binary_tensors_of_a_heavy_one() {
    let repo = temp_repository();
    add_tensor_model(&repo, "digits-mlp", "");
    add_tensor_model(&repo, "digits-cnn", "");
    let cnn_toml = repo.join("digits-cnn").join("model.toml");
    let toml = std::fs::read_to_string(&cnn_toml).unwrap();
    std::fs::write(
        &cnn_toml,
        toml.replace("tier = \"edge\"", "tier = \"cloud\""),
    )
    .unwrap();
    let cloud = Server::start(&repo, &[]).await;
    let edge = Server::start_edge(&repo, &cloud.base, &[]).await;
    wait_for_upstream_models(&edge).await;
    let fixture = fixture("tensor_outputs.json");

    let mlp = &fixture["models"]["digits-mlp"];
    let features = &mlp["inputs"]["features"];
    let r = edge
        .send(
            "/v2/models/digits-mlp/infer",
            &json!({"inputs": [{"name": "features", "shape": features["shape"],
                                "datatype": "FP32", "data": features["data"]}]}),
        )
        .await;
    assert_eq!(header(&r, SERVED_BY), "edge");
    let body: Value = r.json().await.unwrap();
    let got = body["outputs"][0]["data"].as_array().unwrap();
    let want = mlp["outputs"]["probabilities"]["data"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() <= 1e-4);
    }

    let cnn = &fixture["models"]["digits-cnn"];
    let image = &cnn["inputs"]["image"];
    let payload: Vec<u8> = image["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| (v.as_f64().unwrap() as f32).to_le_bytes())
        .collect();
    let head = json!({"inputs": [{"name": "image", "shape": image["shape"], "datatype": "FP32",
                                  "parameters": {"binary_data_size": payload.len()}}],
                      "parameters": {"binary_data_output": true}})
    .to_string();
    let r = edge
        .client
        .post(edge.url("/v2/models/digits-cnn/infer"))
        .header("inference-header-content-length", head.len())
        .body([head.as_bytes(), &payload].concat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, SERVED_BY), "cloud");
    let json_len: usize = header(&r, "inference-header-content-length")
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    let want = cnn["outputs"]["probabilities"]["data"].as_array().unwrap();
    assert_eq!(bytes.len() - json_len, want.len() * 4);
    for (chunk, w) in bytes[json_len..].chunks_exact(4).zip(want) {
        let g = f32::from_le_bytes(chunk.try_into().unwrap()) as f64;
        assert!((g - w.as_f64().unwrap()).abs() <= 1e-4);
    }
}
