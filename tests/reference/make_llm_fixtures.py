"""Write llama.cpp reference fixtures for SmolLM2-135M-Instruct (Q4_1 GGUF).

Outputs (paths relative to the repository root):

    tests/fixtures/smollm2_tokens.json
        {"generator": {...}, "cases": [{"text", "ids", "ids_no_special"} ...]}
        ids            = llm.tokenize(text.encode(), add_bos=False, special=True)
        ids_no_special = llm.tokenize(text.encode(), add_bos=False, special=False)

    tests/fixtures/smollm2_greedy.json
        {"generator": {...}, "chat": [...], "completion": [...]}
        chat case:       {"messages", "prompt", "prompt_ids", "greedy_ids",
                          "greedy_text", "stopped_at_eos", "top2_margins"}
        completion case: the same without "messages" (the prompt is raw text).
        prompt_ids  = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        greedy_ids  = up to MAX_NEW_TOKENS ids from greedy decoding; if the EOS
                      token is produced, it is the last element and
                      stopped_at_eos is true.
        greedy_text = llm.detokenize(greedy_ids without a trailing EOS)
                      .decode("utf-8", errors="replace")
        top2_margins = per generated step, logit(top1) - logit(top2) as seen by
                      the independent argmax loop (small values mark steps where
                      another implementation may legitimately pick differently).

Chat prompts are rendered from the GGUF's own `tokenizer.chat_template` with
jinja2's ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
extensions=[jinja2.ext.loopcontrols]) and a transformers-style `tojson` filter,
`raise_exception` and `strftime_now` globals, with bos_token/eos_token passed
in -- the way transformers' apply_chat_template (and llama-cpp-python's
Jinja2ChatFormatter) render it -- and add_generation_prompt=True.  Every
rendering is cross-checked against llama_cpp.llama_chat_format.Jinja2ChatFormatter.

Greedy decoding is done twice per prompt and the two must agree:
  1. llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
     repeat_penalty=1.0)  (llama.cpp's greedy sampler) -- the recorded ids;
  2. an independent loop: llm.eval(prompt_ids), then argmax over
     llama_get_logits_ith(ctx, -1) and llm.eval([token]) each step.

Run it with the venv made by setup_llm_reference.sh:

    PY="$(tests/reference/setup_llm_reference.sh | tail -n1)"
    "$PY" tests/reference/make_llm_fixtures.py \
        --gguf models/SmolLM2-135M-Instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from datetime import datetime

import numpy as np

import gguf
import jinja2
import jinja2.ext
import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_plain import plain_cpu_if_needed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_GGUF = os.path.join(
    REPO_ROOT, "models", "SmolLM2-135M-Instruct", "weights", "SmolLM2-135M-Instruct.Q4_1.gguf"
)
EXPECTED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FIXTURE_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")

# The llama.cpp commit vendored by llama-cpp-python 0.3.36 (its CHANGELOG:
# "update llama.cpp to ggml-org/llama.cpp@0c1e57098"; the sdist's git metadata
# gives the full hash). setup_llm_reference.sh also writes it next to the venv.
KNOWN_LLAMA_CPP_COMMITS = {"0.3.36": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"}

N_CTX = 2048
N_THREADS = 2
N_BATCH = 512
SEED = 0
MAX_NEW_TOKENS = 24

TOKEN_CASES = [
    "Hello world! This is a plain English sentence.",
    " leading single space",
    "   leading multiple spaces",
    "trailing spaces   ",
    "line one\nline two",
    "paragraph one\n\nparagraph two",
    "windows\r\nline ending",
    "tab\tseparated\tvalues\t",
    "12345 and 3.14159",
    "Caf\u00e9, ma\u00f1ana, \u00fcber, na\u00efve r\u00e9sum\u00e9",
    "Die Stra\u00dfe ist gro\u00df. Wei\u00dfbier!",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u03ba\u03cc\u03c3\u03bc\u03b5",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002",
    "\u3053\u3093\u306b\u3061\u306f\u3001\u4e16\u754c\u3002\u30ab\u30bf\u30ab\u30ca\u3068\u6f22\u5b57",
    "\uc548\ub155\ud558\uc138\uc694, \uc138\uacc4!",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "Family \U0001F469\u200D\U0001F469\u200D\U0001F467 flag \U0001F1EB\U0001F1F7 thumbs \U0001F44D\U0001F3FD wave \U0001F44B\U0001F3FF smile \U0001F600",
    "def add(a, b):\n    if a > b:\n        return a + b\n    return b - a\n",
    "don't, I'll, we've, she's, they're, it'd",
    "<|im_start|>user\nhi<|im_end|>",
    "",
    " ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after endoftext",
    "a<|im_end|>b <|im_start|> c",
    "x = [1,2,3]; y = {'k': 10_000}  # comment",
    "https://example.com/path?q=1&r=two#frag",
    "CamelCaseIdentifier snake_case_identifier SCREAMING_CASE",
    "Mixed 1st 2nd 3rd 100% $9.99 \u20ac20 \u00a33",
    "\n",
    "\t\t",
    "  \n  \n",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
]

CHAT_CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "My name is Alice."},
        {"role": "assistant", "content": "Nice to meet you, Alice! How can I help you today?"},
        {"role": "user", "content": "What is my name?"},
    ],
    [{"role": "user", "content": "List three fruits that are red."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "user", "content": "Quelle est la capitale de l'Allemagne ?"}],
    [{"role": "user", "content": "\u4e2d\u56fd\u7684\u9996\u90fd\u662f\u54ea\u91cc\uff1f"}],
    [{"role": "user", "content": "I love pizza \U0001F355\U0001F60D! What toppings do you recommend?"}],
    [{"role": "user", "content": "Hi"}],
    [
        {
            "role": "user",
            "content": (
                "Summarise the following paragraph in one sentence.\n\n"
                "The city council met on Tuesday evening to discuss the proposed expansion of "
                "the public library. Supporters argued that the current building is too small "
                "for the growing number of visitors, especially students who need quiet places "
                "to study. Opponents worried about the cost, which is estimated at twelve "
                "million dollars, and suggested that the money could be better spent on road "
                "repairs. After three hours of debate, the council voted to commission a "
                "detailed study before making a final decision."
            ),
        }
    ],
    [{"role": "user", "content": "   Tell me a fun fact about octopuses.  \n"}],
    [
        {"role": "system", "content": "You are a pirate. Always talk like a pirate."},
        {"role": "user", "content": "How are you today?"},
    ],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
]

COMPLETION_CASES = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Water boils at a temperature of",
]


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def llama_cpp_commit(version: str) -> str | None:
    """The vendored llama.cpp commit: from the file the setup script writes
    beside the venv, else the table above, else None."""
    venv_file = os.path.join(sys.prefix, "llama_cpp_commit.txt")
    if os.path.isfile(venv_file):
        with open(venv_file) as f:
            text = f.read().strip()
        if text:
            return text
    return KNOWN_LLAMA_CPP_COMMITS.get(version)


def gguf_field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


# ---------------------------------------------------------------------------
# Chat-template rendering, transformers-style.
# ---------------------------------------------------------------------------
def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def make_template(source: str):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def llama_cpp_builtin_template(llm: Llama, messages) -> str:
    """llama.cpp's own (non-Jinja) llama_chat_apply_template, template from the GGUF."""
    arr = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        role, content = m["role"].encode(), m["content"].encode()
        keep += [role, content]
        arr[i].role = role
        arr[i].content = content
    tmpl = llama_cpp.llama_model_chat_template(llm.model, None)
    size = 8192
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(messages), True, buf, size)
    if n < 0:
        return None
    if n > size:
        buf = ctypes.create_string_buffer(n)
        n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(messages), True, buf, n)
    return buf.raw[:n].decode("utf-8")


