//! The official `openai` Python client against the real server: it must parse our chat and
//! completion responses, SSE streams (with usage) and errors.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn the_openai_library_parses_our_responses_and_streams() {
    let python = test_python();
    let dir = smollm_repository("");
    let server = Server::start(&dir, &[]).await;
    let base = server.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(repo_root().join("tests/clients/openai_client.py"))
            .args([&base, SMOLLM])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "the openai client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got: Value = serde_json::from_slice(&output.stdout).unwrap();
    // What the library parsed must equal what the server sent without it.
    let (_, whole) = server
        .post(
            "/v1/chat/completions",
            json!({"model": SMOLLM, "messages": [{"role": "user", "content": "Name three colours."}],
                   "max_tokens": 16, "temperature": 0}),
        )
        .await;
    let text = whole["choices"][0]["message"]["content"].clone();
    assert!(!text.as_str().unwrap().is_empty());
    assert_eq!(got["whole"], text);
    assert_eq!(
        got["streamed"], text,
        "the stream reassembles to the whole answer"
    );
    assert!(got["stream_chunks"].as_u64().unwrap() > 1, "{got}");
    assert_eq!(got["roles"], json!(["assistant"]));
    assert_eq!(got["stream_finish"], whole["choices"][0]["finish_reason"]);
    // The library's whole answer came first; its stream and the answer above came after and
    // took all but the last two prompt tokens from the prefix cache, and their usage says so.
    assert_eq!(got["stream_usage"], whole["usage"]);
    let prompt_tokens = whole["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = |usage: &Value| usage["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert_eq!(cached(&got["whole_usage"]), Some(0), "{got}");
    assert_eq!(cached(&whole["usage"]), Some(prompt_tokens - 2), "{whole}");
    let mut whole_usage = got["whole_usage"].clone();
    whole_usage["prompt_tokens_details"] = whole["usage"]["prompt_tokens_details"].clone();
    assert_eq!(whole_usage, whole["usage"]);
    assert!(
        got["completion"].as_str().unwrap().starts_with(" 5, 6"),
        "{got}"
    );
    assert_eq!(got["error"], json!({"status": 400, "param": "messages"}));
}
