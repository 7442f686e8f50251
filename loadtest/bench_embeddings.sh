#!/usr/bin/env bash
# The embeddings benchmark of BENCHMARKS.md, in one run on this machine:
#   1. Ember with dynamic batching (the demo model.toml) and with max_batch_size = 1, each driven
#      by ember-loadtest at concurrency 1, 8 and 32 with short (12-token) and medium (60-token)
#      texts;
#   2. the forward pass alone (benches/embed_forward.rs) of one short text and of 8, 16 and 32,
#      and from it the most batching can save per short text on this CPU, beside what it saved
#      served;
#   3. side by side, the peer client of ../shared/bench (Ember over HTTP vs sentence-transformers
#      in-process, batch 32, 2 torch threads, same texts).
# Loopback only, every level bounded in time. PYTHON must have sentence-transformers + torch for
# step 3 (e.g. a venv made with `pip install sentence-transformers`); without it step 3 is skipped
# loudly.
# CONCURRENCY (default 1,8,32) picks the levels; the server inherits the environment, so e.g.
# EMBER_CPU_ISA=avx512 measures without AMX tiles, avx512-core as a CPU with AVX-512 but not its
# VNNI and BF16 (Skylake-SP), avx2 as a CPU without AVX-512 would run (the forward-pass step too).
#   loadtest/bench_embeddings.sh [SECONDS_PER_LEVEL]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-10}
python=${PYTHON:-python3}
models/fetch.sh all-MiniLM-L6-v2
cargo build --release --locked --bin ember && cargo build --release --locked -p ember-loadtest
weights=$PWD/models/all-MiniLM-L6-v2/weights
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT

# shellcheck source=loadtest/bench_lib.sh
source loadtest/bench_lib.sh

load() { # port label; the table also goes to $out/label.txt
  for tokens in 12 60; do
    target/release/ember-loadtest --url "http://127.0.0.1:$1" --tokenizer "$weights/tokenizer.json" \
      --tokens "$tokens" --concurrency "${CONCURRENCY:-1,8,32}" --secs "$secs" --label "$2" | grep -v '^\['
  done | tee "$out/$2.txt"
}

short_c32() { # label: sentences/s of short texts at concurrency 32, or nothing
  awk '$2 == 12 && $3 == 32 { print $6 }' "$out/$1.txt"
}

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== ember, dynamic batching (models/all-MiniLM-L6-v2/model.toml)"
start models 18081
load 18081 batching
kill "$server"; wait "$server" 2>/dev/null || true

echo "== ember, max_batch_size = 1 (instances as in the demo config)"
embed_repo "$out/repo1" 1
start "$out/repo1" 18082
load 18082 batch=1
kill "$server"; wait "$server" 2>/dev/null || true

echo "== the forward pass alone, one thread (cargo bench --bench embed_forward)"
EMBER_BENCH_SHAPES=1x12,8x12,16x12,32x12 cargo bench --locked --bench embed_forward 2>/dev/null |
  tee "$out/forward.txt"
# The ceiling is the cheapest text in any batch: past some size a batch costs more per text.
awk -v served="$(short_c32 batching)" -v one="$(short_c32 batch=1)" '
  $1 == "1x12" { a = $3 } $1 ~ /^(8|16|32)x12$/ && $3 > b { b = $3 }
  END {
    printf "batching on short texts: at most %.2fx per text in the forward pass alone", b / a
    if (served != "" && one != "") printf "; served at concurrency 32: %.2fx", served / one
    print ""
  }' "$out/forward.txt"

echo "== side by side with sentence-transformers (shared/bench/embed_side_by_side.py)"
if "$python" -c 'import sentence_transformers' 2>/dev/null; then
  start models 18083
  "$python" ../shared/bench/embed_side_by_side.py --url http://127.0.0.1:18083 \
    --model all-MiniLM-L6-v2 --model-dir "$weights" --conc 32 --secs "$secs" --reps 3 | grep -v '^{'
else
  echo "SKIPPED: $python has no sentence_transformers; set PYTHON to a venv that has it" >&2
  exit 2
fi
