"""Reference outputs of the demo tensor models from onnxruntime, the independent implementation
the server's candle-onnx results are held to (tests/tensor.rs, within 1e-4). Writes
tests/fixtures/tensor_outputs.json: per model, the inputs (held-out rows plus a few edge cases),
onnxruntime's outputs for them run as one batch, and the true labels. Run:
  "$(scripts/setup_model_tools.sh)" tests/reference/make_tensor_fixtures.py
"""

import json
import os
import sys
from importlib.metadata import version

import numpy as np
import onnxruntime as ort

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import tensor_demo_data as data  # noqa: E402


def session(name):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    path = os.path.join(ROOT, "models", name, "model.onnx")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def tensor(array):
    # float(np.float32(x)) is the exact value the model saw, and JSON keeps it exactly.
    return {"datatype": "FP32", "shape": list(array.shape), "data": [float(v) for v in array.ravel()]}


def case(name, input_name, rows, labels):
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    sess = session(name)
    names = [o.name for o in sess.get_outputs()]
    batched = sess.run(names, {input_name: rows})
    # Sanity: onnxruntime agrees with itself one row at a time.
    for r in range(len(rows)):
        alone = sess.run(names, {input_name: rows[r : r + 1]})
        worst = max(float(np.abs(a[0] - b[r]).max()) for a, b in zip(alone, batched))
        assert worst <= 1e-6, (name, r, worst)
    print(f"{name}: {len(rows)} rows, outputs {names}")
    return {
        "inputs": {input_name: tensor(rows)},
        "outputs": {n: tensor(out) for n, out in zip(names, batched)},
        "labels": labels,
    }


def main():
    _, images, _, image_labels = data.digits_images()
    blank, full = np.zeros((1, 28, 28, 1), np.float32), np.ones((1, 28, 28, 1), np.float32)
    _, features, _, feature_labels = data.digits_features()
    _, table, _, table_labels = data.tabular()
    spread = table.std(axis=0)
    extremes = np.stack([table.mean(axis=0) + 5 * spread, table.mean(axis=0) - 5 * spread])
    models = {
        "digits-cnn": case(
            "digits-cnn", "image", np.concatenate([images[:10], blank, full]),
            [int(v) for v in image_labels[:10]] + [None, None],
        ),
        "digits-mlp": case(
            "digits-mlp", "features",
            np.concatenate([features[:14], np.zeros((1, 64)), np.ones((1, 64))]),
            [int(v) for v in feature_labels[:14]] + [None, None],
        ),
        "tabular-mlp": case(
            "tabular-mlp", "features", np.concatenate([table[:14], extremes]),
            [int(v) for v in table_labels[:14]] + [None, None],
        ),
    }
    fixture = {
        "producer": {
            "onnxruntime": version("onnxruntime"),
            "onnx": version("onnx"),
            "numpy": version("numpy"),
            "script": "tests/reference/make_tensor_fixtures.py",
        },
        "models": models,
    }
    path = os.path.join(ROOT, "tests", "fixtures", "tensor_outputs.json")
    with open(path, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
