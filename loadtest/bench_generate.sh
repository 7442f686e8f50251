#!/usr/bin/env bash
# The generation benchmark of BENCHMARKS.md, in one run on this machine, against llama.cpp on the
# same GGUF with 2 threads:
#   1. single stream: Ember over HTTP vs llama-cpp-python in-process (prompt tokens/s, decode
#      tokens/s, time to first token), loadtest/peers/single_stream.py;
#   2. closed-loop streaming at 1, 4, 8 and 16 concurrent streams (total tokens/s, TTFT and time
#      per output token) with the shared client ../shared/bench/llm_stream_load.py, against Ember
#      and against llama.cpp's own continuous-batching llama-server (-np 16 -cb).
# Ember runs once per choice of `numerics` in EMBER_BENCH_NUMERICS (default: "llama.cpp fast",
# the shipped default and the faster one), the peers once.
# Installs its peers on first use (llama-cpp-python builds llama.cpp, ~10 min; llama-server
# another ~5-10 min). Loopback only; every level bounded in time.
#   loadtest/bench_generate.sh [SECONDS_PER_LEVEL]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/bench_lib.sh
source loadtest/bench_lib.sh
secs=${1:-20}
read -ra numerics <<<"${EMBER_BENCH_NUMERICS:-llama.cpp fast}"
gguf=$PWD/models/SmolLM2-135M-Instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf
models/fetch.sh SmolLM2-135M-Instruct
cargo build --release --locked --bin ember
py=$(tests/reference/setup_llm_reference.sh)
llama_server=$(loadtest/peers/build_llama_server.sh)
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

# The demo model alone, so it gets both cores (--compute-threads auto). The single-stream runs
# measure computing a prompt (llama-cpp-python is reset before each one), so Ember serves them
# with its prefix cache off; the streaming load runs as served, prefix cache on (llama-server's
# prompt cache is on too).
for n in "${numerics[@]}"; do
  smollm_repo "$out/repo-$n" "$gguf" "$n"
  smollm_repo "$out/repo-nocache-$n" "$gguf" "$n"
  # [generate] is the file's last table.
  echo "prefix_cache_entries = 0" >>"$out/repo-nocache-$n/SmolLM2-135M-Instruct/model.toml"
done

wait_for() { # url
  for _ in $(seq 300); do curl -sf "$1" >/dev/null && return; sleep 0.2; done
  echo "no answer from $1" >&2; exit 1
}

# A virtual machine may report AMX, so that a -march=native llama.cpp compiles its AMX kernels,
# and still trap AMX instructions: llama.cpp then dies (SIGILL or SIGSEGV) on its first prompt.
# Probe once (tests/reference/llama_plain.py); if so, both peers run without extra buffer types
# (no AMX, no weight repacking).
llama_extra=()
if ! "$py" tests/reference/llama_plain.py "$gguf"; then
  echo "== llama.cpp: AMX is reported but not usable here; peers run without extra buffer types"
  export EMBER_LLAMA_NO_EXTRA_BUFTS=1
  llama_extra=(--no-repack)
fi

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
serve() { # repo
  target/release/ember serve --models "$out/$1" --addr 127.0.0.1:18091 >"$out/ember-$1.log" 2>&1 &
  ember=$!
  wait_for http://127.0.0.1:18091/health/ready
}

for n in "${numerics[@]}"; do
  echo "== single stream: Ember, numerics = \"$n\" (HTTP, prefix cache off) vs llama.cpp (llama-cpp-python, in-process, 2 threads)"
  serve "repo-nocache-$n"
  "$py" loadtest/peers/single_stream.py --url http://127.0.0.1:18091 \
    --model SmolLM2-135M-Instruct --gguf "$gguf" --reps 3 | grep -v '^\['
  kill "$ember"; wait "$ember" 2>/dev/null || true
done

load() { # port label
  python3 ../shared/bench/llm_stream_load.py --port "$1" --model SmolLM2-135M-Instruct \
    --conc 1 4 8 16 --duration "$secs" --reps 1 --max-tokens 128 --unique-prefix --pause 2 \
    --out "$out/$2.json" >"$out/$2.txt" 2>&1
  python3 - "$out/$2.json" "$2" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))
print(f"{'who':14s} {'streams':>7s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p95':>9s} {'TPOT p50':>9s} {'TPOT p95':>9s}")
for m in res["medians"]:
    f = lambda k: "-" if m[k] is None else f"{m[k]:.1f}"
    print(f"{sys.argv[2]:14s} {m['concurrency']:7d} {f('gen_tok_per_s'):>8s} {f('ttft_p50_ms'):>9s} "
          f"{f('ttft_p95_ms'):>9s} {f('tpot_p50_ms'):>9s} {f('tpot_p95_ms'):>9s}")
PY
}

for n in "${numerics[@]}"; do
  echo "== streaming load: Ember, numerics = \"$n\""
  serve "repo-$n"
  load 18091 "ember-$n"
  curl -s http://127.0.0.1:18091/metrics |
    grep -E '^ember_(batch_size_items_(sum|count)|prompt_tokens_total|prompt_cached_tokens_total)' || true
  kill "$ember"; wait "$ember" 2>/dev/null || true
done

echo "== streaming load: llama-server -np 16 -cb -t 2 -tb 2 -c 8192 ($("$llama_server" --version 2>&1 | head -1))"
"$llama_server" -m "$gguf" -t 2 -tb 2 -c 8192 -np 16 -cb "${llama_extra[@]}" --host 127.0.0.1 --port 18092 \
  >"$out/llama-server.log" 2>&1 &
server=$!
wait_for http://127.0.0.1:18092/health
load 18092 llama-server
kill "$server"; wait "$server" 2>/dev/null || true
echo "results in $out"
