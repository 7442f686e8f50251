#!/usr/bin/env bash
# Throughput at 1 and 8 streams for each `numerics` of the demo generation model, the choices
# alternating so that a noisy machine's slow and fast minutes fall on both (BENCHMARKS.md). The
# shared client ../shared/bench/llm_stream_load.py drives a fresh `ember serve` per run, with
# the flags bench_generate.sh uses. Loopback only; every level bounded in time.
#   loadtest/numerics_ab.sh [REPETITIONS] [SECONDS_PER_LEVEL]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/bench_lib.sh
source loadtest/bench_lib.sh
reps=${1:-2}
secs=${2:-15}
gguf=$PWD/models/SmolLM2-135M-Instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf
models/fetch.sh SmolLM2-135M-Instruct
cargo build --release --locked --bin ember
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
for n in llama.cpp fast; do
  smollm_repo "$out/repo-$n" "$gguf" "$n"
done
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for rep in $(seq "$reps"); do
  for n in llama.cpp fast; do
    start "$out/repo-$n" 18091
    python3 ../shared/bench/llm_stream_load.py --port 18091 --model SmolLM2-135M-Instruct \
      --conc 1 8 --duration "$secs" --reps 1 --max-tokens 128 --unique-prefix --pause 2 \
      --out "$out/$n-$rep.json" >"$out/$n-$rep.txt" 2>&1
    kill "$server"; wait "$server" 2>/dev/null || true
    python3 - "$out/$n-$rep.json" "$n" "$rep" <<'PY'
import json, sys
by = {m["concurrency"]: m for m in json.load(open(sys.argv[1]))["medians"]}
one, eight = by[1]["gen_tok_per_s"], by[8]["gen_tok_per_s"]
print(f"run {sys.argv[3]} numerics={sys.argv[2]:10s} 1 stream {one:7.1f} tok/s (TPOT p50 "
      f"{by[1]['tpot_p50_ms']:.1f} ms)  8 streams {eight:7.1f} tok/s (TPOT p50 "
      f"{by[8]['tpot_p50_ms']:.1f} ms)  ratio {eight / one:.2f}x")
PY
  done
done
echo "results in $out"
