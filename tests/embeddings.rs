//! The real `ember serve` with the real all-MiniLM-L6-v2 over HTTP: embeddings against the
//! independent reference, batch invariance, batching under load, overload and bad input.

mod common;

use base64::Engine as _;
use common::*;
use futures::future::join_all;
use serde_json::json;

/// The acceptance bar for agreement with the reference.
const MIN_COSINE: f64 = 0.9999;

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_match_the_reference_one_by_one_and_in_one_request() {
    let server = Server::start_default().await;
    let cases = reference_cases();
    assert!(cases.len() >= 40);

    // One request per text, all at once: the server batches them as it likes.
    let singles = join_all(
        cases
            .iter()
            .map(|c| server.post("/v1/embeddings", json!({"model": MINILM, "input": c.text}))),
    )
    .await;
    for (case, (status, body)) in cases.iter().zip(&singles) {
        assert_eq!(*status, 200, "{body}");
        let got = vector(&body["data"][0]["embedding"]);
        assert_eq!(got.len(), 384);
        let cos = cosine(&got, &case.embedding);
        assert!(cos >= MIN_COSINE, "cosine {cos} for {:?}", case.text);
        assert_eq!(
            body["usage"]["prompt_tokens"], case.tokens,
            "{:?}",
            case.text
        );
        assert_eq!(body["usage"]["truncated_inputs"], case.truncated as usize);
    }

    every_text_in_one_request_matches(&server, &cases).await;
}

/// Every text in one request: results come back in input order, each meeting the bar.
async fn every_text_in_one_request_matches(server: &Server, cases: &[ReferenceCase]) {
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let (status, body) = server
        .post("/v1/embeddings", json!({"model": MINILM, "input": texts}))
        .await;
    assert_eq!(status, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), cases.len());
    for (i, (case, item)) in cases.iter().zip(data).enumerate() {
        assert_eq!(item["index"], i);
        let cos = cosine(&vector(&item["embedding"]), &case.embedding);
        assert!(
            cos >= MIN_COSINE,
            "cosine {cos} for {:?} inside a batch",
            case.text
        );
    }
    let total: usize = cases.iter().map(|c| c.tokens).sum();
    assert_eq!(body["usage"]["prompt_tokens"], total);
    assert_eq!(body["usage"]["total_tokens"], total);
    let truncated = cases.iter().filter(|c| c.truncated).count();
    assert!(truncated >= 3);
    assert_eq!(body["usage"]["truncated_inputs"], truncated);
}

