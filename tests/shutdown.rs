//! Graceful shutdown of the real binary: SIGTERM → readiness false and new inference refused →
//! in-flight requests finish → exit 0.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits_cleanly() {
    let mut server = Server::start_default().await;
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
