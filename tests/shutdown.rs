//! Graceful shutdown of the real binary: SIGTERM → readiness false and new inference refused →
//! in-flight requests and streams finish → exit 0.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits_cleanly() {
    let server = Server::start_default().await;
    let long = "a long sentence that keeps the encoder busy for some time ".repeat(30);
    let body = json!({"model": MINILM, "input": vec![long.as_str(); 48]});
    let in_flight = tokio::spawn({
        let req = server.client.post(server.url("/v1/embeddings")).json(&body);
        async move { req.send().await }
    });
    // Let the request reach the model before the signal.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = server.metrics().await;
        if metric(
            &text,
            &format!("ember_queue_depth_items{{model=\"{MINILM}\"}}"),
        )
        .unwrap_or(0.0)
            > 0.0
            || metric(
                &text,
                &format!("ember_batch_size_items_count{{model=\"{MINILM}\"}}"),
            )
            .unwrap_or(0.0)
                > 0.0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request never reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A keep-alive connection opened before the signal sees the drain.
    let probe = reqwest::Client::new();
    assert_eq!(
        probe
            .get(server.url("/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    server.terminate();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let ready = probe.get(server.url("/health/ready")).send().await;
    if let Ok(r) = ready {
        assert_eq!(r.status(), 503, "readiness must turn false while draining");
    }
    let late = probe
        .post(server.url("/v1/embeddings"))
        .json(&json!({"model": MINILM, "input": "too late"}))
        .send()
        .await;
    match late {
        Ok(r) => {
            assert_eq!(r.status(), 503);
            assert!(r.headers().contains_key("retry-after"));
        }
        Err(e) => assert!(e.is_connect() || e.is_request(), "{e}"),
    }

    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 48);

    assert_exits_cleanly(server).await;
}

async fn assert_exits_cleanly(mut server: Server) {
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ember did not exit after draining"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "ember exited with {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_running_stream_finish() {
    use futures::StreamExt;
    let server = Server::start(&smollm_repository(""), &["--compute-threads", "2"]).await;
    let r = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(
            &json!({"model": SMOLLM, "stream": true, "max_tokens": 60, "temperature": 0,
                      "messages": [{"role": "user", "content": "Describe the sea."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    // Signal once generated text is flowing.
    while !text.contains("\"content\":\"") || text.matches("data: ").count() < 3 {
        let chunk = body.next().await.expect("more events").unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    server.terminate();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("the stream ends cleanly")).unwrap());
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        text.contains("\"finish_reason\":\"length\"")
            || text.contains("\"finish_reason\":\"stop\""),
        "the stream finished normally: {text}"
    );
    assert!(!text.contains("\"error\""), "{text}");
    assert_exits_cleanly(server).await;
}
