//! The load-test suite's embeddings scenario (`loadtest/scenarios/embeddings-short.toml`) in a
//! short bounded run against the real `ember serve` with the real all-MiniLM-L6-v2: the runner
//! behind `ember-loadtest run` writes its JSON results and its PNG chart, and both hold up.

mod common;

use common::*;
use ember_loadtest::runner::{run_scenario, Target};
use ember_loadtest::scenario::{Scenario, Traffic};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn the_embeddings_scenario_writes_its_json_and_its_chart() {
    let tokenizer = minilm_weights().join("tokenizer.json");
    let mut scenario =
        Scenario::load(&repo_root().join("loadtest/scenarios/embeddings-short.toml")).unwrap();
    let Traffic::Embeddings {
        tokenizer: file_tokenizer,
        tokens,
        ..
    } = &scenario.traffic[0]
    else {
        panic!("embeddings-short is an embeddings scenario");
    };
    // The file's relative path reaches the demo weights.
    assert_eq!(
        file_tokenizer.canonicalize().unwrap(),
        tokenizer.canonicalize().unwrap()
    );
    assert_eq!(*tokens, 12);
    // Bounded: two levels of one second, at most 400 requests each.
    scenario.concurrency = vec![1, 4];
    scenario.seconds_per_level = 1.0;
    scenario.max_requests_per_level = 400;

    let server = Server::start(&repository_with(&[(MINILM, "")]), &[]).await;
    let target = Target {
        url: server.base.clone(),
        ..Target::default()
    };
    let mut printed = Vec::new();
    let results = run_scenario(&scenario, &target, |level| {
        printed.extend(ember_loadtest::report::table_rows(level))
    })
    .await
    .unwrap();
    assert_eq!(printed.len(), 2, "one table row per level: {printed:?}");

    let out = std::env::temp_dir().join(format!("ember-loadtest-{}", std::process::id()));
    let (json_path, png_path) = ember_loadtest::report::write(&results, &out).unwrap();
    assert_eq!(json_path, out.join("embeddings-short.json"));
    assert_eq!(png_path, out.join("embeddings-short.png"));

    // The JSON, read as plain JSON (what a reader of the file sees).
    let json: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(json["scenario"], "embeddings-short");
    assert_eq!(json["traffic"][0]["kind"], "embeddings");
    let levels = json["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (level, concurrency) in levels.iter().zip([1, 4]) {
        assert_eq!(level["concurrency"], concurrency);
        let requests = level["requests"].as_u64().unwrap();
        assert!(requests > 0 && requests <= 400, "{level}");
        assert_eq!(level["errors"], serde_json::json!({}), "no errors: {level}");
        assert!(level["requests_per_s"].as_f64().unwrap() > 0.0);
        let latency = &level["latency_ms"];
        let p = |k: &str| latency[k].as_f64().unwrap();
        assert!(
            0.0 < p("p50") && p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("max"),
            "percentiles out of order: {latency}"
        );
        let per_traffic = &level["traffic"][0];
        assert_eq!(per_traffic["requests"], requests);
        assert!(
            per_traffic.get("ttft_ms").is_none(),
            "no TTFT for embeddings"
        );
    }

    // The PNG: its signature, and an IHDR of the chart's size (one 900 x 620 panel).
    let png = std::fs::read(&png_path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (900, 620));
    assert!(
        png.len() > 10_000 && png.len() < 2_000_000,
        "{} bytes",
        png.len()
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// The tensor scenario (`loadtest/scenarios/tensor-cnn.toml`) against the real demo CNN, with
/// JSON bodies and with the binary extension: every request succeeds, and at 8 clients the
/// server stacks images into shared forward passes.
#[tokio::test(flavor = "multi_thread")]
async fn the_tensor_scenario_drives_the_cnn_with_json_and_binary_bodies() {
    let mut scenario =
        Scenario::load(&repo_root().join("loadtest/scenarios/tensor-cnn.toml")).unwrap();
    assert_eq!(scenario.traffic[0].model(), "digits-cnn");
    scenario.concurrency = vec![8];
    scenario.seconds_per_level = 1.0;
    scenario.max_requests_per_level = 300;
    let repo = temp_repository();
    add_tensor_model(&repo, "digits-cnn", "");
    let server = Server::start(&repo, &[]).await;
    let target = Target {
        url: server.base.clone(),
        ..Target::default()
    };
    for binary in [false, true] {
        let Traffic::Tensor { binary: b, .. } = &mut scenario.traffic[0] else {
            panic!("tensor-cnn is a tensor scenario");
        };
        *b = binary;
        let results = run_scenario(&scenario, &target, |_| {}).await.unwrap();
        let level = &results.levels[0];
        assert!(level.requests > 0, "binary {binary}: no request succeeded");
        assert_eq!(
            level.error_count(),
            0,
            "binary {binary}: {:?}",
            level.errors
        );
    }
    let metrics = server.metrics().await;
    let items = metric(&metrics, "ember_batch_size_items_sum{model=\"digits-cnn\"}").unwrap();
    assert!(
        items > batches("digits-cnn", &metrics),
        "8 clients never shared a forward pass"
    );
}