/// The narrower kernel families (`--cpu-isa`: AVX2, and portable code with candle's f32
/// matmul) serve the reference too, so a CI machine with AVX-512 checks what older CPUs run.
/// The metric shows the cap took hold.
#[tokio::test(flavor = "multi_thread")]
async fn capped_cpu_kernels_serve_the_reference() {
    let cases = reference_cases();
    for cap in ["portable", "avx2", "avx512-core"] {
        let repository = repository_with(&[(MINILM, "max_batch_size = 32")]);
        let server = Server::start(&repository, &["--cpu-isa", cap]).await;
        assert_capped(&server, cap).await;
        every_text_in_one_request_matches(&server, &cases).await;
    }

    let stderr = refused_start(
        &["serve", "--addr", "127.0.0.1:0"],
        &[("EMBER_CPU_ISA", "avx512bf16")],
    );
    assert!(
        stderr.contains("\"avx512bf16\"")
            && stderr.contains("portable, avx2, avx512-core, avx512 or amx"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_id_inputs_match_the_reference() {
    let server = Server::start_default().await;
    let cases = reference_cases();
    let token_ids = fixture("minilm_token_ids.json");
    let entries = token_ids["cases"].as_array().unwrap();
    let ids: Vec<&serde_json::Value> = entries.iter().map(|e| &e["ids"]).collect();
    let (status, body) = server
        .post("/v1/embeddings", json!({"model": MINILM, "input": ids}))
        .await;
    assert_eq!(status, 200, "{body}");
    for (entry, item) in entries.iter().zip(body["data"].as_array().unwrap()) {
        let case = &cases[entry["case_index"].as_u64().unwrap() as usize];
        let cos = cosine(&vector(&item["embedding"]), &case.embedding);
        assert!(
            cos >= MIN_COSINE,
            "cosine {cos} for token ids of {:?}",
            case.text
        );
    }
    // A single array of ids is one input.
    let (status, body) = server
        .post(
            "/v1/embeddings",
            json!({"model": MINILM, "input": entries[0]["ids"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        body["usage"]["prompt_tokens"],
        entries[0]["ids"].as_array().unwrap().len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_text_alone_and_inside_a_padded_batch_give_the_same_vector() {
    // A long queue delay makes all inputs of one request share one batch, so the short text is
    // padded to the longest one there.
    let repo = repository_with(&[(
        "minilm-padded",
        "max_batch_size = 64\nmax_batch_tokens = 65536\nmax_queue_delay_ms = 50",
    )]);
    let server = Server::start(&repo, &[]).await;
    let short = "Dynamic batching must not change the answer.";
    let (_, alone) = server
        .post(
            "/v1/embeddings",
            json!({"model": "minilm-padded", "input": short}),
        )
        .await;
    let alone = vector(&alone["data"][0]["embedding"]);
    for company in [
        vec!["Another sentence of a similar length to pad against."],
        vec!["One more, a little bit longer than the short text we check here, to force padding of it."],
        vec!["a b", "a slightly longer neighbour sentence here", "x"],
    ] {
        let mut input = company.clone();
        input.insert(input.len() / 2, short);
        let (status, body) = server
            .post("/v1/embeddings", json!({"model": "minilm-padded", "input": input}))
            .await;
        assert_eq!(status, 200, "{body}");
        let at = input.iter().position(|t| *t == short).unwrap();
        let batched = vector(&body["data"][at]["embedding"]);
        let cos = cosine(&alone, &batched);
        assert!(cos >= 0.99999, "cosine {cos} between alone and batched");
    }
    let _ = std::fs::remove_dir_all(repo);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_batches() {
    let server = Server::start_default().await;
    let requests = 64;
    let replies = join_all((0..requests).map(|i| {
        server.post(
            "/v1/embeddings",
            json!({"model": MINILM, "input": format!("request number {i} about batching")}),
        )
    }))
    .await;
    assert!(replies.iter().all(|(s, _)| *s == 200));
    let text = server.metrics().await;
    let label = format!("{{model=\"{MINILM}\"}}");
    let batches = metric(&text, &format!("ember_batch_size_items_count{label}")).unwrap();
    let items = metric(&text, &format!("ember_batch_size_items_sum{label}")).unwrap();
    assert_eq!(items, requests as f64, "every input was computed once");
    assert!(
        batches < items,
        "{batches} batches for {items} inputs: no batch held more than one"
    );
    let singles = metric(
        &text,
        &format!("ember_batch_size_items_bucket{{model=\"{MINILM}\",le=\"1\"}}"),
    )
    .unwrap();
    assert!(
        singles < batches,
        "the histogram shows batches larger than 1"
    );
    for name in [
        "ember_queue_duration_seconds_count",
        "ember_inference_duration_seconds_count",
        "ember_batch_size_tokens_count",
    ] {
        assert!(
            metric(&text, &format!("{name}{label}")).unwrap() > 0.0,
            "{name}"
        );
    }
    assert!(metric(&text, &format!("ember_model_load_seconds{label}")).unwrap() > 0.0);
    assert_eq!(
        metric(&text, &format!("ember_model_parameters{label}")),
        Some(22713728.0)
    );
    assert_eq!(metric(&text, "ember_ready"), Some(1.0));
    assert_eq!(
        metric(
            &text,
            &format!("ember_requests_total{{model=\"{MINILM}\",route=\"/v1/embeddings\",status=\"200\"}}")
        ),
        Some(requests as f64)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_503_with_retry_after_at_once() {
    let repo = repository_with(&[(
        "minilm-small-queue",
        "max_batch_size = 4\nqueue_capacity = 8\nmax_queue_delay_ms = 0",
    )]);
    let server = Server::start(&repo, &[]).await;
    let long = "a rather long sentence that keeps the model busy for a while ".repeat(30);
    let body = json!({"model": "minilm-small-queue", "input": vec![long.as_str(); 4]});
    let replies = join_all((0..12).map(|_| {
        server
            .client
            .post(server.url("/v1/embeddings"))
            .json(&body)
            .send()
    }))
    .await;
    let mut refused = 0;
    for r in replies {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => {}
            503 => {
                refused += 1;
                assert_eq!(r.headers()["retry-after"], "1");
                let e: serde_json::Value = r.json().await.unwrap();
                assert_eq!(e["error"]["code"], "queue_full", "{e}");
                assert_eq!(e["error"]["type"], "overloaded_error");
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(
        refused > 0,
        "12 requests of 4 inputs never filled a queue of 8"
    );
    // More inputs than the queue can ever hold is refused as too large, not as overload.
    let (status, e) = server
        .post(
            "/v1/embeddings",
            json!({"model": "minilm-small-queue", "input": vec!["x"; 9]}),
        )
        .await;
    assert_eq!(status, 413, "{e}");
    assert_eq!(e["error"]["code"], "too_many_inputs");
    // The server still answers afterwards.
    let (status, _) = server
        .post(
            "/v1/embeddings",
            json!({"model": "minilm-small-queue", "input": "still here"}),
        )
        .await;
    assert_eq!(status, 200);
    let _ = std::fs::remove_dir_all(repo);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors_in_each_api_shape() {
    let server = Server::start_default().await;

    let (status, e) = server.post_raw("/v1/embeddings", "{\"model\": ").await;
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"),
        "{e}"
    );
    assert_eq!(e["error"]["type"], "invalid_request_error");

    let (status, e) = server
        .post(
            "/v1/embeddings",
            json!({"model": "no-such-model", "input": "hi"}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no-such-model"));

    let (status, e) = server
        .post("/v1/embeddings", json!({"model": MINILM, "input": []}))
        .await;
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("empty"),
        "{e}"
    );
    assert_eq!(e["error"]["param"], "input");

    for (body, needle) in [
        (json!({"model": MINILM, "input": 42}), "`input` is a number"),
        (
            json!({"model": MINILM, "input": ["ok", 3]}),
            "input[1] is a number",
        ),
        (json!({"model": 7, "input": "hi"}), "invalid type"),
        (json!({"input": "hi"}), "missing field `model`"),
        (
            json!({"model": MINILM, "input": "hi", "encoding_format": "hex"}),
            "unknown variant",
        ),
    ] {
        let (status, e) = server.post("/v1/embeddings", body.clone()).await;
        assert_eq!(status, 422, "{body} → {e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{message} should mention {needle}"
        );
    }

    let (status, e) = server
        .post(
            "/v1/embeddings",
            json!({"model": MINILM, "input": [[101, 99999, 102]]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("99999"),
        "{e}"
    );
    let (status, e) = server
        .post(
            "/v1/embeddings",
            json!({"model": MINILM, "input": [vec![1000; 300]]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 256"),
        "{e}"
    );
    let (status, e) = server
        .post(
            "/v1/embeddings",
            json!({"model": MINILM, "input": "hi", "dimensions": 128}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["param"], "dimensions");
    let (status, _) = server
        .post(
            "/v1/embeddings",
            json!({"model": MINILM, "input": "hi", "dimensions": 384}),
        )
        .await;
    assert_eq!(status, 200);

    // KServe v2 errors are {"error": "..."}.
    let infer = format!("/v2/models/{MINILM}/infer");
    let (status, e) = server.post_raw(&infer, "not json").await;
    assert_eq!(status, 400);
    assert!(
        e["error"].as_str().unwrap().contains("malformed JSON"),
        "{e}"
    );
    let (status, e) = server
        .post("/v2/models/nope/infer", json!({"inputs": []}))
        .await;
    assert_eq!(status, 404);
    assert!(e["error"].as_str().unwrap().contains("nope"));
    for (input, needle) in [
        (
            json!({"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}),
            "datatype is FP32",
        ),
        (
            json!({"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}),
            "declares 2 elements",
        ),
        (
            json!({"name": "words", "shape": [1], "datatype": "BYTES", "data": ["a"]}),
            "unknown input",
        ),
        (
            json!({"name": "text", "shape": [1], "datatype": "BYTES", "data": [5]}),
            "element 0 (5) is not a BYTES value",
        ),
        (
            json!({"name": "text", "shape": [1, 2, 3], "datatype": "BYTES", "data": ["a", "b", "c", "d", "e", "f"]}),
            "is not allowed",
        ),
    ] {
        let (status, e) = server.post(&infer, json!({"inputs": [input]})).await;
        assert_eq!(status, 400, "{e}");
        let message = e["error"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{message} should mention {needle}"
        );
    }
    let (status, e) = server.post(&infer, json!({"inputs": "x"})).await;
    assert_eq!(status, 422, "{e}");

    let (status, e) = server.get("/v1/nothing-here").await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn kserve_infer_base64_and_metadata_routes() {
    let server = Server::start_default().await;
    let cases = reference_cases();
    let texts: Vec<&str> = cases[..5].iter().map(|c| c.text.as_str()).collect();

    let (status, body) = server
        .post(
            &format!("/v2/models/{MINILM}/infer"),
            json!({"id": "req-7", "inputs": [{"name": "text", "shape": [5], "datatype": "BYTES", "data": texts}],
                   "outputs": [{"name": "embedding"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "req-7");
    assert_eq!(body["model_name"], MINILM);
    let out = &body["outputs"][0];
    assert_eq!(out["name"], "embedding");
    assert_eq!(out["datatype"], "FP32");
    assert_eq!(out["shape"], json!([5, 384]));
    let flat = vector(&out["data"]);
    for (i, case) in cases[..5].iter().enumerate() {
        let cos = cosine(&flat[i * 384..(i + 1) * 384], &case.embedding);
        assert!(cos >= MIN_COSINE, "cosine {cos} for {:?}", case.text);
    }

    let (status, body) = server
        .post(
            "/v1/embeddings",
            json!({"model": MINILM, "input": texts[0], "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(status, 200);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(cosine(&decoded, &cases[0].embedding) >= MIN_COSINE);

    let (status, meta) = server.get(&format!("/v2/models/{MINILM}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        meta["inputs"][0],
        json!({"name": "text", "datatype": "BYTES", "shape": [-1]})
    );
    assert_eq!(
        meta["outputs"][0],
        json!({"name": "embedding", "datatype": "FP32", "shape": [-1, 384]})
    );
    let (status, ready) = server.get(&format!("/v2/models/{MINILM}/ready")).await;
    assert_eq!((status, ready["ready"].clone()), (200, json!(true)));
    let (status, _) = server.get("/v2/models/nope/ready").await;
    assert_eq!(status, 404);
    let (status, v2) = server.get("/v2").await;
    assert_eq!((status, v2["name"].clone()), (200, json!("ember")));
    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    let task_of = |id: &str| {
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["task"].clone())
    };
    assert_eq!(task_of(MINILM), Some(json!("embed")));
    assert_eq!(task_of(SMOLLM), Some(json!("generate")));
    for path in [
        "/health/live",
        "/v2/health/live",
        "/health/ready",
        "/v2/health/ready",
    ] {
        assert_eq!(server.get(path).await.0, 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_is_dropped_before_compute() {
    use tokio::io::AsyncWriteExt;

    let repo = repository_with(&[(
        "minilm-one",
        "max_batch_size = 4\nqueue_capacity = 256\ninstances = 1",
    )]);
    let server = Server::start(&repo, &[]).await;
    let long = "a long sentence that keeps the encoder busy for a good while ".repeat(30);
    // Keep the only instance busy…
    let busy = tokio::spawn({
        let req = server
            .client
            .post(server.url("/v1/embeddings"))
            .json(&json!({"model": "minilm-one", "input": vec![long.as_str(); 16]}));
        async move { req.send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // …then queue 64 inputs behind it and hang up without reading the answer.
    let body = json!({"model": "minilm-one", "input": vec![long.as_str(); 64]}).to_string();
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    // Hang up once the abandoned inputs wait in the queue (the busy request alone never puts
    // more than 12 there: 16 inputs, 4 computing).
    let label = "{model=\"minilm-one\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(
        &server.metrics().await,
        &format!("ember_queue_depth_items{label}"),
    )
    .unwrap_or(0.0)
        <= 16.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned request never reached the queue"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drop(stream);

    assert_eq!(busy.await.unwrap().unwrap(), 200);
    // A request sent after the hang-up is answered after everything queued before it.
    let (status, _) = server
        .post(
            "/v1/embeddings",
            json!({"model": "minilm-one", "input": "after"}),
        )
        .await;
    assert_eq!(status, 200);
    let text = server.metrics().await;
    let cancelled = metric(&text, &format!("ember_cancelled_items_total{label}")).unwrap();
    let computed = metric(&text, &format!("ember_batch_size_items_sum{label}")).unwrap();
    assert!(
        cancelled > 0.0,
        "no input of the abandoned request was dropped"
    );
    assert_eq!(
        cancelled + computed,
        81.0,
        "every input was either computed or dropped"
    );
    let _ = std::fs::remove_dir_all(repo);
}
