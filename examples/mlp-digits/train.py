#!/usr/bin/env python3
"""Trains the digits MLP that examples/mlp-digits serves, and writes what
the executor's tests check it against.

The model is 64 → HIDDEN → 10: x / 16 (the 8×8 images' intensities are
0..16), a dense layer with relu, a dense layer, softmax. It is trained with
plain numpy (full-batch Adam on cross-entropy with a small L2 penalty) on
scikit-learn's bundled `load_digits`, so nothing is downloaded; the seed and
the split are fixed, so a rerun on the same numpy gives the same files.

Writes, next to this script:
- weights.safetensors: w1 [64, HIDDEN], b1 [HIDDEN], w2 [HIDDEN, 10],
  b2 [10], all f32 — the function's asset;
- heldout.json: the whole test split, {"x": [[64 ints]...], "labels": [...]};
- expected.json: the test accuracy and, for every held-out sample, the
  labels and probabilities of a float32 numpy forward pass of the saved
  weights (the reference the guest must match).

Usage: python3 train.py   (needs numpy, scikit-learn, safetensors)
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
HIDDEN = 32
EPOCHS = 300
LEARNING_RATE = 0.01
L2 = 1e-4
TEST_FRACTION = 0.2

HERE = Path(__file__).resolve().parent


def forward(params, x):
    """The guest's computation, in float32: probabilities and hidden layer."""
    h = np.maximum((x / np.float32(16)) @ params["w1"] + params["b1"], 0)
    logits = h @ params["w2"] + params["b2"]
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True), h


def train(x, y, rng):
    params = {
        "w1": (rng.standard_normal((64, HIDDEN)) * np.sqrt(2 / 64)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.standard_normal((HIDDEN, 10)) * np.sqrt(2 / HIDDEN)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    onehot = np.eye(10, dtype=np.float32)[y]
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    xs = x / np.float32(16)
    for t in range(1, EPOCHS + 1):
        probs, h = forward(params, x)
        d_logits = (probs - onehot) / len(x)
        grads = {
            "w2": h.T @ d_logits + L2 * params["w2"],
            "b2": d_logits.sum(axis=0),
        }
        d_h = (d_logits @ params["w2"].T) * (h > 0)
        grads["w1"] = xs.T @ d_h + L2 * params["w1"]
        grads["b1"] = d_h.sum(axis=0)
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            step = LEARNING_RATE * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            params[k] = (params[k] - step).astype(np.float32)
    return params


def main():
    rng = np.random.default_rng(SEED)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32),
        digits.target,
        test_size=TEST_FRACTION,
        random_state=SEED,
        stratify=digits.target,
    )
    params = train(x_train, y_train, rng)
    save_file(params, str(HERE / "weights.safetensors"))

    train_acc = float((forward(params, x_train)[0].argmax(axis=1) == y_train).mean())
    probs, _ = forward(params, x_test)
    labels = probs.argmax(axis=1)
    accuracy = float((labels == y_test).mean())
    print(f"train accuracy {train_acc:.4f}; test accuracy {accuracy:.4f} on {len(y_test)} samples")

    (HERE / "heldout.json").write_text(
        json.dumps(
            {
                "x": x_test.astype(int).tolist(),
                "labels": y_test.tolist(),
            },
            separators=(",", ":"),
        )
        + "\n"
    )
    (HERE / "expected.json").write_text(
        json.dumps(
            {
                "hidden": HIDDEN,
                "samples": len(y_test),
                "accuracy": accuracy,
                "labels": labels.tolist(),
                "probs": [[round(float(p), 8) for p in row] for row in probs],
            },
            separators=(",", ":"),
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
