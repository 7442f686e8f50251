//! Test helpers shared by the integration tests: the real `ember` binary on 127.0.0.1:0 with the
//! real models, reference fixtures, and small HTTP helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const MINILM: &str = "all-MiniLM-L6-v2";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real all-MiniLM-L6-v2 weights; fails loudly, saying what to run, when they are missing.
pub fn minilm_weights() -> PathBuf {
    let dir = repo_root().join("models").join(MINILM).join("weights");
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file(),
        "the all-MiniLM-L6-v2 weights are missing from {}: run `models/fetch.sh` first \
         (scripts/test.sh does)",
        dir.display()
    );
    dir
}

pub const SMOLLM: &str = "SmolLM2-135M-Instruct";

/// The real SmolLM2-135M-Instruct GGUF; fails loudly, saying what to run, when it is missing.
pub fn smollm_gguf() -> PathBuf {
    let file = repo_root()
        .join("models")
        .join(SMOLLM)
        .join("weights/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        file.is_file(),
        "the SmolLM2 GGUF is missing at {}: run `models/fetch.sh` first (scripts/test.sh does)",
        file.display()
    );
    file
}

/// A throw-away model repository holding the demo encoder under `name` with this `[batching]`
/// table (TOML lines), pointing at the real weights.
pub fn repository_with(models: &[(&str, &str)]) -> PathBuf {
    let dir = temp_repository();
    let weights = minilm_weights();
    for (name, batching) in models {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join("model.toml"),
            format!(
                "task = \"embed\"\nformat = \"safetensors\"\npath = {:?}\ntier = \"edge\"\n[batching]\n{batching}\n",
                weights.display().to_string()
            ),
        )
        .unwrap();
    }
    dir
}

/// Adds a committed demo tensor model (`models/<name>`) to a repository; a `[batching]` table
/// given here replaces the model's own.
pub fn add_tensor_model(dir: &Path, name: &str, batching: &str) {
    let from = repo_root().join("models").join(name);
    let onnx = from.join("model.onnx");
    assert!(
        onnx.is_file(),
        "{} is missing: it is committed (scripts/make_tensor_models.py makes it)",
        onnx.display()
    );
    let toml = std::fs::read_to_string(from.join("model.toml")).unwrap();
    let toml = toml.replace(
        "path = \"model.onnx\"",
        &format!("path = {:?}", onnx.display().to_string()),
    );
    let toml = match toml.split_once("[batching]") {
        Some((head, _)) if !batching.is_empty() => format!("{head}{batching}"),
        _ => toml,
    };
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    std::fs::write(to.join("model.toml"), toml).unwrap();
}

/// A throw-away model repository holding the demo generation model with this `[generate]`
/// table (TOML lines), pointing at the real GGUF.
pub fn smollm_repository(generate_table: &str) -> PathBuf {
    let dir = temp_repository();
    add_smollm(&dir, generate_table);
    dir
}

/// Adds the demo generation model to a repository.
pub fn add_smollm(dir: &Path, generate_table: &str) {
    let folder = dir.join(SMOLLM);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("model.toml"),
        format!(
            "task = \"generate\"\nformat = \"gguf\"\npath = {:?}\n[generate]\n{generate_table}\n",
            smollm_gguf().display().to_string()
        ),
    )
    .unwrap();
}

/// The Python that has the third-party test tools (`openai`, `schemathesis`):
/// EMBER_TEST_PYTHON, or the venv scripts/setup_test_python.sh makes. Fails loudly when missing.
pub fn test_python() -> PathBuf {
    let path = std::env::var_os("EMBER_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("EMBER_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                        .join(".cache/ember")
                });
            cache.join("test-venv/bin/python")
        });
    assert!(
        path.is_file(),
        "no test Python at {}: run scripts/setup_test_python.sh (scripts/test.sh does) or set \
         EMBER_TEST_PYTHON",
        path.display()
    );
    path
}

