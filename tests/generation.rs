//! Text generation over real HTTP with the real SmolLM2-135M-Instruct GGUF: chat and completions,
//! streaming, batching that does not change results, cancellation, and errors.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

/// A server with only the generation model, so these tests do not pay for the encoder.
async fn server(generate_table: &str) -> Server {
    server_with(generate_table, &[]).await
}

async fn server_with(generate_table: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--compute-threads", "2"];
    args.extend(extra);
    Server::start(&smollm_repository(generate_table), &args).await
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({"model": SMOLLM, "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0})
}

/// A greedy completion of 24 tokens, the length of llama.cpp's reference trajectories.
async fn greedy_completion(server: &Server, prompt: &Value) -> (u16, Value) {
    server
        .post(
            "/v1/completions",
            json!({"model": SMOLLM, "prompt": prompt, "max_tokens": 24, "temperature": 0}),
        )
        .await
}

/// A completion case of the reference fixture: the greedy text is llama.cpp's, 24 tokens from
/// the prompt's tokens. Returns the answer.
async fn completion_equals_llama_cpp(server: &Server, case: &Value) -> Value {
    let (status, body) = greedy_completion(server, &case["prompt"]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["text"], case["greedy_text"],
        "{}",
        case["prompt"]
    );
    assert_eq!(body["usage"]["completion_tokens"], 24);
    assert_eq!(
        body["usage"]["prompt_tokens"],
        case["prompt_ids"].as_array().unwrap().len()
    );
    body
}

/// A chat case of the reference fixture: the greedy answer is llama.cpp's, 24 tokens or up to
/// EOS, with the finish reason to match. Returns the answer.
async fn chat_equals_llama_cpp(server: &Server, case: &Value) -> Value {
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            json!({"model": SMOLLM, "messages": case["messages"], "max_tokens": 24,
                   "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"], case["greedy_text"],
        "{}",
        case["prompt"]
    );
    let stopped = case["stopped_at_eos"].as_bool().unwrap();
    assert_eq!(
        body["choices"][0]["finish_reason"],
        if stopped { "stop" } else { "length" }
    );
    body
}

/// Sends a streaming request and returns the parsed `data:` payloads (the last is `[DONE]`).
async fn stream(server: &Server, path: &str, body: Value) -> Vec<String> {
    let response = server
        .client
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The text of a streamed chat, and the finish reason of its last chunk.
fn streamed_chat_text(events: &[String]) -> (String, String) {
    let mut text = String::new();
    let mut finish = String::new();
    for e in events.iter().take_while(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, finish)
}

#[tokio::test]
async fn completions_and_chat_equal_llama_cpp_greedy() {
    greedy_equals_llama_cpp(&server("").await).await;
}

/// What CPUs without AVX-512 run (`--cpu-isa avx2`: the AVX2 forms of the quantized matmuls,
/// attention, softmax and SwiGLU), and what AVX-512 CPUs without VNNI run (`avx512-core`,
/// Skylake-SP: AVX2 quantized matmuls beside AVX-512 attention), give llama.cpp's tokens too,
/// near ties included.
#[tokio::test]
async fn the_narrower_kernels_equal_llama_cpp_greedy_too() {
    for cap in ["avx2", "avx512-core"] {
        let server = server_with("", &["--cpu-isa", cap]).await;
        assert_capped(&server, cap).await;
        greedy_equals_llama_cpp(&server).await;
    }
}

/// Portable code (`--cpu-isa portable`: what Arm CPUs, and x86 ones without AVX2, run) gives
/// llama.cpp's tokens at its nearest ties: the completion and the three chats with the smallest
/// top-two margins (0.0026–0.0135 logits). The whole set takes 200 s this way, too long for CI.
#[tokio::test]
async fn the_portable_kernels_equal_llama_cpp_greedy_at_the_nearest_ties() {
    let server = server_with("", &["--cpu-isa", "portable"]).await;
    assert_capped(&server, "portable").await;
    let f = fixture("smollm2_greedy.json");
    let nearest = |kind: &str, n: usize| {
        let smallest = |case: &Value| margins(case).into_iter().fold(f64::MAX, f64::min);
        let mut cases = f[kind].as_array().unwrap().clone();
        cases.sort_by(|a, b| smallest(a).total_cmp(&smallest(b)));
        cases.truncate(n);
        cases
    };
    for case in nearest("completion", 1) {
        completion_equals_llama_cpp(&server, &case).await;
    }
    for case in nearest("chat", 3) {
        chat_equals_llama_cpp(&server, &case).await;
    }
}

async fn greedy_equals_llama_cpp(server: &Server) {
    let f = fixture("smollm2_greedy.json");
    // Prompt tokens each answer says came from the prefix cache, summed.
    let mut cached_in_usage = 0;
    let mut add_cached = |body: &Value| {
        let n = body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("usage without prompt_tokens_details.cached_tokens: {body}"));
        assert!(n + 2 <= body["usage"]["prompt_tokens"].as_u64().unwrap() || n == 0);
        cached_in_usage += n;
    };
    // Every case, near ties included: the CPU forward pass does llama.cpp's arithmetic
    // operation for operation (engine/generate/ggml.rs), so greedy picks its tokens.
    for case in f["completion"].as_array().unwrap() {
        add_cached(&completion_equals_llama_cpp(server, case).await);
    }
    // Chats (issue 4 asks for at least ten): the first 24 tokens, or up to EOS.
    let chats = f["chat"].as_array().unwrap();
    assert!(chats.len() >= 10, "the fixture needs at least 10 chats");
    for case in chats {
        add_cached(&chat_equals_llama_cpp(server, case).await);
    }
    // The chats share the template's system prompt: later ones copied its KV cache from the
    // prefix cache, and still gave llama.cpp's tokens. Each answer's usage says how much.
    let cached = metric(
        &server.metrics().await,
        &format!("ember_prompt_cached_tokens_total{{model=\"{SMOLLM}\"}}"),
    )
    .unwrap_or(0.0);
    assert!(
        cached > 0.0,
        "no prompt took its start from the prefix cache"
    );
    assert_eq!(cached_in_usage as f64, cached);
}

#[tokio::test]
async fn streaming_sends_role_deltas_finish_usage_and_done() {
    let server = server("").await;
    let mut body = chat("Hi", 8);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream(&server, "/v1/chat/completions", body.clone()).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    let completion = usage["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion), "{usage}");
    assert!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64(),
        "{usage}"
    );
    let (text, finish) = streamed_chat_text(&events);
    assert!(["stop", "length"].contains(&finish.as_str()));
    // The same request whole gives the same text.
    body["stream"] = json!(false);
    let (_, whole) = server.post("/v1/chat/completions", body).await;
    assert_eq!(whole["choices"][0]["message"]["content"], text);
    assert_eq!(whole["choices"][0]["finish_reason"], finish);
    assert_eq!(whole["usage"]["completion_tokens"], completion);
}

#[tokio::test]
async fn eight_concurrent_streams_equal_their_solo_runs_and_share_steps() {
    eight_streams_equal_solo_runs(&server("max_concurrent_sequences = 8").await).await;
}

/// `numerics = "fast"` (other kernels, up to eight rows per tile) keeps batching from changing
/// results too, and still gives llama.cpp's greedy text where llama.cpp never nearly tied.
#[tokio::test]
async fn fast_numerics_are_batch_invariant_and_give_llama_cpp_decisive_text() {
    let server = server("max_concurrent_sequences = 8\nnumerics = \"fast\"").await;
    let case = decisive_completion();
    let (status, body) = greedy_completion(&server, &case["prompt"]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], case["greedy_text"]);
    eight_streams_equal_solo_runs(&server).await;
}

/// Eight chats alone, then the same eight as concurrent streams: the same greedy texts, and
/// the decode steps were shared.
async fn eight_streams_equal_solo_runs(server: &Server) {
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Write a short sentence about the number {i}."))
        .collect();
    let mut solo = Vec::new();
    for p in &prompts {
        let (status, body) = server.post("/v1/chat/completions", chat(p, 24)).await;
        assert_eq!(status, 200, "{body}");
        solo.push(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let before = server.metrics().await;
    let steps_before = metric(
        &before,
        &format!("ember_batch_size_items_count{{model=\"{SMOLLM}\"}}"),
    )
    .unwrap_or(0.0);
    let items_before = metric(
        &before,
        &format!("ember_batch_size_items_sum{{model=\"{SMOLLM}\"}}"),
    )
    .unwrap_or(0.0);
    let together = futures::future::join_all(prompts.iter().map(|p| {
        let mut body = chat(p, 24);
        body["stream"] = json!(true);
        async move { streamed_chat_text(&stream(server, "/v1/chat/completions", body).await).0 }
    }))
    .await;
    assert_eq!(together, solo, "batching changed a greedy output");
    let after = server.metrics().await;
    let steps = metric(
        &after,
        &format!("ember_batch_size_items_count{{model=\"{SMOLLM}\"}}"),
    )
    .unwrap()
        - steps_before;
    let items = metric(
        &after,
        &format!("ember_batch_size_items_sum{{model=\"{SMOLLM}\"}}"),
    )
    .unwrap()
        - items_before;
    // 8 × (prefill + ≤ 24 decode steps) run alone would be ≥ 8 × 2 steps of one sequence each.
    assert!(
        items / steps > 2.0,
        "{items} sequence-steps in {steps} steps: not batched"
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_frees_its_sequence() {
    let server = server("").await;
    let running = |text: &str| {
        metric(
            text,
            &format!("ember_running_sequences{{model=\"{SMOLLM}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let mut body = json!({"model": SMOLLM, "prompt": "Once upon a time", "max_tokens": 4000,
                          "temperature": 0.8, "seed": 1, "stream": true});
    body["stream_options"] = json!({"include_usage": false});
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut chunks = response.bytes_stream();
    // Read a few chunks: the sequence is running.
    for _ in 0..3 {
        chunks.next().await.unwrap().unwrap();
    }
    assert_eq!(running(&server.metrics().await), 1.0);
    drop(chunks);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running(&server.metrics().await) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sequence was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = server.metrics().await;
    assert_eq!(
        metric(
            &text,
            &format!("ember_cancelled_items_total{{model=\"{SMOLLM}\"}}")
        ),
        Some(1.0)
    );
    // And the server goes on serving.
    let (status, _) = server.post("/v1/chat/completions", chat("Hi", 4)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn sampling_is_reproducible_with_a_seed_and_stops_at_stop_strings() {
    let server = server("").await;
    let body = json!({"model": SMOLLM, "prompt": "Once upon a time", "max_tokens": 30,
                      "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 7});
    let (_, a) = server.post("/v1/completions", body.clone()).await;
    let (_, b) = server.post("/v1/completions", body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // Greedy "1, 2, 3, 4," continues with " 5, 6, …": stopping at "7" ends right before it.
    let (status, body) = server
        .post(
            "/v1/completions",
            json!({"model": SMOLLM, "prompt": "1, 2, 3, 4,", "max_tokens": 24,
                   "temperature": 0, "stop": ["7"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(!text.contains('7') && text.ends_with("6, "), "{text:?}");
}

#[tokio::test]
async fn bad_generation_requests_get_openai_errors() {
    let server = server("context_length = 64").await;
    let cases = [
        (json!({"model": SMOLLM, "messages": []}), 400, "messages"),
        (
            json!({"model": SMOLLM, "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"model": SMOLLM, "messages": [{"role": "user"}]}),
            400,
            "messages[0].content",
        ),
        (json!({"model": SMOLLM, "messages": "hi"}), 422, "messages"),
        (
            json!({"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}),
            400,
            "temperature",
        ),
        (
            json!({"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
            400,
            "top_p",
        ),
        (
            json!({"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "n": 2}),
            400,
            "n",
        ),
        (
            json!({"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": SMOLLM, "messages": [{"role": "user", "content": "word ".repeat(80)}]}),
            400,
            "messages",
        ),
        (
            json!({"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "stop": 5}),
            422,
            "stop",
        ),
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "model",
        ),
    ];
    for (body, status, param) in cases {
        let (got, err) = server.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(got, status, "{body} → {err}");
        assert_eq!(err["error"]["param"], param, "{body} → {err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    // Several prompts, and one too long for the context: both the completions' `prompt`.
    for prompt in [json!(["a", "b"]), json!("word ".repeat(80))] {
        let (got, err) = server
            .post(
                "/v1/completions",
                json!({"model": SMOLLM, "prompt": prompt}),
            )
            .await;
        assert_eq!(
            (got, err["error"]["param"].clone()),
            (400, json!("prompt")),
            "{err}"
        );
    }
    let (got, _) = server.post_raw("/v1/chat/completions", "{\"model\":").await;
    assert_eq!(got, 400);
}

#[tokio::test]
async fn kserve_infer_generates_from_a_bytes_prompt() {
    let server = server("").await;
    let (status, meta) = server.get(&format!("/v2/models/{SMOLLM}")).await;
    assert_eq!(status, 200);
    assert_eq!(meta["inputs"][0]["name"], "text_input");
    let case = decisive_completion();
    let (status, body) = server
        .post(
            &format!("/v2/models/{SMOLLM}/infer"),
            json!({"id": "r1", "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                    "data": [case["prompt"]]}],
                   "parameters": {"max_tokens": 24, "temperature": 0}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "r1");
    assert_eq!(body["outputs"][0]["name"], "text_output");
    assert_eq!(body["outputs"][0]["data"][0], case["greedy_text"]);
    assert_eq!(body["parameters"]["cached_tokens"], 0, "{body}");
    // The same prompt again takes all but its last two tokens from the prefix cache, and says
    // so; the text is the same.
    let request = json!({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                     "data": [case["prompt"]]}],
                         "parameters": {"max_tokens": 24, "temperature": 0}});
    let (status, again) = server
        .post(&format!("/v2/models/{SMOLLM}/infer"), request)
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["outputs"][0]["data"][0], case["greedy_text"]);
    let prompt_tokens = again["parameters"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        again["parameters"]["cached_tokens"].as_u64(),
        Some(prompt_tokens - 2),
        "{again}"
    );
    let (status, err) = server
        .post(
            &format!("/v2/models/{SMOLLM}/infer"),
            json!({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
                   "parameters": {"temperature": -1}}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().contains("temperature"),
        "{err}"
    );
}
