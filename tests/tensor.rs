//! Tensor models (ONNX on candle) behind the KServe v2 tensor protocol, over real HTTP: the demo
//! classifiers against onnxruntime's outputs (recorded by tests/reference/make_tensor_fixtures.py),
//! batching along dimension 0, the binary data extension, and every bad input a clear 400.
//! Small graphs made here (exact arithmetic as the reference) cover types and load failures.

mod common;

use std::path::Path;

use candle_onnx::onnx;
use common::*;
use onnx::tensor_proto::DataType as Onnx;
use prost::Message;
use serde_json::{json, Value};

const TOLERANCE: f64 = 1e-4;
const DEMO_MODELS: [&str; 3] = ["digits-cnn", "digits-mlp", "tabular-mlp"];

/// A repository holding the committed demo classifiers.
fn demo_repository(batching: &str) -> std::path::PathBuf {
    let dir = temp_repository();
    for name in DEMO_MODELS {
        add_tensor_model(&dir, name, batching);
    }
    dir
}

fn max_diff(got: &Value, want: &Value) -> f64 {
    let (got, want) = (got.as_array().unwrap(), want.as_array().unwrap());
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g.as_f64().unwrap() - w.as_f64().unwrap()).abs())
        .fold(0.0, f64::max)
}

/// Rows `start..start + n` of a fixture tensor, as a request tensor.
fn rows(name: &str, tensor: &Value, start: usize, n: usize) -> Value {
    let shape: Vec<usize> = serde_json::from_value(tensor["shape"].clone()).unwrap();
    let row: usize = shape[1..].iter().product();
    let data = &tensor["data"].as_array().unwrap()[start * row..(start + n) * row];
    let mut shape = shape;
    shape[0] = n;
    json!({"name": name, "datatype": tensor["datatype"], "shape": shape, "data": data})
}

fn output<'a>(response: &'a Value, name: &str) -> &'a Value {
    response["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {response}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_classifiers_match_onnxruntime_batched_and_alone() {
    let fixture = fixture("tensor_outputs.json");
    // A long queue delay makes concurrent single rows meet in one batch.
    let repo = demo_repository("[batching]\nmax_batch_size = 16\nmax_queue_delay_ms = 50\n");
    let server = Server::start(&repo, &[]).await;

    for name in DEMO_MODELS {
        let case = &fixture["models"][name];
        let inputs = case["inputs"].as_object().unwrap();
        let total = inputs.values().next().unwrap()["shape"][0]
            .as_u64()
            .unwrap() as usize;
        let path = format!("/v2/models/{name}/infer");

        // Every row in one request.
        let all: Vec<Value> = inputs.iter().map(|(n, t)| rows(n, t, 0, total)).collect();
        let (status, whole) = server
            .post(&path, json!({"id": "all", "inputs": all}))
            .await;
        assert_eq!(status, 200, "{whole}");
        assert_eq!(whole["id"], "all");
        assert_eq!(whole["model_name"], name);
        for (out, want) in case["outputs"].as_object().unwrap() {
            let got = output(&whole, out);
            assert_eq!(got["shape"], want["shape"], "{name}/{out}");
            assert_eq!(got["datatype"], want["datatype"]);
            let diff = max_diff(&got["data"], &want["data"]);
            assert!(diff <= TOLERANCE, "{name}/{out}: {diff} from onnxruntime");
        }

        // Each row alone, all at once: they share batches and give the same numbers.
        let before = batches(name, &server.metrics().await);
        let singles = (0..total).map(|r| {
            let one: Vec<Value> = inputs.iter().map(|(n, t)| rows(n, t, r, 1)).collect();
            let (server, path) = (&server, &path);
            async move { server.post(path, json!({"inputs": one})).await }
        });
        let singles = futures::future::join_all(singles).await;
        for (out, want) in case["outputs"].as_object().unwrap() {
            let width = want["data"].as_array().unwrap().len() / total;
            for (r, (status, single)) in singles.iter().enumerate() {
                assert_eq!(*status, 200, "{single}");
                let got = &output(single, out)["data"];
                let batched =
                    &output(&whole, out)["data"].as_array().unwrap()[r * width..(r + 1) * width];
                let reference = &want["data"].as_array().unwrap()[r * width..(r + 1) * width];
                assert!(
                    max_diff(got, &Value::from(batched)) <= 1e-5,
                    "{name} row {r}: alone vs batched"
                );
                assert!(
                    max_diff(got, &Value::from(reference)) <= TOLERANCE,
                    "{name} row {r}"
                );
            }
        }
        let metrics = server.metrics().await;
        let used = batches(name, &metrics) - before;
        assert!(
            used < total as f64,
            "{name}: {total} concurrent rows took {used} batches; none were stacked"
        );
    }
}