/// A fresh folder name under the system's temp dir, unique within this test run.
pub fn temp_repository() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "ember-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ))
}

/// A running `ember serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Server {
    /// Starts the real binary on a free loopback port and waits until it is ready.
    pub async fn start(models: &Path, extra: &[&str]) -> Server {
        Server::start_at(models, "127.0.0.1:0", extra).await
    }

    /// `ember serve` on a given address (to bring a killed server back on its port).
    pub async fn start_at(models: &Path, addr: &str, extra: &[&str]) -> Server {
        let mut args = vec![
            "serve".into(),
            "--models".into(),
            models.display().to_string(),
        ];
        args.extend(["--addr".to_string(), addr.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::spawn(&args).await
    }

    /// `ember edge` on a free loopback port, forwarding to `upstream`.
    pub async fn start_edge(models: &Path, upstream: &str, extra: &[&str]) -> Server {
        let mut args = vec![
            "edge".into(),
            "--models".into(),
            models.display().to_string(),
        ];
        args.extend(["--addr", "127.0.0.1:0", "--upstream", upstream].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::spawn(&args).await
    }

    /// Runs the binary with `args` (which include `--addr`) and waits until it is ready.
    pub async fn spawn(args: &[String]) -> Server {
        Server::spawn_with(args, reqwest::Client::new()).await
    }

    /// `ember serve` that is not expected to become ready (a model fails under strict
    /// readiness): waits until it answers, and until `probe` (a GET path) answers 200.
    pub async fn start_unready(models: &Path, extra: &[&str], probe: &str) -> Server {
        let mut args = vec![
            "serve".to_string(),
            "--models".into(),
            models.display().to_string(),
            "--addr".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = Server::launch(&args, reqwest::Client::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = server.client.get(server.url(probe)).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{probe} did not answer 200 in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Server::spawn`] with the client the tests talk through (one that trusts a test CA).
    pub async fn spawn_with(args: &[String], client: reqwest::Client) -> Server {
        let server = Server::launch(args, client);
        // Keyed health probes need one of the server's keys.
        let key = args
            .iter()
            .position(|a| a == "--api-key")
            .and_then(|i| args.get(i + 1));
        server
            .wait_ready(key.map(String::as_str), Duration::from_secs(60))
            .await;
        server
    }

    /// Starts the binary and waits for the address it prints.
    fn launch(args: &[String], client: reqwest::Client) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(args)
            // Warnings help when a test fails; every test server is open on purpose.
            .env("EMBER_LOG", "warn,ember::access=error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the ember binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("ember: listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("ember printed its address");
        Server {
            child,
            base,
            client,
        }
    }

    pub async fn start_default() -> Server {
        minilm_weights();
        Server::start(&repo_root().join("models"), &[]).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn wait_ready(&self, key: Option<&str>, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let mut probe = self.client.get(self.url("/health/ready"));
            if let Some(key) = key {
                probe = probe.bearer_auth(key);
            }
            if let Ok(r) = probe.send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "ember did not become ready in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// POSTs JSON and returns the response itself (headers, streamed body).
    pub async fn send(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> (u16, serde_json::Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends SIGTERM to the server.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one sample line of the Prometheus text format, e.g.
/// `ember_batch_size_items_sum{model="m"}`.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// Batches a model has computed so far, from a metrics scrape.
pub fn batches(model: &str, metrics: &str) -> f64 {
    metric(
        metrics,
        &format!("ember_batch_size_items_count{{model=\"{model}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Runs the binary with `args` and `env` to its end, which must be a failure (a start-up it
/// refuses); returns what it wrote on stderr.
pub fn refused_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the ember binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "ember {args:?} started: {stderr}");
    stderr
}

/// That the server's metrics show its CPU kernels capped at `cap` (`--cpu-isa`), running what
/// this CPU has within it.
pub async fn assert_capped(server: &Server, cap: &str) {
    let text = server.metrics().await;
    let runs = capped_isa(cap);
    assert_eq!(
        metric(
            &text,
            &format!("ember_cpu_kernels_info{{cap=\"{cap}\",isa=\"{runs}\"}}")
        ),
        Some(1.0),
        "{text}"
    );
}

/// The kernel family `ember serve --cpu-isa <cap>` runs on this CPU, for caps up to
/// `avx512-core`.
fn capped_isa(cap: &str) -> &'static str {
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512) = (
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma"),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, avx512) = (false, false);
    match cap {
        "avx512-core" if avx512 => "avx512-core",
        "avx512-core" | "avx2" if avx2 => "avx2",
        "avx512-core" | "avx2" | "portable" => "portable",
        other => panic!("capped_isa covers portable, avx2 and avx512-core, not {other}"),
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn vector(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The reference embeddings (numpy BERT cross-checked with sentence-transformers; see the
/// fixture's `source`).
pub struct ReferenceCase {
    pub text: String,
    pub tokens: usize,
    pub truncated: bool,
    pub embedding: Vec<f32>,
}

/// A JSON fixture from `tests/fixtures/`.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = repo_root().join("tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// llama.cpp's own logits for the same prompt differ by σ ≈ 0.12 between its batched prompt
/// evaluation and one-token-at-a-time evaluation (measured with llama-cpp-python 0.3.36), and
/// ours differ from either by about as much: where its top two tokens are closer than this,
/// either choice is a correct greedy step. 0.5 is four of those σ.
pub const DECISIVE_MARGIN: f64 = 0.5;

/// A greedy fixture case's top-2 logit margin at each step of llama.cpp's path.
pub fn margins(case: &serde_json::Value) -> Vec<f64> {
    case["top2_margins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_f64().unwrap())
        .collect()
}

/// Whether llama.cpp's greedy path for this case never came near a tie.
pub fn decisive(case: &serde_json::Value) -> bool {
    margins(case).iter().all(|&m| m >= DECISIVE_MARGIN)
}

/// The first completion of the llama.cpp fixture whose greedy path never came near a tie.
pub fn decisive_completion() -> serde_json::Value {
    fixture("smollm2_greedy.json")["completion"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| decisive(c))
        .expect("a decisive completion case in the fixture")
        .clone()
}

/// A greedy, streamed `/v1/completions` request for a fixture case, as long as its reference.
pub fn greedy_stream_request(case: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({"model": SMOLLM, "prompt": case["prompt"], "max_tokens": 24,
                       "temperature": 0, "stream": true})
}

/// The text a finished stream carried; it must end with `[DONE]`.
pub fn stream_text(events: &[String]) -> String {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| delta_text(e))
        .collect()
}

pub fn reference_cases() -> Vec<ReferenceCase> {
    fixture("minilm_embeddings.json")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ReferenceCase {
            text: c["text"].as_str().unwrap().to_string(),
            tokens: c["tokens"].as_u64().unwrap() as usize,
            truncated: c["truncated"].as_bool().unwrap(),
            embedding: vector(&c["embedding"]),
        })
        .collect()
}

/// Reads SSE events (`data:` payloads) as they arrive.
pub struct Events {
    stream: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: String,
}

impl Events {
    pub fn new(response: reqwest::Response) -> Self {
        use futures::StreamExt;
        Self {
            stream: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` at the end of the body (an error in the body is a test failure:
    /// the edge must end streams cleanly).
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                if let Some(data) = event.trim_end().strip_prefix("data: ") {
                    return Some(data.to_string());
                }
                continue;
            }
            use futures::StreamExt;
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.stream.next())
                .await
                .expect("the stream neither sent an event nor ended within 30 s")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk.expect("the body ends cleanly")).unwrap());
        }
    }

    pub async fn rest(&mut self) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(e) = self.next().await {
            all.push(e);
        }
        all
    }
}

/// The text an event carries: a chat delta or a completion's text.
pub fn delta_text(event: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(event).unwrap();
    let choice = &v["choices"][0];
    choice["delta"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .unwrap_or_default()
        .to_string()
}
