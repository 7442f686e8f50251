#!/usr/bin/env bash
# The soak of BENCHMARKS.md (outside CI): the demo repository served by `ember serve`, then
# ember-soak for SECONDS (default 660: 11 minutes) at twice the measured embeddings capacity,
# with chat streams (a quarter of them dropped mid-stream) and a trickle of bad requests.
# Fails if any request is lost, any 5xx other than 503/504 appears, a bad request is
# accepted, or the server dies.
#   loadtest/soak.sh [SECONDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-660}
models/fetch.sh
cargo build --release --locked --bin ember
cargo build --release --locked -p ember-loadtest
log=$(mktemp)
target/release/ember serve --models models --addr 127.0.0.1:18390 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 300); do
  curl -sf http://127.0.0.1:18390/health/ready >/dev/null && break
  sleep 0.1
done
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); ember $(git rev-parse --short HEAD)"
target/release/ember-soak --url http://127.0.0.1:18390 --pid "$server" \
  --tokenizer models/all-MiniLM-L6-v2/weights/tokenizer.json --secs "$secs"
echo "== server log: $(grep -c ' ERROR ' "$log" || true) error lines"
