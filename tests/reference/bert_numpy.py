"""Independent pure-numpy reference for all-MiniLM-L6-v2 sentence embeddings.

What it is
    A small, readable BERT encoder forward pass written with numpy only, used to
    produce the expected embeddings that Ember's Rust integration tests compare
    against (see make_embed_fixtures.py beside this file). It reads the same
    files Ember serves:

        models/all-MiniLM-L6-v2/weights/model.safetensors   (float32 weights)
        models/all-MiniLM-L6-v2/weights/tokenizer.json      (HF `tokenizers`)

    and reproduces the sentence-transformers pipeline of that model:

        tokenize (lowercasing WordPiece, [CLS] ... [SEP], truncate to 256 tokens
        INCLUDING [CLS]/[SEP])
        -> BERT: 6 layers, hidden 384, 12 heads, GELU (exact, erf), LayerNorm eps 1e-12
        -> mean pooling over the (non-padding) tokens, [CLS]/[SEP] included
        -> L2 normalisation

    Texts are encoded one at a time without padding, so no attention mask is
    needed. Note that tokenizer.json itself carries `truncation.max_length=128`
    and fixed padding to 128; both are overridden here (no padding, truncation
    at 256), matching sentence_bert_config.json's max_seq_length.

    The weights are float32, but activations are computed in float64 so the
    reference is not affected by float32 summation-order noise; the result is
    returned as float64 (callers round it).

How to run it
    pip install numpy safetensors tokenizers
    python3 tests/reference/bert_numpy.py "some text" "another text"

    prints, for each text, the token count and the first values of its
    embedding. As a library: `BertReference().encode(text)` returns
    (token_ids, embedding).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_MODEL_DIR = os.path.join(REPO_ROOT, "models", "all-MiniLM-L6-v2", "weights")

NUM_LAYERS = 6
HIDDEN = 384
NUM_HEADS = 12
HEAD_DIM = HIDDEN // NUM_HEADS
LAYER_NORM_EPS = 1e-12
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json; includes [CLS] and [SEP]

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x * Phi(x), as in BERT's "gelu" (not the tanh approximation)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * weight + bias


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """PyTorch nn.Linear convention: weight is [out_features, in_features]."""
    return x @ weight.T + bias


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def load_tokenizer(model_dir: str = DEFAULT_MODEL_DIR) -> Tokenizer:
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()  # tokenizer.json pads to a fixed 128
    tok.enable_truncation(MAX_SEQ_LENGTH)  # tokenizer.json truncates at 128
    return tok


class BertReference:
    def __init__(self, model_dir: str = DEFAULT_MODEL_DIR):
        raw = load_file(os.path.join(model_dir, "model.safetensors"))
        # float32 on disk; promote once to float64 for the computation.
        self.w = {k: v.astype(np.float64) for k, v in raw.items() if v.dtype == np.float32}
        self.tokenizer = load_tokenizer(model_dir)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        """Last hidden state, shape [seq_len, HIDDEN], for one unpadded sequence."""
        w = self.w
        n = len(ids)
        assert 0 < n <= MAX_SEQ_LENGTH
        # Embeddings: word + absolute position + token type 0, then LayerNorm.
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])

        for i in range(NUM_LAYERS):
            p = f"encoder.layer.{i}."
            # Multi-head self-attention (post-LN, as in the original BERT).
            q = linear(x, w[p + "attention.self.query.weight"], w[p + "attention.self.query.bias"])
            k = linear(x, w[p + "attention.self.key.weight"], w[p + "attention.self.key.bias"])
            v = linear(x, w[p + "attention.self.value.weight"], w[p + "attention.self.value.bias"])
            # [n, HIDDEN] -> [heads, n, head_dim]
            q = q.reshape(n, NUM_HEADS, HEAD_DIM).transpose(1, 0, 2)
            k = k.reshape(n, NUM_HEADS, HEAD_DIM).transpose(1, 0, 2)
            v = v.reshape(n, NUM_HEADS, HEAD_DIM).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(HEAD_DIM)  # [heads, n, n]
            ctx = softmax(scores) @ v  # [heads, n, head_dim]
            ctx = ctx.transpose(1, 0, 2).reshape(n, HIDDEN)
            attn = linear(ctx, w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"])
            x = layer_norm(
                attn + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            # Feed-forward.
            h = gelu(linear(x, w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"]))
            h = linear(h, w[p + "output.dense.weight"], w[p + "output.dense.bias"])
            x = layer_norm(h + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        return x

    def embed_ids(self, ids: list[int]) -> np.ndarray:
        """Mean-pooled (all tokens, no padding here), L2-normalised embedding."""
        pooled = self.hidden_states(ids).mean(axis=0)
        return pooled / max(np.linalg.norm(pooled), 1e-12)

    def encode(self, text: str) -> tuple[list[int], np.ndarray]:
        ids = self.tokenize(text)
        return ids, self.embed_ids(ids)


def main(argv: list[str]) -> int:
    texts = argv[1:] or ["This is an example sentence."]
    model = BertReference()
    for text in texts:
        ids, emb = model.encode(text)
        print(f"{text!r}: {len(ids)} tokens, |e|={np.linalg.norm(emb):.6f}, e[:5]={np.round(emb[:5], 6).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
