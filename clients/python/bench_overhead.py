"""The client's overhead against raw httpx, side by side in one run: a
1 MiB f32 tensor to `examples/wat/scale.wat` (y = 2x + 1) and back, as
safetensors both ways, on a fleet of its own (an executor and a proxy on
loopback, the workspace's `tensor-wasm`).

    python clients/python/bench_overhead.py            # 300 calls each
    ROUNDS=1000 python clients/python/bench_overhead.py

The two alternate call by call over one keep-alive connection each; it
prints each one's median and p99 and the ratio client / httpx.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import load, save

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tensorwasm import Client  # noqa: E402
from tests.conftest import TOKEN, start_fleet  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "300"))
WARMUP = 20


def main() -> None:
    x = np.random.default_rng(0).standard_normal(256 * 1024).astype(np.float32)
    with start_fleet() as fleet, Client(fleet.url, TOKEN) as client:
        fn = client.function("scale")
        raw = httpx.Client(
            base_url=fleet.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60
        )
        path = f"/functions/{fn.id}/invoke"
        headers = {
            "content-type": "application/x-safetensors",
            "accept": "application/x-safetensors",
        }

        def by_client() -> np.ndarray:
            y: np.ndarray = fn(x=x)["y"]
            return y

        def by_httpx() -> np.ndarray:
            resp = raw.post(path, content=save({"x": x}), headers=headers)
            resp.raise_for_status()
            return load(resp.content)["y"]

        assert np.array_equal(by_client(), by_httpx())
        times: dict[str, list[float]] = {"client": [], "httpx": []}
        for i in range(WARMUP + ROUNDS):
            order = [("client", by_client), ("httpx", by_httpx)]
            for name, call in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                call()
                if i >= WARMUP:
                    times[name].append(time.perf_counter() - start)
        raw.close()
    print(f"1 MiB f32 round trip, {ROUNDS} calls each, alternating; ms")
    print(f"{'':10}{'p50':>10}{'p99':>10}")
    for name, t in times.items():
        t.sort()
        print(
            f"{name:10}{statistics.median(t) * 1e3:10.3f}{t[int(0.99 * (len(t) - 1))] * 1e3:10.3f}"
        )
    ratio = statistics.median(times["client"]) / statistics.median(times["httpx"])
    print(f"client / httpx (p50): {ratio:.3f}")


if __name__ == "__main__":
    main()
