//! Request limits over real HTTP: body size, inputs per request, truncation (server default and
//! per request), and deadlines (whole responses and streams), each with its status and message,
//! and nothing computed for a refused request.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MODEL: &str = "encoder";

fn long_text() -> String {
    "Every queue is bounded and every request has a deadline. ".repeat(40)
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_and_too_many_inputs_get_413_before_any_compute() {
    let models = repository_with(&[(MODEL, "")]);
    let server = Server::start(&models, &["--max-body-bytes", "4096", "--max-inputs", "3"]).await;
    let before = batches(MODEL, &server.metrics().await);

    let big = "x".repeat(5000);
    let (status, body) = server
        .post("/v1/embeddings", json!({"model": MODEL, "input": big}))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "body_too_large");
    let (status, body) = server
        .post(
            &format!("/v2/models/{MODEL}/infer"),
            json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [big]}]}),
        )
        .await;
    assert_eq!(status, 413);
    assert!(body["error"].is_string(), "KServe shape: {body}");

    let (status, body) = server
        .post(
            "/v1/embeddings",
            json!({"model": MODEL, "input": ["a", "b", "c", "d"]}),
        )
        .await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "too_many_inputs");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 3"),
        "{body}"
    );
    let (status, _) = server
        .post(
            "/v1/embeddings",
            json!({"model": MODEL, "input": ["a", "b", "c"]}),
        )
        .await;
    assert_eq!(status, 200);
    let after = batches(MODEL, &server.metrics().await);
    assert!(
        after > before && after <= before + 3.0,
        "only the accepted request was computed ({before} → {after})"
    );
}

/// A pooled client that sends a body past the limit gets its 413 even while it is still
/// writing (the server lingers over the rest instead of resetting the connection), is told the
/// connection ends there, and loses none of the requests it sends next. Before both, the soak
/// lost a request on a reused connection every few minutes.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_past_the_limit_gets_its_413_and_costs_no_later_request() {
    let models = repository_with(&[(MODEL, "")]);
    let server = Server::start(&models, &["--max-body-bytes", "4096"]).await;
    let client = reqwest::Client::new();
    // 16 MiB: more than loopback's socket buffers hold, so the client is still writing when
    // the 413 comes; a small one fits in the buffers, so the client reuses the connection.
    for size in [16 << 20, 64 << 10] {
        for round in 0..10 {
            let r = client
                .post(server.url("/v1/embeddings"))
                .header("content-type", "application/json")
                .body(vec![b'['; size])
                .send()
                .await
                .unwrap_or_else(|e| panic!("{size} bytes, round {round}: no 413 but {e:?}"));
            assert_eq!(r.status(), 413);
            assert_eq!(r.headers()["connection"], "close");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "body_too_large");
            for _ in 0..3 {
                let r = client
                    .post(server.url("/v1/embeddings"))
                    .json(&json!({"model": MODEL, "input": "after"}))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("a request after a 413 was lost: {e:?}"));
                assert_eq!(r.status(), 200);
                assert!(
                    r.headers().get("connection").is_none_or(|v| v != "close"),
                    "a request read whole keeps its connection"
                );
            }
        }
    }
}

/// Reads until the server closes the connection; what it sent before that.
async fn read_until_closed(conn: &mut tokio::net::TcpStream, limit: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    tokio::time::timeout(limit, conn.read_to_end(&mut seen))
        .await
        .unwrap_or_else(|_| panic!("the connection was still open after {limit:?}"))
        .ok();
    String::from_utf8_lossy(&seen).into_owned()
}

