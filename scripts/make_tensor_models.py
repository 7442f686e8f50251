"""Trains the three demo tensor models and writes them as ONNX graphs into models/:

  digits-cnn   the classic Keras MNIST CNN (Conv 32 -> Conv 64 -> Flatten -> Dense 10 softmax)
               on 28x28x1 digits, trained here in numpy; its graph is laid out as tf2onnx
               exports a Keras model (NHWC input, Transposes around the convolutions, MatMul+Add)
  digits-mlp   64 -> 32 -> 10 on the 8x8 digits (scikit-learn's MLPClassifier), laid out as
               torch.onnx.export writes an nn.Sequential (Gemm with transB=1)
  tabular-mlp  100 -> 64 -> 64 -> 10 on a synthetic table, the feature scaling folded into the
               first layer; two outputs, logits and probabilities

Deterministic (fixed seeds). Only operators candle-onnx implements. Run:
  "$(scripts/setup_model_tools.sh)" scripts/make_tensor_models.py
then regenerate the reference outputs with tests/reference/make_tensor_fixtures.py.
"""

import os
import sys

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tensor_demo_data as data  # noqa: E402

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models")


def save(name, nodes, inputs, outputs, weights):
    graph = helper.make_graph(
        nodes,
        name,
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32) if w.dtype != np.int64 else w, n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, producer_name="ember make_tensor_models.py", opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = os.path.join(MODELS, name, "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(model, path)
    return path


def batch_input(name, *dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims])


# ---- the CNN, trained in numpy ----


def im2col(x):
    """NCHW -> rows of 3x3 patches: [n*ho*wo, c*9], in the order of a [f, c, 3, 3] kernel."""
    n, c, h, w = x.shape
    patches = sliding_window_view(x, (3, 3), axis=(2, 3))  # n, c, ho, wo, 3, 3
    return patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * (h - 2) * (w - 2), c * 9)


def conv(x, w, b):
    n, _, h, wd = x.shape
    out = im2col(x) @ w.reshape(w.shape[0], -1).T + b
    return out.reshape(n, h - 2, wd - 2, -1).transpose(0, 3, 1, 2)


def conv_backward(x, w, grad):
    """Gradients of a 3x3 valid convolution: (dx, dw, db)."""
    n, c, h, wd = x.shape
    f = w.shape[0]
    g = grad.transpose(0, 2, 3, 1).reshape(-1, f)
    dw = (g.T @ im2col(x)).reshape(w.shape)
    db = g.sum(axis=0)
    dcols = (g @ w.reshape(f, -1)).reshape(n, h - 2, wd - 2, c, 3, 3)
    dx = np.zeros_like(x)
    for i in range(3):
        for j in range(3):
            dx[:, :, i : i + h - 2, j : j + wd - 2] += dcols[..., i, j].transpose(0, 3, 1, 2)
    return dx, dw, db


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cnn_forward(p, images):
    x = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    h1 = np.maximum(conv(x, p["w1"], p["b1"]), 0)
    h2 = np.maximum(conv(h1, p["w2"], p["b2"]), 0)
    flat = h2.transpose(0, 2, 3, 1).reshape(len(images), -1)  # Keras flattens NHWC
    return x, h1, h2, flat, flat @ p["wd"] + p["bd"]


