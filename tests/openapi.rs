//! `GET /openapi.json` describes the real server, and schemathesis (driven by that document)
//! sends a bounded number of generated requests to every route without one server error.

mod common;

use common::*;
use serde_json::Value;

/// Generated cases per operation; about 1000 requests in all.
const EXAMPLES_PER_OPERATION: &str = "25";

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_on_any_route() {
    let schemathesis = test_python().with_file_name("schemathesis");
    assert!(
        schemathesis.is_file(),
        "schemathesis is missing beside the test Python: run scripts/setup_test_python.sh"
    );
    // A demo model of each task; a short context keeps any generated max_tokens quick to serve.
    let models = repository_with(&[(MINILM, "")]);
    add_smollm(&models, "context_length = 128\nmax_total_tokens = 2048");
    add_tensor_model(&models, "digits-mlp", "");
    let server = Server::start(&models, &["--compute-threads", "2"]).await;

    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["info"]["title"], "Ember");
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert!(paths.len() >= 11, "{paths:?}");

    let url = server.url("/openapi.json");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(schemathesis)
            .args(["run", &url, "--checks", "not_a_server_error"])
            .args(["--max-examples", EXAMPLES_PER_OPERATION])
            .args(["--generation-deterministic", "--request-timeout", "60"])
            .env("NO_COLOR", "1")
            // Its cache goes where it runs: not into the repository.
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "N generated, N passed": every generated case passed, and there were many.
    let summary = stdout
        .lines()
        .find(|l| l.contains(" generated, "))
        .unwrap_or_else(|| panic!("no summary in:\n{stdout}"));
    let numbers: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        numbers.len() >= 2 && numbers[0] == numbers[1] && numbers[0] >= 300,
        "{summary}"
    );
    eprintln!("schemathesis: {}", summary.trim());
    // The server is still up.
    let (status, _) = server.get("/health/ready").await;
    assert_eq!(status, 200);
    let _: Value = server.get("/v1/models").await.1;
}
