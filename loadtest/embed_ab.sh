#!/usr/bin/env bash
# Two builds of ember on the embeddings benchmark's heaviest level (concurrency 32, short and
# medium texts), each with dynamic batching (the demo model.toml) and with max_batch_size = 1, the
# builds alternating so that a noisy machine's slow and fast minutes fall on both (BENCHMARKS.md).
# Build A first, e.g.
# `git stash; cargo build --release --bin ember; cp target/release/ember /tmp/ember-a`.
# Loopback only; every level bounded in time.
#   loadtest/embed_ab.sh EMBER_A EMBER_B [REPETITIONS] [SECONDS_PER_LEVEL]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/bench_lib.sh
source loadtest/bench_lib.sh
if [ $# -lt 2 ]; then
  echo "usage: loadtest/embed_ab.sh EMBER_A EMBER_B [REPETITIONS] [SECONDS_PER_LEVEL]" >&2
  exit 2
fi
reps=${3:-2}
secs=${4:-10}
models/fetch.sh all-MiniLM-L6-v2
cargo build --release --locked -p ember-loadtest
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
embed_repo "$out/batching"
embed_repo "$out/batch1" 1
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "run build  config       tokens  conc  requests  errors     sent/s    p50 ms    p95 ms    p99 ms"
for rep in $(seq "$reps"); do
  for build in A B; do
    bin=$1
    [ "$build" = B ] && bin=$2
    for config in batching batch1; do
      EMBER_BIN=$bin start "$out/$config" 18095
      for tokens in 12 60; do
        target/release/ember-loadtest --url http://127.0.0.1:18095 --concurrency 32 \
          --tokenizer models/all-MiniLM-L6-v2/weights/tokenizer.json --tokens "$tokens" \
          --secs "$secs" --label "$config" | grep -v '^\[' | grep -v '^label' |
          sed "s/^/$rep   $build      /"
      done
      kill "$server"; wait "$server" 2>/dev/null || true
    done
  done
done