# ---------------------------------------------------------------------------
# Greedy decoding.
# ---------------------------------------------------------------------------
def greedy_via_generate(llm: Llama, prompt_ids, eos: int):
    llm.reset()
    out = []
    for tok in llm.generate(
        prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
    ):
        out.append(int(tok))
        if tok == eos or len(out) >= MAX_NEW_TOKENS:
            break
    return out


def greedy_via_argmax(llm: Llama, prompt_ids, eos: int):
    llm.reset()
    n_vocab = llm.n_vocab()
    out, margins = [], []
    llm.eval(prompt_ids)
    while True:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
        top = np.argsort(-logits, kind="stable")[:2]
        tok = int(top[0])
        assert tok == int(np.argmax(logits))
        margins.append(round(float(logits[top[0]] - logits[top[1]]), 4))
        out.append(tok)
        if tok == eos or len(out) >= MAX_NEW_TOKENS:
            break
        llm.eval([tok])
    return out, margins


def run_greedy(llm: Llama, prompt: str, eos: int, failures: list):
    prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    ids = greedy_via_generate(llm, prompt_ids, eos)
    ids2, margins = greedy_via_argmax(llm, prompt_ids, eos)
    if ids != ids2:
        failures.append(f"generate and argmax disagree for {prompt!r}: {ids} vs {ids2}")
    stopped = bool(ids) and ids[-1] == eos
    text_ids = ids[:-1] if stopped else ids
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "greedy_ids": ids,
        "greedy_text": llm.detokenize(text_ids).decode("utf-8", errors="replace"),
        "stopped_at_eos": stopped,
        "top2_margins": margins,
    }


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, REPO_ROOT)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out-dir", default=FIXTURE_DIR)
    args = ap.parse_args()

    sha = sha256_of(args.gguf)
    if sha != EXPECTED_GGUF_SHA256:
        print(f"warning: {args.gguf} has sha256 {sha}, expected {EXPECTED_GGUF_SHA256}", file=sys.stderr)

    reader = gguf.GGUFReader(args.gguf)
    template_src = gguf_field(reader, "tokenizer.chat_template")
    pre = gguf_field(reader, "tokenizer.ggml.pre")
    tok_model = gguf_field(reader, "tokenizer.ggml.model")
    add_bos_meta = gguf_field(reader, "tokenizer.ggml.add_bos_token")
    bos_id = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    tokens_meta = gguf_field(reader, "tokenizer.ggml.tokens")
    del reader

    # The fixtures record llama.cpp's plain CPU kernels; where its AMX path crashes, say so.
    plain_cpu_if_needed(args.gguf)
    llm = Llama(
        model_path=args.gguf,
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        n_batch=N_BATCH,
        logits_all=False,
        verbose=False,
        seed=SEED,
    )
    eos = int(llm.token_eos())
    bos = int(llm.token_bos())
    assert eos == eos_id, (eos, eos_id)
    bos_text = tokens_meta[bos] if bos is not None and bos >= 0 else ""
    eos_text = tokens_meta[eos]

    version = llama_cpp.__version__
    commit = llama_cpp_commit(version)
    base_generator = {
        "llama_cpp_python": version,
        "llama_cpp_commit": commit,
        "gguf_sha256": sha,
        "gguf_python": importlib.metadata.version("gguf"),
        "jinja2": jinja2.__version__,
        "python": platform.python_version(),
        "script": "tests/reference/make_llm_fixtures.py",
        "tokenizer_model": tok_model,
        "tokenizer_pre": pre,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "gguf_add_bos_token": add_bos_meta,
    }
    failures: list[str] = []

    # ---------------------------------------------------------------- tokens
    cases = []
    for text in TOKEN_CASES:
        b = text.encode("utf-8")
        ids = llm.tokenize(b, add_bos=False, special=True)
        ids_ns = llm.tokenize(b, add_bos=False, special=False)
        # Round trip: detokenizing (rendering special tokens) gives the text back.
        back = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
        if back != text:
            failures.append(f"round trip failed for {text!r}: {back!r}")
        cases.append({"text": text, "ids": ids, "ids_no_special": ids_ns})
    probe = "Hello world"
    with_bos = llm.tokenize(probe.encode(), add_bos=True, special=True)
    without_bos = llm.tokenize(probe.encode(), add_bos=False, special=True)
    tokens_fixture = {
        "generator": {
            **base_generator,
            "call": "llm.tokenize(text.encode('utf-8'), add_bos=False, special=True)",
            "add_bos": False,
            "parse_special": True,
            "ids_no_special_call": "llm.tokenize(text.encode('utf-8'), add_bos=False, special=False)",
            "add_bos_probe": {"text": probe, "add_bos_true": with_bos, "add_bos_false": without_bos},
        },
        "cases": cases,
    }

    # ---------------------------------------------------------------- greedy
    template = make_template(template_src)
    formatter = Jinja2ChatFormatter(template=template_src, eos_token=eos_text, bos_token=bos_text)
    builtin_mismatches = []
    chat = []
    for messages in CHAT_CASES:
        prompt = template.render(
            messages=messages, add_generation_prompt=True, bos_token=bos_text, eos_token=eos_text
        )
        other = formatter(messages=messages).prompt
        if other != prompt:
            failures.append(f"Jinja2ChatFormatter renders differently: {other!r} vs {prompt!r}")
        builtin = llama_cpp_builtin_template(llm, messages)
        if builtin != prompt:
            builtin_mismatches.append({"messages": messages, "llama_chat_apply_template": builtin})
        chat.append({"messages": messages, **run_greedy(llm, prompt, eos, failures)})
    completion = [run_greedy(llm, prompt, eos, failures) for prompt in COMPLETION_CASES]

    greedy_fixture = {
        "generator": {
            **base_generator,
            "n_ctx": N_CTX,
            "n_threads": N_THREADS,
            "n_batch": N_BATCH,
            "seed": SEED,
            "max_new_tokens": MAX_NEW_TOKENS,
            "sampling": "greedy: top_k=1, temp=0, repeat_penalty=1.0",
            "decoding": (
                "greedy_ids from llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, "
                "repeat_penalty=1.0) after llm.reset(); checked equal to an independent loop of "
                "llm.eval + argmax(llama_get_logits_ith(ctx, -1)); stops after max_new_tokens or "
                "when eos_token_id is produced (kept as the last id)"
            ),
            "prompt_tokenize": "llm.tokenize(prompt.encode('utf-8'), add_bos=False, special=True)",
            "chat_template_source": "GGUF metadata tokenizer.chat_template",
            "chat_template": template_src,
            "chat_template_env": (
                "jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, "
                "extensions=[jinja2.ext.loopcontrols]) + transformers-style tojson filter, "
                "raise_exception, strftime_now; render(messages=..., add_generation_prompt=True, "
                "bos_token=..., eos_token=...) -- as transformers' apply_chat_template; identical "
                "to llama_cpp.llama_chat_format.Jinja2ChatFormatter for every case"
            ),
            "llama_chat_apply_template_mismatches": len(builtin_mismatches),
            "llama_chat_apply_template_note": (
                "llama.cpp's non-Jinja llama_chat_apply_template (chatml detection) omits the "
                "template's default system message, so it differs whenever no system message "
                "is given"
                if builtin_mismatches
                else "llama.cpp's non-Jinja llama_chat_apply_template renders identically"
            ),
        },
        "chat": chat,
        "completion": completion,
    }

    if failures:
        for f in failures:
            print("FAIL:", f, file=sys.stderr)
        return 1

    write_json(os.path.join(args.out_dir, "smollm2_tokens.json"), tokens_fixture)
    write_json(os.path.join(args.out_dir, "smollm2_greedy.json"), greedy_fixture)

    # ---------------------------------------------------------------- summary
    print(f"llama-cpp-python {version}, llama.cpp {commit}, pre-tokenizer {pre!r}, "
          f"gguf add_bos_token={add_bos_meta}, bos={bos} eos={eos}")
    print(f"add_bos probe: {with_bos} vs {without_bos}")
    print(f"{len(cases)} token cases; {len(chat)} chat + {len(completion)} completion greedy cases")
    print(f"llama_chat_apply_template differs from Jinja for {len(builtin_mismatches)} chat case(s)")
    for c in chat + completion:
        label = c["messages"][-1]["content"] if "messages" in c else c["prompt"]
        margin = min(c["top2_margins"])
        print(f"- {label[:50]!r} -> {c['greedy_text'][:90]!r}"
              f"{' [EOS]' if c['stopped_at_eos'] else ''} (min margin {margin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
