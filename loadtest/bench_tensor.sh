#!/usr/bin/env bash
# The tensor-model benchmark of BENCHMARKS.md, in one run on this machine: the digits-cnn
# classifier (one 28x28x1 image per request, loadtest/scenarios/tensor-cnn.toml) at concurrency 1
# and 32, back to back
#   1. with dynamic batching (the demo model.toml: up to 32 images per forward pass),
#   2. with max_batch_size = 1 (every image its own forward pass),
#   3. JSON and binary bodies (the binary tensor data extension), batching on,
# and side by side the peer most users would otherwise pick: onnxruntime in-process on the same
# graph (2 threads), one image per call and 32 per call.
#   loadtest/bench_tensor.sh [SECONDS_PER_LEVEL]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-10}
PROTOC="$(scripts/setup_protoc.sh)"
export PROTOC
cargo build --release --locked --bin ember && cargo build --release --locked -p ember-loadtest
python="$(scripts/setup_model_tools.sh)"
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT

# shellcheck source=loadtest/bench_lib.sh
source loadtest/bench_lib.sh

repo() { # dir, max_batch_size: a repository with only digits-cnn
  mkdir -p "$1/digits-cnn"
  sed -e "s|^path .*|path = \"$PWD/models/digits-cnn/model.onnx\"|" \
    -e "s|^max_batch_size .*|max_batch_size = $2|" models/digits-cnn/model.toml >"$1/digits-cnn/model.toml"
}

scenario() { # binary (true|false): the shipped scenario at this run's length
  sed -e "s|^seconds_per_level .*|seconds_per_level = $secs|" loadtest/scenarios/tensor-cnn.toml \
    >"$out/tensor-cnn.toml"
  if [[ $1 == true ]]; then
    sed -i 's|(JSON)|(binary tensor data)|' "$out/tensor-cnn.toml"
    echo "binary = true" >>"$out/tensor-cnn.toml"
  fi
  echo "$out/tensor-cnn.toml"
}

load() { # port, label, binary
  echo "-- $2"
  target/release/ember-loadtest run --scenario "$(scenario "$3")" --url "http://127.0.0.1:$1" \
    --out "$out/results-$1" | grep -v '^\['
}

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
repo "$out/batched" 32
repo "$out/single" 1
start "$out/batched" 18091
load 18091 "batching on (max_batch_size = 32), JSON" false
load 18091 "batching on (max_batch_size = 32), binary" true
kill "$server"; wait "$server" 2>/dev/null || true
start "$out/single" 18092
load 18092 "batching off (max_batch_size = 1), JSON" false
kill "$server"; wait "$server" 2>/dev/null || true

echo "== onnxruntime in-process, same graph, 2 threads"
"$python" - "$secs" <<'PY'
import sys, time
import numpy as np, onnxruntime as ort
opts = ort.SessionOptions(); opts.intra_op_num_threads = 2
sess = ort.InferenceSession("models/digits-cnn/model.onnx", opts, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
for batch in (1, 32):
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    latencies, end = [], time.perf_counter() + float(sys.argv[1])
    while time.perf_counter() < end:
        t = time.perf_counter(); sess.run(None, {"image": x}); latencies.append(time.perf_counter() - t)
    ms = np.array(latencies) * 1000
    print(f"onnxruntime batch {batch:>2}: {batch * len(ms) / ms.sum() * 1000:8.1f} images/s, "
          f"per call p50 {np.percentile(ms, 50):.2f} ms p99 {np.percentile(ms, 99):.2f} ms")
PY