/// `--idle-timeout-secs`: a connection that sends no request head in time (silent, idle after
/// a response, or trickling its head) is closed and its slot freed; a request whose body takes
/// longer than that is not cut.
#[tokio::test(flavor = "multi_thread")]
async fn idle_and_slow_header_connections_are_closed_and_free_their_slots() {
    use tokio::io::AsyncWriteExt;
    let models = repository_with(&[(MODEL, "")]);
    let server = Server::start(&models, &["--idle-timeout-secs", "1"]).await;
    let addr = server.base.trim_start_matches("http://").to_string();
    let connect = || tokio::net::TcpStream::connect(addr.clone());

    let mut silent = connect().await.unwrap();
    assert_eq!(
        read_until_closed(&mut silent, Duration::from_secs(10)).await,
        ""
    );

    let mut kept = connect().await.unwrap();
    kept.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = read_until_closed(&mut kept, Duration::from_secs(10)).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    let mut trickling = connect().await.unwrap();
    trickling
        .write_all(b"GET /health/live HTTP/1.1\r\n")
        .await
        .unwrap();
    let closer = async {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if trickling.write_all(b"x-slow: 1\r\n").await.is_err() {
                return true;
            }
        }
        false
    };
    assert!(
        closer.await,
        "a head trickling for 10 s was still being read"
    );

    // A slow body is the handler's business (the request deadline bounds it), not the idle
    // timeout's.
    let body = json!({"model": MODEL, "input": "slow but steady"}).to_string();
    let mut slow = connect().await.unwrap();
    slow.write_all(
        format!(
            "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for piece in body.as_bytes().chunks(body.len().div_ceil(5)) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        slow.write_all(piece).await.unwrap();
    }
    let answer = read_until_closed(&mut slow, Duration::from_secs(30)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn long_texts_are_cut_or_refused_by_server_default_and_request_flag() {
    let models = repository_with(&[(MODEL, "")]);
    let cutting = Server::start(&models, &[]).await;
    let refusing = Server::start(&models, &["--truncate", "false"]).await;
    let text = long_text();

    let (status, body) = cutting
        .post("/v1/embeddings", json!({"model": MODEL, "input": text}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["usage"]["truncated_inputs"], 1);
    let (status, body) = cutting
        .post(
            "/v1/embeddings",
            json!({"model": MODEL, "input": ["short", text], "truncate": false}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "input[1]");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("256 tokens"),
        "{body}"
    );

    let (status, body) = refusing
        .post("/v1/embeddings", json!({"model": MODEL, "input": text}))
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = refusing
        .post(
            "/v1/embeddings",
            json!({"model": MODEL, "input": text, "truncate": true}),
        )
        .await;
    assert_eq!(status, 200);
    let infer = |truncate: Value| {
        json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}],
               "parameters": {"truncate": truncate}})
    };
    let path = format!("/v2/models/{MODEL}/infer");
    let (status, _) = refusing.post(&path, infer(json!(true))).await;
    assert_eq!(status, 200);
    let (status, body) = cutting.post(&path, infer(json!(false))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = cutting.post(&path, infer(json!("yes"))).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_deadline_gets_504_and_its_queued_work_is_dropped() {
    // One single-input instance: 64 long texts queue behind each other for a while.
    let models = repository_with(&[(
        MODEL,
        "max_batch_size = 1\ninstances = 1\nmax_queue_delay_ms = 0",
    )]);
    let server = Server::start(&models, &["--compute-threads", "1"]).await;
    let inputs: Vec<String> = (0..64).map(|i| format!("{i} {}", long_text())).collect();
    let started = Instant::now();
    let r = server
        .client
        .post(server.url("/v1/embeddings"))
        .header("x-request-timeout", "0.2")
        .json(&json!({"model": MODEL, "input": inputs}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(10));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "deadline_exceeded");
    // The inputs still queued are skipped, not computed for nobody.
    let cancelled = format!("ember_cancelled_items_total{{model=\"{MODEL}\"}}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = server.metrics().await;
        let dropped = metric(&m, &cancelled).unwrap_or(0.0);
        if dropped > 0.0 {
            assert!(batches(MODEL, &m) + dropped <= 64.0);
            break;
        }
        assert!(Instant::now() < deadline, "no queued input was dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let r = server
        .client
        .post(server.url("/v1/embeddings"))
        .header("x-request-timeout", "soon")
        .json(&json!({"model": MODEL, "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_past_its_deadline_ends_with_an_error_event_and_frees_its_sequence() {
    let server = Server::start(&smollm_repository(""), &["--compute-threads", "2"]).await;
    let r = server
        .client
        .post(server.url("/v1/chat/completions"))
        .header("x-request-timeout", "0.5")
        .json(
            &json!({"model": SMOLLM, "stream": true, "max_tokens": 2000, "temperature": 0,
                      "messages": [{"role": "user", "content": "Tell me a very long story."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let error: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "deadline_exceeded", "{error}");
    let running = format!("ember_running_sequences{{model=\"{SMOLLM}\"}}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&server.metrics().await, &running) != Some(0.0) {
        assert!(Instant::now() < deadline, "the sequence was not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_key_has_its_own_rate_and_the_excess_gets_429() {
    let models = repository_with(&[(MODEL, "")]);
    let keys = models.join("keys.txt");
    std::fs::write(&keys, "key-a\nkey-b\n").unwrap();
    let server = Server::start(
        &models,
        &[
            "--api-key-file",
            keys.to_str().unwrap(),
            "--admin-key",
            "admin",
            "--rate-limit-rps",
            "0.5",
            "--rate-limit-burst",
            "2",
        ],
    )
    .await;
    let send = |key: &'static str| {
        server
            .client
            .post(server.url("/v1/embeddings"))
            .bearer_auth(key)
            .json(&json!({"model": MODEL, "input": "hi"}))
            .send()
    };
    assert_eq!(send("key-a").await.unwrap().status(), 200);
    assert_eq!(send("key-a").await.unwrap().status(), 200);
    let r = send("key-a").await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(
        send("key-b").await.unwrap().status(),
        200,
        "keys are separate"
    );
    for _ in 0..3 {
        assert_eq!(
            send("admin").await.unwrap().status(),
            200,
            "admin is exempt"
        );
    }
    let (status, _) = server.get("/health/ready").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_keys_the_rate_applies_per_client_address() {
    let models = repository_with(&[(MODEL, "")]);
    let server = Server::start(
        &models,
        &["--rate-limit-rps", "0.2", "--rate-limit-burst", "1"],
    )
    .await;
    let (status, _) = server
        .post("/v1/embeddings", json!({"model": MODEL, "input": "hi"}))
        .await;
    assert_eq!(status, 200);
    let (status, body) = server
        .post(
            &format!("/v2/models/{MODEL}/infer"),
            json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("retry in"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_past_the_limit_gets_503_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let models = repository_with(&[(MODEL, "")]);
    let server = Server::start(&models, &["--max-connections", "2"]).await;
    let addr = server.base.trim_start_matches("http://").to_string();
    // Open keep-alive connections take the slots (the test client's pooled one may hold one
    // already); the first connection past the limit gets its request answered with a 503.
    let mut held = Vec::new();
    let mut answer = String::new();
    for _ in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("answered at once")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.starts_with("HTTP/1.1 200") {
            held.push(conn);
        } else {
            answer = text;
            break;
        }
    }
    assert!(held.len() <= 2, "{} connections were let in", held.len());
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");

    // A freed slot serves the next client.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut next = tokio::net::TcpStream::connect(&addr).await.unwrap();
    next.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    next.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_past_the_queue_gets_one_answer_each_and_the_server_stays_up() {
    let models = repository_with(&[(
        MODEL,
        "max_batch_size = 4\ninstances = 1\nmax_queue_delay_ms = 0\nqueue_capacity = 8",
    )]);
    let server = Server::start(&models, &["--compute-threads", "1"]).await;
    let text = long_text();
    let requests = (0..200).map(|i| {
        let request = server
            .client
            .post(server.url("/v1/embeddings"))
            .header("x-request-timeout", "20")
            .json(&json!({"model": MODEL, "input": format!("{i} {text}")}));
        async move {
            let r = request
                .send()
                .await
                .expect("an answer, not a dropped connection");
            let status = r.status().as_u16();
            let retry = r.headers().contains_key("retry-after");
            let body: Value = r.json().await.expect("a JSON body");
            (status, retry, body)
        }
    });
    let answers =
        tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(requests))
            .await
            .expect("no request hung");
    let (mut ok, mut refused) = (0, 0);
    for (status, retry, body) in &answers {
        match status {
            200 => {
                ok += 1;
                assert_eq!(body["data"].as_array().unwrap().len(), 1);
            }
            503 => {
                refused += 1;
                assert!(retry, "a 503 says when to retry");
                assert_eq!(body["error"]["code"], "queue_full");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ok + refused, 200);
    assert!(ok >= 8 && refused > 0, "{ok} served, {refused} refused");
    // Afterwards it serves and is ready.
    let (status, _) = server
        .post(
            "/v1/embeddings",
            json!({"model": MODEL, "input": "still alive"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = server.get("/health/ready").await;
    assert_eq!(status, 200);
}