/// One image as a binary tensor, the output asked back as binary, and the top classes.
#[tokio::test(flavor = "multi_thread")]
async fn binary_tensors_and_classification_on_the_cnn() {
    let fixture = fixture("tensor_outputs.json");
    let case = &fixture["models"]["digits-cnn"];
    let image = &case["inputs"]["image"];
    let want = &case["outputs"]["probabilities"]["data"];
    let n = image["shape"][0].as_u64().unwrap() as usize;
    let server = Server::start(&demo_repository(""), &[]).await;

    let floats: Vec<f32> = image["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let payload: Vec<u8> = floats.iter().flat_map(|x| x.to_le_bytes()).collect();
    for (outputs, binary) in [
        (
            json!([{"name": "probabilities", "parameters": {"binary_data": true}}]),
            true,
        ),
        (
            json!([{"name": "probabilities", "parameters": {"classification": 2}}]),
            false,
        ),
    ] {
        let header = json!({
            "id": "bin",
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [n, 28, 28, 1],
                        "parameters": {"binary_data_size": payload.len()}}],
            "outputs": outputs,
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&payload);
        let r = server
            .client
            .post(server.url("/v2/models/digits-cnn/infer"))
            .header("inference-header-content-length", header.len())
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if binary {
            let json_len: usize = r.headers()["inference-header-content-length"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let bytes = r.bytes().await.unwrap();
            let head: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
            assert_eq!(head["id"], "bin");
            let out = output(&head, "probabilities");
            assert_eq!(out["shape"], json!([n, 10]));
            assert_eq!(out["parameters"]["binary_data_size"], n * 10 * 4);
            assert!(out.get("data").is_none(), "{out}");
            let got: Vec<Value> = bytes[json_len..]
                .chunks_exact(4)
                .map(|c| Value::from(f32::from_le_bytes(c.try_into().unwrap()) as f64))
                .collect();
            assert!(max_diff(&Value::from(got), want) <= TOLERANCE);
        } else {
            let body: Value = r.json().await.unwrap();
            let out = output(&body, "probabilities");
            assert_eq!(out["datatype"], "BYTES");
            assert_eq!(out["shape"], json!([n, 2]));
            let labels = out["data"].as_array().unwrap();
            let want = want.as_array().unwrap();
            for row in 0..n {
                let scores = &want[row * 10..row * 10 + 10];
                let best = (0..10)
                    .max_by(|&a, &b| {
                        scores[a]
                            .as_f64()
                            .unwrap()
                            .total_cmp(&scores[b].as_f64().unwrap())
                    })
                    .unwrap();
                let top = labels[row * 2].as_str().unwrap();
                let (score, index) = top.split_once(':').unwrap();
                assert_eq!(index.parse::<usize>().unwrap(), best, "row {row}: {top}");
                assert!(
                    (score.parse::<f64>().unwrap() - scores[best].as_f64().unwrap()).abs()
                        <= TOLERANCE
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_comes_from_the_graph() {
    let server = Server::start(&demo_repository(""), &[]).await;
    let (status, meta) = server.get("/v2/models/digits-cnn").await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["platform"], "candle_onnx");
    assert_eq!(
        meta["inputs"],
        json!([{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1]}])
    );
    assert_eq!(
        meta["outputs"],
        json!([{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}])
    );
    let (_, meta) = server.get("/v2/models/tabular-mlp").await;
    let names: Vec<&str> = meta["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["logits", "probabilities"]);
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 100]));
    let (status, ready) = server.get("/v2/models/digits-mlp/ready").await;
    assert_eq!((status, ready["ready"].clone()), (200, json!(true)));
}

/// Each bad input is a 400 whose message names the input (or output) and the problem.
#[tokio::test(flavor = "multi_thread")]
async fn bad_tensor_inputs_are_refused_with_what_is_wrong() {
    let server = Server::start(&demo_repository(""), &[]).await;
    let path = "/v2/models/digits-mlp/infer";
    let features = |shape: Value, datatype: &str, data: Value| json!({"inputs": [{"name": "features", "shape": shape, "datatype": datatype, "data": data}]});
    let zeros = |n: usize| Value::from(vec![0.0; n]);
    let cases = [
        (
            features(json!([1, 64]), "INT32", Value::from(vec![0; 64])),
            &["\"features\"", "datatype INT32", "FP32"][..],
        ),
        (
            features(json!([64]), "FP32", zeros(64)),
            &["\"features\"", "has 1 dimensions", "[-1, 64]"],
        ),
        (
            features(json!([1, 63]), "FP32", zeros(63)),
            &["\"features\"", "dimension 1 is 63"],
        ),
        (
            features(json!([2, 64]), "FP32", zeros(64)),
            &["\"features\"", "declares 128 elements", "holds 64"],
        ),
        (
            features(json!([1, 64]), "FP32", Value::from(vec!["x"; 64])),
            &["\"features\"", "element 0 (\"x\") is not a FP32"],
        ),
        (
            features(json!([1, 64]), "FLOAT", zeros(64)),
            &["\"features\"", "unknown datatype \"FLOAT\""],
        ),
        (
            features(json!([0, 64]), "FP32", zeros(0)),
            &["\"features\"", "dimension 0", "is 0"],
        ),
        (
            features(json!([1, -64]), "FP32", zeros(64)),
            &["\"features\"", "negative dimension"],
        ),
        (
            features(json!([1, 64]), "FP32", Value::from(vec![1e39; 64])),
            &["\"features\"", "is not a FP32 value"],
        ),
        (
            json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": zeros(64)}]}),
            &["unknown input \"pixels\"", "\"features\""],
        ),
        (json!({"inputs": []}), &["input \"features\" is missing"]),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32"}]}),
            &["\"features\"", "no `data`"],
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": zeros(64)}],
                "outputs": [{"name": "scores"}]}),
            &["unknown output \"scores\"", "\"probabilities\""],
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": zeros(64)}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 11}}]}),
            &["\"probabilities\"", "11 classes", "there are 10"],
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": zeros(64)}],
                "outputs": [{"name": "probabilities", "parameters": {"shared_memory_region": "x"}}]}),
            &[
                "\"probabilities\"",
                "unknown parameter \"shared_memory_region\"",
            ],
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": zeros(64)}],
                "outputs": [{"name": "probabilities"}, {"name": "probabilities"}]}),
            &["output \"probabilities\" is asked for twice"],
        ),
        (
            json!({"inputs": [
                {"name": "features", "shape": [1, 64], "datatype": "FP32", "data": zeros(64)},
                {"name": "features", "shape": [1, 64], "datatype": "FP32", "data": zeros(64)}]}),
            &["input \"features\" is given twice"],
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": zeros(64)}],
                "parameters": {"sequence_id": 3}}),
            &["unknown parameter \"sequence_id\""],
        ),
    ];
    for (body, expected) in cases {
        let (status, err) = server.post(path, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {err}");
        let message = err["error"]
            .as_str()
            .unwrap_or_else(|| panic!("KServe error shape: {err}"));
        for part in expected {
            assert!(
                message.contains(part),
                "{message:?} lacks {part:?} (request {body})"
            );
        }
    }

    // JSON cannot carry NaN or infinity; the binary form can, and they are refused.
    for (value, shown) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let mut floats = vec![0.5f32; 64];
        floats[17] = value;
        let (status, err) = post_binary(&server, path, &[1, 64], &floats, 0, 0).await;
        assert_eq!(status, 400, "{err}");
        let message = err["error"].as_str().unwrap();
        assert!(
            message.contains("\"features\"") && message.contains(&format!("element 17 is {shown}")),
            "{message}"
        );
    }
    // Binary sizes that do not add up.
    for (extra, size_delta, expected) in [
        (0usize, -4i64, "binary_data_size is 252 bytes"),
        (8, 0, "8 bytes after the inputs' binary data"),
        (0, 4, "but only 256 follow"),
    ] {
        let floats = vec![0.5f32; 64];
        let (status, err) = post_binary(&server, path, &[1, 64], &floats, extra, size_delta).await;
        assert_eq!(status, 400, "{err}");
        assert!(err["error"].as_str().unwrap().contains(expected), "{err}");
    }
    // The server is unharmed.
    let (status, _) = server
        .post(path, features(json!([1, 64]), "FP32", zeros(64)))
        .await;
    assert_eq!(status, 200);
}

