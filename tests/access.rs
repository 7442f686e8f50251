//! Access control over real HTTP: API keys for inference, the admin key for operator endpoints,
//! open probes, both error shapes, and nothing computed for a refused request.

mod common;

use common::*;
use serde_json::{json, Value};

const MODEL: &str = "encoder";

async fn keyed_server(extra: &[&str]) -> Server {
    let models = repository_with(&[(MODEL, "")]);
    let key_file = models.join("keys.txt");
    std::fs::write(
        &key_file,
        "# inference keys\nfile-key-1\n\n  file-key-2  \n",
    )
    .unwrap();
    let mut args = vec![
        "--api-key",
        "flag-key",
        "--api-key-file",
        key_file.to_str().unwrap(),
        "--admin-key",
        "admin-key",
    ];
    args.extend_from_slice(extra);
    Server::start(&models, &args).await
}

async fn call(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = server.client.request(method.clone(), server.url(path));
    if method == reqwest::Method::POST {
        request = request.json(&json!({"model": MODEL, "input": "hello"}));
    }
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn inference_needs_a_valid_key_and_refusals_compute_nothing() {
    let server = keyed_server(&[]).await;
    let post = reqwest::Method::POST;
    let before = batches(MODEL, &server.metrics().await);

    // Missing and wrong keys: 401 in each API's shape, with a Bearer challenge.
    let (status, headers, body) = call(&server, post.clone(), "/v1/embeddings", None).await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "missing_api_key");
    assert_eq!(body["error"]["type"], "authentication_error");
    let (status, _, body) = call(&server, post.clone(), "/v1/embeddings", Some("nope")).await;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let path = format!("/v2/models/{MODEL}/infer");
    let (status, _, body) = call(&server, post.clone(), &path, Some("nope")).await;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("not valid"),
        "{body}"
    );
    let (status, _, _) = call(&server, reqwest::Method::GET, "/v1/models", None).await;
    assert_eq!(status, 401, "listing models needs a key too");
    assert_eq!(
        batches(MODEL, &server.metrics().await),
        before,
        "a refused request reached the model"
    );

    // Every configured key works: flag, both lines of the file, and the admin key.
    for key in ["flag-key", "file-key-1", "file-key-2", "admin-key"] {
        let (status, _, body) = call(&server, post.clone(), "/v1/embeddings", Some(key)).await;
        assert_eq!(status, 200, "{key}: {body}");
    }
    assert_eq!(batches(MODEL, &server.metrics().await), before + 4.0);
    // Probes and metrics stay open by default.
    let (status, _, _) = call(&server, reqwest::Method::GET, "/health/ready", None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_endpoints_take_only_the_admin_key_when_closed() {
    let server = keyed_server(&["--open-metrics", "false", "--open-health", "false"]).await;
    let get = reqwest::Method::GET;
    let (status, _, _) = call(&server, get.clone(), "/metrics", None).await;
    assert_eq!(status, 401);
    let (status, _, body) = call(&server, get.clone(), "/metrics", Some("flag-key")).await;
    assert_eq!(status, 403);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "insufficient_scope");
    assert_eq!(body["error"]["type"], "permission_error");
    let (status, _, body) = call(&server, get.clone(), "/metrics", Some("admin-key")).await;
    assert_eq!(status, 200);
    assert!(body.contains("ember_requests_total"));
    // Keyed health: any valid key.
    let (status, _, _) = call(&server, get.clone(), "/v2/health/ready", None).await;
    assert_eq!(status, 401);
    let (status, _, _) = call(&server, get, "/v2/health/ready", Some("file-key-2")).await;
    assert_eq!(status, 200);
}

#[test]
fn a_server_without_keys_says_it_is_open_and_keys_never_reach_the_log() {
    // A missing repository stops the server right after the access line is logged.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["serve", "--models", "/nonexistent-ember-repo"])
        .env("EMBER_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("no API key configured"), "{log}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["serve", "--models", "/nonexistent-ember-repo"])
        .env("EMBER_LOG", "debug")
        .env("EMBER_API_KEY", "very-secret-key")
        .env("EMBER_ADMIN_KEY", "very-secret-admin")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("access control on: 1 API key(s)"), "{log}");
    assert!(!log.contains("very-secret"), "{log}");
}
