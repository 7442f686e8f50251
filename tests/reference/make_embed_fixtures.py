"""Write the all-MiniLM-L6-v2 embedding fixtures used by Ember's Rust tests.

Outputs (paths relative to the repository root):

    tests/fixtures/minilm_embeddings.json
        {"source", "model_sha256", "max_seq_length", "cases": [
            {"text", "tokens", "truncated", "embedding": [384 floats]} ...]}
        `tokens` counts the tokens after truncation, [CLS] and [SEP] included;
        `truncated` says whether the untruncated encoding was longer than 256.
        Embeddings are mean-pooled and L2-normalised, rounded to 7 significant
        digits.

    tests/fixtures/minilm_token_ids.json
        {"cases": [{"case_index", "text", "ids"} ...]}
        token ids (after truncation, with [CLS]/[SEP]) for a few of the texts;
        the expected embedding is cases[case_index] of minilm_embeddings.json.

The embeddings come from the pure-numpy BERT in bert_numpy.py (beside this
file), over the same model.safetensors and tokenizer.json that Ember serves.

If `sentence_transformers` is importable (e.g. run this with a venv that has
sentence-transformers and torch), every embedding is also compared with
SentenceTransformer(...).encode(texts, normalize_embeddings=True) and the
minimum cosine similarity is recorded in the "source" field; the script fails
if any cosine is below 0.99999.

How to run it:

    pip install numpy safetensors tokenizers
    python3 tests/reference/make_embed_fixtures.py                 # numpy only
    /opt/st-venv/bin/python tests/reference/make_embed_fixtures.py # + cross-check
        [--st-model DIR]   # model folder for sentence-transformers
                           # (default: the weights folder itself)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bert_numpy import DEFAULT_MODEL_DIR, MAX_SEQ_LENGTH, REPO_ROOT, BertReference  # noqa: E402

EXPECTED_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
FIXTURE_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")
MIN_COSINE = 0.99999

# ---------------------------------------------------------------------------
# Long prose, used to build texts well past 256 tokens.
# ---------------------------------------------------------------------------
PARAGRAPHS = [
    "The harbour town woke slowly that morning. Fishermen untangled their nets on "
    "the quay while gulls argued over the scraps of yesterday's catch. A baker on "
    "the corner pulled trays of bread from an oven that had been burning since "
    "four, and the smell drifted down to the water where a ferry was loading cars "
    "for the island crossing. Nobody hurried; the tide would turn when it turned.",
    "Modern processors execute instructions out of order, speculating past branches "
    "and reordering memory accesses so that the pipeline stays full. Caches hide the "
    "latency of main memory, but only when the access pattern is predictable; a "
    "pointer-chasing workload can spend most of its cycles stalled, waiting for data "
    "that lives hundreds of nanoseconds away.",
    "In the spring of 1862 the river flooded twice, and the second flood carried away "
    "the mill, the footbridge and most of the orchard below the church. The parish "
    "records describe families sleeping in the loft of the school for three weeks "
    "while the water receded, and a collection taken up in the neighbouring valleys "
    "to buy seed for the ruined fields.",
    "To make the sauce, melt the butter over a low heat, add the flour and stir for "
    "two minutes without letting it colour. Whisk in the warm milk a little at a "
    "time, season with salt, pepper and a grating of nutmeg, and let it simmer "
    "gently until it coats the back of a spoon. Stir in the cheese off the heat.",
    "Photosynthesis converts light energy into chemical energy stored in sugars. In "
    "the light-dependent reactions, water is split and oxygen released, while the "
    "energy captured by chlorophyll drives the synthesis of ATP and NADPH. These "
    "carriers then power the Calvin cycle, which fixes carbon dioxide from the air "
    "into three-carbon molecules that the plant builds into glucose and starch.",
    "She had never liked the sound of the old clock in the hall, but after her "
    "grandmother died she found she could not sleep without it. Every quarter hour "
    "it cleared its throat and chimed, a little flat, a little late, and every "
    "quarter hour she listened and counted and felt, absurdly, that somebody was "
    "still keeping watch over the house.",
    "The committee reviewed the proposal in detail and raised three concerns: the "
    "budget assumed a level of volunteer participation that had not been achieved "
    "in previous years, the timeline left no margin for delays in procurement, and "
    "the evaluation plan did not say how success would be measured. The applicants "
    "were invited to resubmit after addressing these points.",
    "On clear nights far from city lights, the band of the Milky Way is visible as a "
    "pale river across the sky. What looks like mist is the combined light of "
    "billions of stars too distant to resolve individually, interrupted by dark "
    "lanes of dust that block the light from the galactic centre behind them.",
]


def long_text(order: list[int], repeats: int = 1) -> str:
    return "\n\n".join(PARAGRAPHS[i] for _ in range(repeats) for i in order)


# ---------------------------------------------------------------------------
# The cases. Order matters: minilm_token_ids.json refers to cases by index.
# ---------------------------------------------------------------------------
TEXTS: list[str] = [
    # short phrases / words
    "hello",
    "Hello world",
    "machine learning",
    "a",
    "The quick brown fox",
    # normal sentences
    "This is an example sentence.",
    "Each sentence is converted to a fixed-size vector.",
    "The cat sat on the mat while the dog slept by the fire.",
    "How do I reset my password if I no longer have access to my email?",
    "Rust guarantees memory safety without a garbage collector.",
    "The weather in Lisbon is usually mild in winter and hot in summer.",
    # near-duplicates / mixed case
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "tHe QuIcK bRoWn FoX jUmPs OvEr ThE lAzY dOg",
    "the quick brown fox jumps over the lazy dog",
    # non-ASCII Latin and other scripts
    "Ça va? Über naïve café",
    "Der schnelle braune Fuchs springt über den faulen Hund. Straße, Mädchen, größer.",
    "Привет, мир! Как у тебя дела сегодня?",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "我喜欢在周末去公园散步。",
    "東京は日本の首都です。ひらがなとカタカナ。",
    "안녕하세요, 만나서 반갑습니다.",
    "Ünïcödé spëlling: façade, jalapeño, smörgåsbord, Øresund, Łódź, Ærø.",
    # emoji
    "🙂🚀🔥",
    "I love pizza 🍕 and coffee ☕ in the morning! 😀👍",
    "👩‍👩‍👧‍👦 family emoji with ZWJ, flags 🇵🇹🇯🇵, skin tone 👍🏽",
    # whitespace / degenerate input
    " ",
    "",
    "   leading and trailing spaces   ",
    "many     spaces\tand\ttabs\n\nand\r\nnewlines\n",
    "line one\nline two\n\tindented line three",
    "\t\n \u00a0\u3000",  # only whitespace, including NBSP and ideographic space
    # punctuation, numbers, code, URLs
    "!!! ??? ... ,,, ;;; --- ((( ))) [[[ ]]] {{{ }}} @#$%^&*",
    "Wait... what?! No -- really?? (Yes.) \"Quoted\", 'single', `backtick`.",
    "3.14159 2.71828 1,000,000 -42 +7 1e-12 0xFF 2024-06-01 12:30:45",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{:?}\", v); }",
    "def add(a, b):\n    return a + b  # TODO: handle overflow",
    "See https://example.com/path/to/page?query=embedding&lang=en#section-2 for details.",
    "Contact: first.last+tag@example.org, phone +1 (555) 010-0199",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "x" * 120,  # one word longer than WordPiece's 100-char limit -> [UNK]
    # long texts (truncated at 256 tokens)
    long_text([0, 1, 2, 3, 5, 6, 7]),
    long_text([4, 5, 6, 7, 0, 2]),
    long_text(list(range(8)), repeats=2),
    " ".join(["Der Fluss trat im Frühjahr über die Ufer und riss die Brücke mit sich."] * 40),
    "今天天气很好，我们一起去海边散步，看日落，吃海鲜。" * 20,
    # exact truncation boundary: "word " x 254 -> 256 tokens (fits), x 255 -> 257 (truncated)
    " ".join(["word"] * 254),
    " ".join(["word"] * 255),
]

# Cases whose token ids are also written, for token-id input tests.
TOKEN_ID_CASES = [
    TEXTS.index("This is an example sentence."),
    TEXTS.index("Ça va? Über naïve café"),
    TEXTS.index("我喜欢在周末去公园散步。"),
    TEXTS.index("I love pizza 🍕 and coffee ☕ in the morning! 😀👍"),
    TEXTS.index(""),
    TEXTS.index(long_text([0, 1, 2, 3, 5, 6, 7])),
]


def sig7(x: float) -> float:
    return float(f"{x:.7g}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def crosscheck(texts: list[str], embeddings: np.ndarray, st_model_dir: str) -> str | None:
    """Compare with sentence-transformers if available; returns a sentence or None."""
    try:
        import sentence_transformers
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    torch.set_num_threads(1)
    model = SentenceTransformer(st_model_dir, device="cpu")
    if model.max_seq_length != MAX_SEQ_LENGTH:
        raise SystemExit(f"sentence-transformers max_seq_length is {model.max_seq_length}")
    st = model.encode(texts, normalize_embeddings=True, batch_size=16, convert_to_numpy=True)
    st = st.astype(np.float64)
    cos = np.sum(embeddings * st, axis=1) / (
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(st, axis=1)
    )
    max_abs = float(np.abs(embeddings - st).max())
    worst = int(np.argmin(cos))
    min_cos = float(cos.min())
    print(f"cross-check: min cosine 1 - {1 - min_cos:.2g} (case {worst}), max |diff| {max_abs:.3g}")
    if cos.min() < MIN_COSINE:
        raise SystemExit(f"numpy reference disagrees with sentence-transformers on case {worst}")
    return (
        f"Cross-checked against sentence-transformers {sentence_transformers.__version__} "
        f"(torch {torch.__version__}, CPU, float32, batched with padding) with "
        f"encode(texts, normalize_embeddings=True): min cosine 1 - {1 - min_cos:.1e}, "
        f"max abs element difference {max_abs:.2g} over all {len(texts)} cases."
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--st-model", default=None, help="model folder for sentence-transformers")
    ap.add_argument("--no-crosscheck", action="store_true")
    args = ap.parse_args()

    assert len(TEXTS) == len(set(TEXTS)), "duplicate texts"
    model_sha = sha256_file(os.path.join(args.model_dir, "model.safetensors"))
    if model_sha != EXPECTED_MODEL_SHA256:
        raise SystemExit(f"unexpected model.safetensors sha256 {model_sha}")

    ref = BertReference(args.model_dir)
    full_tok = ref.tokenizer.__class__.from_str(ref.tokenizer.to_str())
    full_tok.no_truncation()
    full_tok.no_padding()

    cases, all_ids, embs = [], [], []
    for text in TEXTS:
        ids, emb = ref.encode(text)
        full_len = len(full_tok.encode(text).ids)
        cases.append(
            {
                "text": text,
                "tokens": len(ids),
                "truncated": full_len > MAX_SEQ_LENGTH,
                "embedding": [sig7(v) for v in emb],
            }
        )
        all_ids.append(ids)
        embs.append(emb)
        if full_len > MAX_SEQ_LENGTH:
            print(f"long text: {full_len} tokens untruncated -> {len(ids)}")

    source = (
        "Produced by tests/reference/make_embed_fixtures.py with the pure-numpy BERT forward "
        "pass in tests/reference/bert_numpy.py (float32 weights, float64 arithmetic) over the "
        "same model.safetensors and tokenizer.json (HF tokenizers, padding off, truncation at "
        "256 tokens including [CLS]/[SEP]); one text at a time, mean pooling over all tokens, "
        "L2-normalised, rounded to 7 significant digits."
    )
    note = None
    if not args.no_crosscheck:
        note = crosscheck(TEXTS, np.array(embs), args.st_model or args.model_dir)
    source += " " + (note or "Not cross-checked against sentence-transformers in this run.")

    os.makedirs(FIXTURE_DIR, exist_ok=True)
    header = {"source": source, "model_sha256": model_sha, "max_seq_length": MAX_SEQ_LENGTH}
    out = os.path.join(FIXTURE_DIR, "minilm_embeddings.json")
    with open(out, "w", encoding="utf-8") as f:
        f.write("{\n")
        for k, v in header.items():
            f.write(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},\n")
        f.write('  "cases": [\n')
        lines = [
            "    " + json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases
        ]
        f.write(",\n".join(lines))
        f.write("\n  ]\n}\n")
    print(f"wrote {out} ({len(cases)} cases)")

    out = os.path.join(FIXTURE_DIR, "minilm_token_ids.json")
    with open(out, "w", encoding="utf-8") as f:
        f.write("{\n")
        f.write(
            '  "source": '
            + json.dumps(
                "Token ids (after truncation to 256, [CLS]/[SEP] included) from "
                "tests/reference/make_embed_fixtures.py; the expected embedding of each entry "
                "is cases[case_index] in minilm_embeddings.json.",
            )
            + ",\n"
        )
        f.write('  "cases": [\n')
        lines = [
            "    "
            + json.dumps(
                {"case_index": i, "text": TEXTS[i], "ids": all_ids[i]},
                ensure_ascii=False,
                separators=(",", ":"),
            )
            for i in TOKEN_ID_CASES
        ]
        f.write(",\n".join(lines))
        f.write("\n  ]\n}\n")
    print(f"wrote {out} ({len(TOKEN_ID_CASES)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
