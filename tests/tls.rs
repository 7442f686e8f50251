//! HTTPS on the real binary: `ember serve --tls-cert/--tls-key` with a test CA made here, a client
//! that trusts it and ones that do not, and an edge that reaches the cloud over `https://` with
//! `--upstream-ca`, on the real models.
#![cfg(feature = "tls")]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::{json, Value};

/// A CA and a leaf certificate for `localhost` and 127.0.0.1 that it signed, as PEM files.
struct Pki {
    ca_pem: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("Ember test CA {name}"));
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let pki = Pki {
            ca_pem: ca.pem(),
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&pki.ca, &pki.ca_pem).unwrap();
        std::fs::write(&pki.cert, leaf.pem()).unwrap();
        std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
        pki
    }

    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    fn serve_args(&self, models: &Path, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["serve", "--addr", "127.0.0.1:0", "--models"]
            .map(String::from)
            .into();
        args.push(models.display().to_string());
        args.extend(["--tls-cert".into(), self.cert.display().to_string()]);
        args.extend(["--tls-key".into(), self.key.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }
}

fn port(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().parse().unwrap()
}

async fn embedding_cosine(response: reqwest::Response, reference: &ReferenceCase) -> f64 {
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    cosine(&vector(&body["data"][0]["embedding"]), &reference.embedding)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_speaks_https_only_to_clients_that_trust_its_certificate() {
    let models = repository_with(&[(MINILM, "")]);
    let pki = Pki::new(&models.join("pki"), "cloud");
    let cloud = Server::spawn_with(&pki.serve_args(&models, &[]), pki.client()).await;
    assert!(
        cloud.base.starts_with("https://127.0.0.1:"),
        "{}",
        cloud.base
    );
    let port = port(&cloud.base);

    // The real model over HTTPS, by address and by host name.
    let reference = &reference_cases()[0];
    let request = json!({"model": MINILM, "input": reference.text});
    let cos = embedding_cosine(cloud.send("/v1/embeddings", &request).await, reference).await;
    assert!(cos >= 0.9999, "cosine to the reference {cos}");
    let by_name = cloud
        .client
        .post(format!("https://localhost:{port}/v1/embeddings"))
        .json(&request)
        .send()
        .await
        .unwrap();
    let cos = embedding_cosine(by_name, reference).await;
    assert!(cos >= 0.9999, "cosine to the reference {cos}");

    // Plain HTTP on the TLS port, and a client that trusts another CA, get no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/health/ready"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    let stranger = Pki::new(&models.join("pki"), "stranger");
    let refused = stranger
        .client()
        .get(cloud.url("/health/ready"))
        .send()
        .await
        .expect_err("a client that does not trust the certificate was answered");
    assert!(
        format!("{refused:?}").contains("UnknownIssuer"),
        "{refused:?}"
    );

    // A client that opens a connection and never starts its handshake holds up no one.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        cloud.client.get(cloud.url("/health/ready")).send(),
    )
    .await
    .expect("a silent client held up the accept loop")
    .unwrap();
    assert_eq!(answered.status(), 200);

    // Past the connection limit the refusal is an HTTPS answer too. The test client's pooled
    // keep-alive connection holds the only slot.
    let limited = Server::spawn_with(
        &pki.serve_args(&models, &["--max-connections", "1"]),
        pki.client(),
    )
    .await;
    let refused = pki
        .client()
        .get(limited.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_certificate_files_stop_start_up_with_their_names() {
    let models = repository_with(&[(MINILM, "")]);
    let pki = Pki::new(&models.join("pki"), "cloud");
    let other = Pki::new(&models.join("pki"), "other");
    let missing = models.join("pki/missing.pem");
    let cases: [(&Path, &Path, &str); 3] = [
        (&missing, &pki.key, "missing.pem"),
        (&pki.cert, &pki.cert, "cloud-cert.pem"),
        (&pki.cert, &other.key, "do not make a usable pair"),
    ];
    for (cert, key, expected) in cases {
        let stderr = refused_start(
            &[
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--models",
                models.to_str().unwrap(),
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
            &[],
        );
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    }
    let stderr = refused_start(&["serve", "--tls-cert", pki.cert.to_str().unwrap()], &[]);
    assert!(
        stderr.contains("--tls-key"),
        "a certificate without its key is refused"
    );
}

#[cfg(feature = "edge")]
#[tokio::test(flavor = "multi_thread")]
async fn the_edge_reaches_an_https_cloud_through_its_ca_and_refuses_an_untrusted_one() {
    let models = repository_with(&[(MINILM, "")]);
    add_smollm(&models, "");
    let pki = Pki::new(&models.join("pki"), "cloud");
    let cloud = Server::spawn_with(&pki.serve_args(&models, &[]), pki.client()).await;
    let upstream = format!("https://localhost:{}", port(&cloud.base));
    let ca = pki.ca.display().to_string();
    // A 1 MB budget: nothing is local, everything crosses TLS.
    let edge = Server::start_edge(
        &models,
        &upstream,
        &["--upstream-ca", &ca, "--edge-max-model-mb", "1"],
    )
    .await;

    let reference = &reference_cases()[0];
    let r = edge
        .send(
            "/v1/embeddings",
            &json!({"model": MINILM, "input": reference.text}),
        )
        .await;
    assert_eq!(r.headers()["x-ember-served-by"], "cloud");
    let cos = embedding_cosine(r, reference).await;
    assert!(cos >= 0.9999, "cosine to the reference {cos}");

    // A stream crosses TLS event by event, and its text is llama.cpp's greedy output.
    let case = decisive_completion();
    let r = edge
        .send("/v1/completions", &greedy_stream_request(&case))
        .await;
    assert_eq!(r.status(), 200);
    let events = Events::new(r).rest().await;
    assert!(events.len() > 5, "{} events", events.len());
    assert_eq!(stream_text(&events), case["greedy_text"].as_str().unwrap());

    // An edge that trusts another CA never reaches the cloud: the probe says why, requests
    // get the edge's 503, and no request body reaches a server it cannot authenticate.
    let stranger = Pki::new(&models.join("pki"), "stranger");
    let wary = Server::start_edge(
        &models,
        &upstream,
        &[
            "--upstream-ca",
            &stranger.ca.display().to_string(),
            "--edge-max-model-mb",
            "1",
        ],
    )
    .await;
    let (status, body) = wary
        .post("/v1/embeddings", json!({"model": MINILM, "input": "x"}))
        .await;
    assert!(matches!(status, 502 | 503), "{status} {body}");
    assert_eq!(
        metric(&wary.metrics().await, "ember_edge_upstream_up"),
        Some(0.0)
    );
    let served = metric(
        cloud.metrics().await.as_str(),
        &format!(
            "ember_requests_total{{model=\"{MINILM}\",route=\"/v1/embeddings\",status=\"200\"}}"
        ),
    );
    assert_eq!(
        served,
        Some(1.0),
        "only the trusting edge's request arrived"
    );
}