def train_cnn():
    x_train, x_test, y_train, y_test = data.digits_images()
    rng = np.random.default_rng(data.SEED)
    he = lambda shape, fan_in: (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)  # noqa: E731
    p = {
        "w1": he((32, 1, 3, 3), 9),
        "b1": np.zeros(32, np.float32),
        "w2": he((64, 32, 3, 3), 288),
        "b2": np.zeros(64, np.float32),
        "wd": (rng.standard_normal((36864, 10)) * np.sqrt(1.0 / 36864)).astype(np.float32),
        "bd": np.zeros(10, np.float32),
    }
    # Adam.
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    lr, beta1, beta2, step = 1e-3, 0.9, 0.999, 0
    for epoch in range(6):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            images, labels = x_train[idx], y_train[idx]
            x, h1, h2, flat, logits = cnn_forward(p, images)
            grad = softmax(logits)
            grad[np.arange(len(idx)), labels] -= 1
            grad /= len(idx)
            grads = {"wd": flat.T @ grad, "bd": grad.sum(axis=0)}
            dflat = (grad @ p["wd"].T).reshape(h2.shape[0], h2.shape[2], h2.shape[3], -1).transpose(0, 3, 1, 2)
            dh1, grads["w2"], grads["b2"] = conv_backward(h1, p["w2"], dflat * (h2 > 0))
            _, grads["w1"], grads["b1"] = conv_backward(x, p["w1"], dh1 * (h1 > 0))
            step += 1
            for k in p:
                m[k] = beta1 * m[k] + (1 - beta1) * grads[k]
                v[k] = beta2 * v[k] + (1 - beta2) * grads[k] ** 2
                mh, vh = m[k] / (1 - beta1**step), v[k] / (1 - beta2**step)
                p[k] = (p[k] - lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        accuracy = (cnn_forward(p, x_test)[-1].argmax(axis=1) == y_test).mean()
        print(f"digits-cnn epoch {epoch + 1}: held-out accuracy {accuracy:.4f}")
    return p, accuracy


def write_cnn(p):
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv1_w", "conv1_b"], ["conv1"], name="conv1", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "conv2_w", "conv2_b"], ["conv2"], name="conv2", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("Transpose", ["relu2"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "dense_w"], ["dense"], name="dense_matmul"),
        helper.make_node("Add", ["dense", "dense_b"], ["logits"], name="dense_bias"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
    ]
    weights = {
        "conv1_w": p["w1"],
        "conv1_b": p["b1"],
        "conv2_w": p["w2"],
        "conv2_b": p["b2"],
        "flat_shape": np.array([-1, 36864], dtype=np.int64),
        "dense_w": p["wd"],
        "dense_b": p["bd"],
    }
    return save("digits-cnn", nodes, [batch_input("image", 28, 28, 1)], [batch_input("probabilities", 10)], weights)


# ---- the MLPs, trained by scikit-learn ----


def gemm_layers(clf, first_in, prefix="fc"):
    """Gemm (+ Relu) nodes and weights for an MLPClassifier, weights stored [out, in] with
    transB=1 as torch exports nn.Linear. Returns (nodes, weights, name of the logits)."""
    nodes, weights, current = [], {}, first_in
    last = len(clf.coefs_) - 1
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        name = f"{prefix}{i + 1}"
        weights[f"{name}_w"], weights[f"{name}_b"] = w.T, b
        out = "logits" if i == last else name
        nodes.append(helper.make_node("Gemm", [current, f"{name}_w", f"{name}_b"], [out], name=name, transB=1))
        if i != last:
            nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
            current = f"{name}_relu"
    return nodes, weights


def train_digits_mlp():
    x_train, x_test, y_train, y_test = data.digits_features()
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=data.SEED).fit(x_train, y_train)
    accuracy = clf.score(x_test, y_test)
    nodes, weights = gemm_layers(clf, "features")
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    path = save("digits-mlp", nodes, [batch_input("features", 64)], [batch_input("probabilities", 10)], weights)
    return path, accuracy


def train_tabular_mlp():
    x_train, x_test, y_train, y_test = data.tabular()
    scaler = StandardScaler().fit(x_train)
    clf = MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=400, random_state=data.SEED)
    clf.fit(scaler.transform(x_train), y_train)
    accuracy = clf.score(scaler.transform(x_test), y_test)
    # (x - mean) / scale . W + b  ==  x . (W / scale) + (b - (mean / scale) . W)
    w, b = clf.coefs_[0], clf.intercepts_[0]
    clf.coefs_[0] = w / scaler.scale_[:, None]
    clf.intercepts_[0] = b - (scaler.mean_ / scaler.scale_) @ w
    folded = clf.score(x_test, y_test)
    assert abs(folded - accuracy) < 1e-9, (folded, accuracy)
    nodes, weights = gemm_layers(clf, "features")
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    outputs = [batch_input("logits", 10), batch_input("probabilities", 10)]
    path = save("tabular-mlp", nodes, [batch_input("features", 100)], outputs, weights)
    return path, accuracy


def main():
    results = []
    p, accuracy = train_cnn()
    results.append(("digits-cnn", write_cnn(p), accuracy))
    results.append(("digits-mlp", *train_digits_mlp()))
    results.append(("tabular-mlp", *train_tabular_mlp()))
    for name, path, accuracy in results:
        print(f"{name}: held-out accuracy {accuracy:.4f}, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
