#!/usr/bin/env python3
"""Single-stream generation speed, Ember over HTTP vs llama.cpp in-process (llama-cpp-python),
same GGUF, same prompts, greedy, back to back. Per run: time to first token, prompt tokens/s
(prompt tokens over time to first token) and decode tokens/s (tokens after the first over the
time after the first). Prints a table and one JSON line. Loopback only; every run is bounded.

  PY=$(tests/reference/setup_llm_reference.sh)
  $PY loadtest/peers/single_stream.py --url http://127.0.0.1:18091 --model SmolLM2-135M-Instruct \
      --gguf models/SmolLM2-135M-Instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf [--reps 3]
"""
import argparse, http.client, json, statistics, sys, time
from pathlib import Path
from urllib.parse import urlparse

LONG = ("The city council met on Tuesday evening to discuss the proposed expansion of the public "
        "library. Supporters argued that the current building is too small for the growing number "
        "of visitors, especially students who need quiet places to study. ") * 6


def prompts():
    # A short chat and a long one (prompt speed), each asking for a long answer (decode speed).
    return [("short", "Write a long story about a robot who learns to paint."),
            ("long", "Summarise this and then continue the story at length:\n\n" + LONG)]


def ember_run(url, model, content, max_tokens):
    u = urlparse(url)
    assert u.hostname in ("127.0.0.1", "localhost"), "loopback only"
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    first, usage, buf = None, None, b""
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk["choices"]:
            if c.get("delta", {}).get("content") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    conn.close()
    return first - t0, end - first, usage["prompt_tokens"], usage["completion_tokens"]


def llama_run(llm, content, max_tokens):
    t0 = time.perf_counter()
    first, n, prompt_tokens = None, 0, None
    for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
            temperature=0, top_k=1, repeat_penalty=1.0, stream=True):
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            n += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    prompt_tokens = llm.n_tokens - n  # tokens in the context after the run, minus generated
    return first - t0, end - first, prompt_tokens, n


def summarise(name, runs):
    ttft = statistics.median(r[0] for r in runs)
    prompt_tps = statistics.median(r[2] / r[0] for r in runs)
    decode_tps = statistics.median((r[3] - 1) / r[1] for r in runs if r[3] > 1)
    return {"who": name, "ttft_ms": ttft * 1000, "prompt_tok_s": prompt_tps, "decode_tok_s": decode_tps,
            "prompt_tokens": runs[0][2], "completion_tokens": runs[0][3]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import llama_cpp
    from llama_cpp import Llama
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "reference"))
    from llama_plain import plain_cpu_if_needed
    plain_cpu_if_needed(a.gguf)
    rows = []
    for kind, content in prompts():
        ember_run(a.url, a.model, content, 8)  # warm-up
        runs = [ember_run(a.url, a.model, content, a.max_tokens) for _ in range(a.reps)]
        rows.append(dict(summarise("ember", runs), prompt=kind))
    llm = Llama(model_path=a.gguf, n_ctx=4096, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=512, verbose=False, seed=0)
    for kind, content in prompts():
        llama_run(llm, content, 8)
        runs = []
        for _ in range(a.reps):
            llm.reset()
            runs.append(llama_run(llm, content, a.max_tokens))
        rows.append(dict(summarise(f"llama.cpp {llama_cpp.__version__} ({a.threads} threads)", runs), prompt=kind))
    print(f"{'who':34s} {'prompt':6s} {'p tok':>6s} {'ttft ms':>8s} {'prompt tok/s':>12s} {'decode tok/s':>12s}")
    for r in rows:
        print(f"{r['who']:34s} {r['prompt']:6s} {r['prompt_tokens']:6d} {r['ttft_ms']:8.1f} "
              f"{r['prompt_tok_s']:12.1f} {r['decode_tok_s']:12.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
