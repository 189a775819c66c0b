#!/usr/bin/env python3
"""Trains the character-level model that examples/char-model serves, and
writes what the executor's tests check its streamed text against.

The model reads the last CONTEXT characters, looks each up in an embedding
table, joins the CONTEXT embeddings into one vector, passes it through a
dense layer with tanh, and scores every character of the vocabulary with a
second dense layer. Generation is greedy: the highest score wins, is
appended, and the window moves on. It is trained with plain numpy
(full-batch Adam on cross-entropy) on corpus.txt, text written for this
example, so nothing is downloaded; the seed is fixed, so a rerun on the
same numpy gives the same files.

Writes, next to this script:
- weights.safetensors: `embed [V, DIM]`, `w1 [CONTEXT*DIM, HIDDEN]`,
  `b1 [HIDDEN]`, `w2 [HIDDEN, V]`, `b2 [V]` (f32) and `vocab [V]` (u8, the
  characters' bytes, in id order) — the function's assets;
- expected.json: for a few prompts, the text a float32 numpy forward pass
  of the saved weights generates greedily (the reference the guest must
  match), and at each step the margin between the best and second-best
  score. Prompts are kept only where every margin is wide, so that the
  order of float additions on another device cannot change a pick.

Usage: python3 train.py   (needs numpy and safetensors)
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SEED = 0
CONTEXT = 16
DIM = 16
HIDDEN = 128
EPOCHS = 1000
LEARNING_RATE = 0.01
STEPS = 120
MIN_MARGIN = 0.01
PROMPTS = [
    "A tensor is",
    "A function that writes",
    "The model in this folder",
    "Tenants share the machine",
    "If the client goes away,",
]

HERE = Path(__file__).resolve().parent


def forward(p, ids):
    """Scores for each row of `ids` ([n, CONTEXT] ints): [n, V]."""
    x = p["embed"][ids].reshape(len(ids), CONTEXT * DIM)
    h = np.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"], (x, h)


def train(text, vocab):
    index = {c: i for i, c in enumerate(vocab)}
    padded = " " * CONTEXT + text
    ids = np.array([index[c] for c in padded])
    windows = np.stack([ids[i : i + CONTEXT] for i in range(len(text))])
    targets = ids[CONTEXT:]
    rng = np.random.default_rng(SEED)
    v = len(vocab)
    p = {
        "embed": rng.normal(0, 0.5, (v, DIM)),
        "w1": rng.normal(0, 1 / np.sqrt(CONTEXT * DIM), (CONTEXT * DIM, HIDDEN)),
        "b1": np.zeros(HIDDEN),
        "w2": rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, v)),
        "b2": np.zeros(v),
    }
    m = {k: np.zeros_like(a) for k, a in p.items()}
    s = {k: np.zeros_like(a) for k, a in p.items()}
    n = len(targets)
    for epoch in range(1, EPOCHS + 1):
        logits, (x, h) = forward(p, windows)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        loss = -np.log(probs[np.arange(n), targets]).mean()
        d = probs
        d[np.arange(n), targets] -= 1
        d /= n
        g = {"w2": h.T @ d, "b2": d.sum(axis=0)}
        dh = (d @ p["w2"].T) * (1 - h * h)
        g["w1"] = x.T @ dh
        g["b1"] = dh.sum(axis=0)
        dx = (dh @ p["w1"].T).reshape(n, CONTEXT, DIM)
        g["embed"] = np.zeros_like(p["embed"])
        np.add.at(g["embed"], windows, dx)
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            s[k] = 0.999 * s[k] + 0.001 * g[k] ** 2
            mh = m[k] / (1 - 0.9**epoch)
            sh = s[k] / (1 - 0.999**epoch)
            p[k] -= LEARNING_RATE * mh / (np.sqrt(sh) + 1e-8)
        if epoch % 250 == 0:
            print(f"epoch {epoch}: loss {loss:.4f}")
    return {k: a.astype(np.float32) for k, a in p.items()}


def generate(p, vocab, prompt, steps):
    """Greedy text after `prompt`, and the best-minus-second margin of each
    step, with float32 arithmetic as the guest's ops."""
    index = {c: i for i, c in enumerate(vocab)}
    ids = [index[c] for c in (" " * CONTEXT + prompt)[-CONTEXT:]]
    out, margins = [], []
    for _ in range(steps):
        scores, _ = forward(p, np.array([ids[-CONTEXT:]]))
        scores = scores[0].astype(np.float32)
        order = np.argsort(-scores, kind="stable")
        margins.append(float(scores[order[0]] - scores[order[1]]))
        out.append(vocab[order[0]])
        ids.append(int(order[0]))
    return "".join(out), margins


def main():
    text = (HERE / "corpus.txt").read_text(encoding="ascii")
    vocab = sorted(set(text) | {" "})
    params = train(text, vocab)
    tensors = dict(params)
    tensors["vocab"] = np.frombuffer("".join(vocab).encode("ascii"), dtype=np.uint8).copy()
    save_file(tensors, str(HERE / "weights.safetensors"))
    cases = []
    for prompt in PROMPTS:
        generated, margins = generate(params, vocab, prompt, STEPS)
        smallest = min(margins)
        print(f"{prompt!r} → {generated!r} (smallest margin {smallest:.3f})")
        if smallest >= MIN_MARGIN:
            cases.append({"prompt": prompt, "steps": STEPS, "text": generated,
                          "smallest_margin": smallest})
    if not cases:
        raise SystemExit("no prompt decodes with a safe margin: train longer")
    expected = {"context": CONTEXT, "vocab": "".join(vocab), "cases": cases}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote weights.safetensors and expected.json ({len(cases)} prompts)")


if __name__ == "__main__":
    main()