/// A binary request for `features` whose declared size is off by `size_delta` and whose body
/// carries `extra` stray bytes.
async fn post_binary(
    server: &Server,
    path: &str,
    shape: &[usize],
    floats: &[f32],
    extra: usize,
    size_delta: i64,
) -> (u16, Value) {
    let mut payload: Vec<u8> = floats.iter().flat_map(|x| x.to_le_bytes()).collect();
    let size = payload.len() as i64 + size_delta;
    payload.extend(std::iter::repeat_n(0u8, extra));
    let header = json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": shape,
                                     "parameters": {"binary_data_size": size}}]})
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&payload);
    let r = server
        .client
        .post(server.url(path))
        .header("inference-header-content-length", header.len())
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

// ---- small graphs made here ----

/// A graph input or output; `-1` is a dimension named "batch".
fn value(name: &str, elem: Onnx, dims: &[i64]) -> onnx::ValueInfoProto {
    use onnx::tensor_shape_proto::{dimension::Value as Dim, Dimension};
    let dim = dims
        .iter()
        .map(|&d| Dimension {
            value: Some(if d < 0 {
                Dim::DimParam("batch".into())
            } else {
                Dim::DimValue(d)
            }),
            ..Default::default()
        })
        .collect();
    onnx::ValueInfoProto {
        name: name.into(),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(
                onnx::type_proto::Tensor {
                    elem_type: elem as i32,
                    shape: Some(onnx::TensorShapeProto { dim }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> onnx::NodeProto {
    onnx::NodeProto {
        op_type: op.into(),
        name: format!("{op}_0"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn weights(name: &str, dims: &[i64], data: Vec<f32>) -> onnx::TensorProto {
    onnx::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: Onnx::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

fn graph_bytes(
    nodes: Vec<onnx::NodeProto>,
    inputs: Vec<onnx::ValueInfoProto>,
    outputs: Vec<onnx::ValueInfoProto>,
    initializer: Vec<onnx::TensorProto>,
) -> Vec<u8> {
    onnx::ModelProto {
        ir_version: 8,
        opset_import: vec![onnx::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(onnx::GraphProto {
            name: "test".into(),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn add_model(repo: &Path, name: &str, graph: Vec<u8>, extra_toml: &str) {
    let folder = repo.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("model.onnx"), graph).unwrap();
    std::fs::write(
        folder.join("model.toml"),
        format!("task = \"tensor\"\nformat = \"onnx\"\npath = \"model.onnx\"\n{extra_toml}"),
    )
    .unwrap();
}

/// y = x·W + b with x of shape [batch, 3], W [3, 2]: small enough to check by hand.
const W: [f32; 6] = [1.0, -2.0, 0.5, 0.25, -1.5, 3.0];
const B: [f32; 2] = [0.125, -1.0];

fn linear(x_dims: &[i64]) -> Vec<u8> {
    graph_bytes(
        vec![
            node("MatMul", &["x", "w"], &["xw"]),
            node("Add", &["xw", "b"], &["y"]),
        ],
        vec![value("x", Onnx::Float, x_dims)],
        vec![value("y", Onnx::Float, &[-1, 2])],
        vec![
            weights("w", &[3, 2], W.to_vec()),
            weights("b", &[2], B.to_vec()),
        ],
    )
}

fn linear_reference(x: &[f32]) -> Vec<f64> {
    x.chunks(3)
        .flat_map(|row| {
            (0..2).map(move |j| {
                (0..3)
                    .map(|k| row[k] as f64 * W[k * 2 + j] as f64)
                    .sum::<f64>()
                    + B[j] as f64
            })
        })
        .collect()
}

/// A model with an operator candle-onnx lacks fails alone, named with its operator; the others
/// load and answer, and the failure shows in its routes, in /metrics and in readiness: false by
/// default (strict: a pod with a broken model gets no traffic), true with
/// `--strict-readiness false`.
#[tokio::test(flavor = "multi_thread")]
async fn an_unsupported_operator_fails_its_model_only() {
    let repo = temp_repository();
    add_model(&repo, "linear", linear(&[-1, 3]), "");
    let einsum = graph_bytes(
        vec![node("Einsum", &["x", "x"], &["y"])],
        vec![value("x", Onnx::Float, &[-1, 3])],
        vec![value("y", Onnx::Float, &[-1])],
        vec![],
    );
    add_model(&repo, "einsum", einsum, "");
    let x =
        json!({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]});

    let strict = Server::start_unready(&repo, &[], "/v2/models/linear/ready").await;
    let (status, out) = strict.post("/v2/models/linear/infer", x.clone()).await;
    assert_eq!(status, 200, "the loaded model answers: {out}");
    let (status, ready) = strict.get("/health/ready").await;
    assert_eq!(status, 503);
    assert_eq!(ready, json!({"ready": false, "failed_models": ["einsum"]}));
    drop(strict);

    let server = Server::start(&repo, &["--strict-readiness", "false"]).await;
    let (_, ready) = server.get("/v2/health/ready").await;
    assert_eq!(ready, json!({"ready": true, "failed_models": ["einsum"]}));
    for path in ["/v2/models/einsum", "/v2/models/einsum/ready"] {
        let (status, err) = server.get(path).await;
        assert_eq!(status, 503, "{path}: {err}");
        let message = err["error"].as_str().unwrap();
        assert!(
            message.contains("unsupported ONNX operator: Einsum (node \"Einsum_0\")"),
            "{message}"
        );
    }
    let (status, err) = server.post("/v2/models/einsum/infer", x.clone()).await;
    assert_eq!(status, 503);
    assert!(err["error"].as_str().unwrap().contains("Einsum"), "{err}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, "ember_model_load_failed{model=\"einsum\"}"),
        Some(1.0)
    );
    let (status, out) = server.post("/v2/models/linear/infer", x).await;
    assert_eq!(status, 200, "{out}");
    assert!(
        max_diff(
            &out["outputs"][0]["data"],
            &Value::from(linear_reference(&[1.0, 2.0, 3.0]))
        ) < 1e-6
    );
}

/// A repository whose every model fails does not pretend to serve.
#[test]
fn a_repository_where_nothing_loads_stops_the_server() {
    let repo = temp_repository();
    add_model(&repo, "broken", b"not a protobuf".to_vec(), "");
    let log = refused_start(
        &[
            "serve",
            "--models",
            repo.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(
        log.contains("broken") && log.contains("not an ONNX model"),
        "{log}"
    );
    assert!(log.contains("no model could be loaded"), "{log}");
}

/// model.toml narrows an open dimension: metadata shows it and requests are held to it.
/// Requests of several rows count each row, share batches with single rows, and come back in
/// their own order.
#[tokio::test(flavor = "multi_thread")]
async fn rows_of_many_requests_share_batches_and_come_back_in_order() {
    let repo = temp_repository();
    add_model(
        &repo,
        "linear",
        linear(&[-1, -1]),
        "[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 50\n[[tensor.inputs]]\nname = \"x\"\nshape = [-1, 3]\n",
    );
    let server = Server::start(&repo, &[]).await;
    let (_, meta) = server.get("/v2/models/linear").await;
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 3]));
    let (status, err) = server
        .post("/v2/models/linear/infer", json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}))
        .await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().contains("dimension 1 is 4"),
        "{err}"
    );

    let requests = (0..12usize).map(|i| {
        let rows = 1 + i % 3;
        let x: Vec<f32> = (0..rows * 3).map(|k| (i * 10 + k) as f32 * 0.25 - 3.0).collect();
        let server = &server;
        async move {
            let (status, out) = server
                .post("/v2/models/linear/infer", json!({"inputs": [{"name": "x", "shape": [rows, 3], "datatype": "FP32", "data": x}]}))
                .await;
            assert_eq!(status, 200, "{out}");
            assert_eq!(out["outputs"][0]["shape"], json!([rows, 2]));
            assert!(max_diff(&out["outputs"][0]["data"], &Value::from(linear_reference(&x))) < 1e-5);
            rows
        }
    });
    let rows: usize = futures::future::join_all(requests).await.into_iter().sum();
    let metrics = server.metrics().await;
    let items = metric(&metrics, "ember_batch_size_items_sum{model=\"linear\"}").unwrap();
    assert_eq!(
        items, rows as f64,
        "every row counts once, the refused request none"
    );
    assert!(
        batches("linear", &metrics) < 12.0,
        "no request shared a batch"
    );
}

/// BOOL and FP64 inputs, two outputs (one BOOL), and a fixed dimension 0 (not batched).
#[tokio::test(flavor = "multi_thread")]
async fn other_datatypes_and_a_fixed_batch_dimension() {
    let repo = temp_repository();
    let select = graph_bytes(
        vec![
            node("Where", &["mask", "a", "b"], &["picked"]),
            node("Not", &["mask"], &["flipped"]),
        ],
        vec![
            value("mask", Onnx::Bool, &[-1, 3]),
            value("a", Onnx::Double, &[-1, 3]),
            value("b", Onnx::Double, &[-1, 3]),
        ],
        vec![
            value("picked", Onnx::Double, &[-1, 3]),
            value("flipped", Onnx::Bool, &[-1, 3]),
        ],
        vec![],
    );
    add_model(&repo, "select", select, "");
    add_model(
        &repo,
        "fixed",
        linear(&[2, 3]),
        "[[tensor.outputs]]\nname = \"y\"\nshape = [2, 2]\n",
    );
    // A fixed input whose output has no batch dimension at all: [1, 3] in, [2] out.
    let flat = graph_bytes(
        vec![
            node("MatMul", &["x", "w"], &["xw"]),
            node("Reshape", &["xw", "to"], &["y"]),
        ],
        vec![value("x", Onnx::Float, &[1, 3])],
        vec![value("y", Onnx::Float, &[2])],
        vec![
            weights("w", &[3, 2], W.to_vec()),
            onnx::TensorProto {
                name: "to".into(),
                dims: vec![1],
                data_type: Onnx::Int64 as i32,
                int64_data: vec![2],
                ..Default::default()
            },
        ],
    );
    add_model(&repo, "flat", flat, "");
    let server = Server::start(&repo, &[]).await;

    let (status, out) = server
        .post(
            "/v2/models/select/infer",
            json!({"inputs": [
                {"name": "b", "shape": [2, 3], "datatype": "FP64", "data": [[-1.5, -2.5, -3.5], [-4.5, -5.5, -6.5]]},
                {"name": "mask", "shape": [2, 3], "datatype": "BOOL", "data": [true, false, true, false, false, true]},
                {"name": "a", "shape": [2, 3], "datatype": "FP64", "data": [1.25, 2.25, 3.25, 4.25, 5.25, 6.25]},
            ],
            "outputs": [{"name": "flipped"}, {"name": "picked"}]}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outputs"][0]["name"], "flipped");
    assert_eq!(out["outputs"][0]["datatype"], "BOOL");
    assert_eq!(
        out["outputs"][0]["data"],
        json!([false, true, false, true, true, false])
    );
    assert_eq!(out["outputs"][1]["datatype"], "FP64");
    assert_eq!(
        out["outputs"][1]["data"],
        json!([1.25, -2.5, 3.25, -4.5, -5.5, 6.25])
    );
    let (status, err) = server
        .post(
            "/v2/models/select/infer",
            json!({"inputs": [
                {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": [true, true, true]},
                {"name": "a", "shape": [2, 3], "datatype": "FP64", "data": [0, 0, 0, 0, 0, 0]},
                {"name": "b", "shape": [1, 3], "datatype": "FP64", "data": [0, 0, 0]},
            ]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("disagree on dimension 0"),
        "{err}"
    );

    let (_, meta) = server.get("/v2/models/fixed").await;
    assert_eq!(meta["inputs"][0]["shape"], json!([2, 3]));
    let x = [0.5f32, 1.0, -2.0, 3.0, 0.0, 1.5];
    let (status, out) = server
        .post(
            "/v2/models/fixed/infer",
            json!({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x}]}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert!(
        max_diff(
            &out["outputs"][0]["data"],
            &Value::from(linear_reference(&x))
        ) < 1e-6
    );
    let (status, err) = server
        .post("/v2/models/fixed/infer", json!({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}))
        .await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().contains("dimension 0 is 1"),
        "{err}"
    );

    let (status, out) = server
        .post(
            "/v2/models/flat/infer",
            json!({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outputs"][0]["shape"], json!([2]));
    let want: Vec<f64> = linear_reference(&[1.0, 2.0, 3.0])
        .iter()
        .zip(B)
        .map(|(y, b)| y - b as f64)
        .collect();
    assert!(max_diff(&out["outputs"][0]["data"], &Value::from(want)) < 1e-6);
}

/// A residual block: a value made before a convolution is read after it, and is an output too.
/// (Ember runs convolutions itself and hands the rest of the graph to candle-onnx in pieces.)
#[tokio::test(flavor = "multi_thread")]
async fn a_convolution_with_a_skip_connection() {
    let mut conv = node("Conv", &["r", "w", "b"], &["c"]);
    conv.attribute.push(onnx::AttributeProto {
        name: "pads".into(),
        ints: vec![1, 1, 1, 1],
        r#type: onnx::attribute_proto::AttributeType::Ints as i32,
        ..Default::default()
    });
    let kernel: Vec<f32> = (0..18).map(|i| (i as f32 - 8.0) * 0.125).collect();
    let bias = vec![0.5f32, -0.25];
    let graph = graph_bytes(
        vec![
            node("Relu", &["x"], &["r"]),
            conv,
            node("Add", &["c", "r"], &["y"]),
        ],
        vec![value("x", Onnx::Float, &[-1, 1, 4, 4])],
        vec![
            value("y", Onnx::Float, &[-1, 2, 4, 4]),
            value("r", Onnx::Float, &[-1, 1, 4, 4]),
        ],
        vec![
            weights("w", &[2, 1, 3, 3], kernel.clone()),
            weights("b", &[2], bias.clone()),
        ],
    );
    let repo = temp_repository();
    add_model(&repo, "residual", graph, "");
    let server = Server::start(&repo, &[]).await;

    let x: Vec<f32> = (0..32).map(|i| ((i * 7) % 11) as f32 * 0.5 - 2.0).collect();
    let (status, out) = server
        .post("/v2/models/residual/infer", json!({"inputs": [{"name": "x", "shape": [2, 1, 4, 4], "datatype": "FP32", "data": x}]}))
        .await;
    assert_eq!(status, 200, "{out}");
    // By hand: r = relu(x); y[f] = conv(r, w[f]) + b[f] + r (r broadcast over the 2 filters).
    let r: Vec<f64> = x.iter().map(|&v| v.max(0.0) as f64).collect();
    let mut y = Vec::new();
    for img in 0..2 {
        for f in 0..2 {
            for oy in 0..4i64 {
                for ox in 0..4i64 {
                    let mut sum = bias[f] as f64;
                    for ky in 0..3i64 {
                        for kx in 0..3i64 {
                            let (iy, ix) = (oy + ky - 1, ox + kx - 1);
                            if (0..4).contains(&iy) && (0..4).contains(&ix) {
                                let k = kernel[f * 9 + (ky * 3 + kx) as usize] as f64;
                                sum += k * r[img * 16 + (iy * 4 + ix) as usize];
                            }
                        }
                    }
                    y.push(sum + r[img * 16 + (oy * 4 + ox) as usize]);
                }
            }
        }
    }
    assert_eq!(output(&out, "y")["shape"], json!([2, 2, 4, 4]));
    assert!(max_diff(&output(&out, "y")["data"], &Value::from(y)) < 1e-5);
    assert!(max_diff(&output(&out, "r")["data"], &Value::from(r)) < 1e-7);
}

/// INT64, FP16 and UINT8 inputs; FP32, INT32 (candle-onnx computes it as INT64), FP16 and INT64
/// outputs, exact both ways.
#[tokio::test(flavor = "multi_thread")]
async fn integer_and_half_precision_tensors_round_trip() {
    let cast = |input: &str, output: &str, to: Onnx| {
        let mut n = node("Cast", &[input], &[output]);
        n.name = format!("cast_{output}");
        n.attribute.push(onnx::AttributeProto {
            name: "to".into(),
            i: to as i64,
            r#type: onnx::attribute_proto::AttributeType::Int as i32,
            ..Default::default()
        });
        n
    };
    let graph = graph_bytes(
        vec![
            cast("ids", "ids_f32", Onnx::Float),
            cast("ids", "ids_i32", Onnx::Int32),
            node("Identity", &["half"], &["half_out"]),
            cast("pixels", "pixels_i64", Onnx::Int64),
        ],
        vec![
            value("ids", Onnx::Int64, &[-1, 2]),
            value("half", Onnx::Float16, &[-1, 2]),
            value("pixels", Onnx::Uint8, &[-1, 2]),
        ],
        vec![
            value("ids_f32", Onnx::Float, &[-1, 2]),
            value("ids_i32", Onnx::Int32, &[-1, 2]),
            value("half_out", Onnx::Float16, &[-1, 2]),
            value("pixels_i64", Onnx::Int64, &[-1, 2]),
        ],
        vec![],
    );
    let repo = temp_repository();
    add_model(&repo, "casts", graph, "");
    let server = Server::start(&repo, &[]).await;
    let (_, meta) = server.get("/v2/models/casts").await;
    let types: Vec<&str> = meta["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["datatype"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["FP32", "INT32", "FP16", "INT64"]);
    let (status, out) = server
        .post(
            "/v2/models/casts/infer",
            json!({"inputs": [
                {"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": [3, -7, 1_000_000, 0]},
                {"name": "half", "shape": [2, 2], "datatype": "FP16", "data": [0.5, -1.25, 2.0, 65504.0]},
                {"name": "pixels", "shape": [2, 2], "datatype": "UINT8", "data": [0, 255, 7, 128]},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        output(&out, "ids_f32")["data"],
        json!([3.0, -7.0, 1_000_000.0, 0.0])
    );
    assert_eq!(output(&out, "ids_i32")["datatype"], "INT32");
    assert_eq!(
        output(&out, "ids_i32")["data"],
        json!([3, -7, 1_000_000, 0])
    );
    assert_eq!(
        output(&out, "half_out")["data"],
        json!([0.5, -1.25, 2.0, 65504.0])
    );
    assert_eq!(output(&out, "pixels_i64")["data"], json!([0, 255, 7, 128]));
    // 256 does not fit a UINT8, and 70000 not an FP16.
    for (input, datatype, data) in [
        ("pixels", "UINT8", json!([1, 2, 256, 3])),
        ("half", "FP16", json!([1, 2, 70000, 3])),
    ] {
        let mut body = json!({"inputs": [
            {"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": [0, 0, 0, 0]},
            {"name": "half", "shape": [2, 2], "datatype": "FP16", "data": [0, 0, 0, 0]},
            {"name": "pixels", "shape": [2, 2], "datatype": "UINT8", "data": [0, 0, 0, 0]},
        ]});
        for t in body["inputs"].as_array_mut().unwrap() {
            if t["name"] == input {
                t["data"] = data.clone();
                t["datatype"] = json!(datatype);
            }
        }
        let (status, err) = server.post("/v2/models/casts/infer", body).await;
        assert_eq!(status, 400, "{err}");
        assert!(
            err["error"]
                .as_str()
                .unwrap()
                .contains(&format!("input \"{input}\": element 2")),
            "{err}"
        );
    }
}
