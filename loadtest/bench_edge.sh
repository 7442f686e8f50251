#!/usr/bin/env bash
# The edge benchmark of BENCHMARKS.md, in one run on this machine:
#   1. the lean edge build (`--no-default-features --features edge`): binary size, and resident
#      memory when idle with no models;
#   2. the latency a hop adds to one small embeddings request (12 tokens, one request at a time):
#      the cloud tier called directly, through the lean `ember edge` (which forwards the model),
#      and through nginx as a plain keep-alive reverse proxy. ember-loadtest --compare takes the
#      three in turn, request by request, so drift in the machine's speed hits all alike.
#      One model call costs milliseconds and varies more than a hop costs, so the comparison
#      runs several rounds; quote the median of the rounds.
#   loadtest/bench_edge.sh [REQUESTS_PER_TARGET_PER_ROUND] [ROUNDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
requests=${1:-3000}
rounds=${2:-3}
models/fetch.sh all-MiniLM-L6-v2
loadtest/peers/setup_nginx.sh
nginx=$(command -v nginx || echo /usr/sbin/nginx)
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT

cargo build --release --locked --no-default-features --features edge --bin ember
cp target/release/ember "$out/ember-edge"
strip -o "$out/ember-edge-stripped" "$out/ember-edge"
cargo build --release --locked --bin ember
cargo build --release --locked -p ember-loadtest
strip -o "$out/ember-full-stripped" target/release/ember

wait_ready() { # port log
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$1/health/ready" >/dev/null && return
    sleep 0.1
  done
  echo "no server on port $1; see $2" >&2; exit 1
}

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== binary size (bytes): lean edge $(stat -c %s "$out/ember-edge"), stripped $(stat -c %s "$out/ember-edge-stripped"); full build stripped $(stat -c %s "$out/ember-full-stripped")"

mkdir -p "$out/empty" "$out/repo/all-MiniLM-L6-v2"
"$out/ember-edge-stripped" edge --models "$out/empty" --addr 127.0.0.1:18281 \
  --upstream http://127.0.0.1:18280 >"$out/idle.log" 2>&1 &
idle=$!
wait_ready 18281 "$out/idle.log"
sleep 3
echo "== lean edge, idle, no models: $(grep -E 'VmRSS' /proc/$idle/status | xargs), peak $(grep -E 'VmHWM' /proc/$idle/status | awk '{print $2, $3}')"
kill $idle

# The cloud tier serves the encoder; the edge has no local model, so it forwards every request.
cat >"$out/repo/all-MiniLM-L6-v2/model.toml" <<TOML
task = "embed"
format = "safetensors"
path = "$PWD/models/all-MiniLM-L6-v2/weights"
tier = "cloud"
[batching]
max_queue_delay_ms = 0
instances = 2
TOML
target/release/ember serve --models "$out/repo" --addr 127.0.0.1:18280 >"$out/cloud.log" 2>&1 &
wait_ready 18280 "$out/cloud.log"
"$out/ember-edge" edge --models "$out/empty" --addr 127.0.0.1:18281 \
  --upstream http://127.0.0.1:18280 >"$out/edge.log" 2>&1 &
wait_ready 18281 "$out/edge.log"
cat >"$out/nginx.conf" <<CONF
worker_processes auto;
daemon off;
pid $out/nginx.pid;
error_log $out/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $out/nginx-body;
  proxy_temp_path $out/nginx-proxy;
  upstream cloud { server 127.0.0.1:18280; keepalive 16; }
  server {
    listen 127.0.0.1:18282;
    location / {
      proxy_pass http://cloud;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
CONF
"$nginx" -c "$out/nginx.conf" -e "$out/nginx-error.log" &
sleep 1
echo "== added latency: $rounds rounds of $requests interleaved requests per target (12-token embeddings)"
echo "== peer: $("$nginx" -v 2>&1)"
for round in $(seq "$rounds"); do
  echo "-- round $round"
  target/release/ember-loadtest --compare \
    direct=http://127.0.0.1:18280,edge=http://127.0.0.1:18281,nginx=http://127.0.0.1:18282 \
    --tokenizer models/all-MiniLM-L6-v2/weights/tokenizer.json --tokens 12 \
    --max-requests "$requests" --secs 600
done
