"""Helpers for bench/matmul-vs-numpy (run inside its venv).

    matmul_vs_numpy.py numpy N REPS WARMUP   time numpy's f32 N^3 matmul, print one JSON line
    matmul_vs_numpy.py sysblas               describe the system OpenBLAS our binary links
    matmul_vs_numpy.py table FILE            print the comparison table from the JSON lines in FILE

Both timers report the best and the median of REPS timed runs after
WARMUP untimed ones, with the output allocated per run (numpy's `a @ b`,
our `Backend::matmul`), so the two sides do the same work.
"""

import ctypes
import ctypes.util
import json
import os
import statistics
import sys
import time

# Ratio ours/numpy we aim for: within 20% of numpy on the same BLAS threads.
TARGET_RATIO = 0.8


def numpy_matmul(n: int, reps: int, warmup: int) -> None:
    import numpy as np
    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(0)
    a = rng.uniform(-1.0, 1.0, (n, n)).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, (n, n)).astype(np.float32)
    for _ in range(warmup):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        c = a @ b
        times.append(time.perf_counter() - start)
        del c
    times.sort()
    flops = 2.0 * n * n * n
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    info = blas[0] if blas else {}
    print(json.dumps({
        "impl": "numpy",
        "numpy": np.__version__,
        "dtype": "f32",
        "n": n,
        "reps": reps,
        "best_ms": times[0] * 1e3,
        "median_ms": times[len(times) // 2] * 1e3,
        "gflops": flops / times[0] / 1e9,
        "gflops_median": flops / times[len(times) // 2] / 1e9,
        "threads": {
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "blas": info.get("num_threads"),
        },
        "blas": {k: info.get(k) for k in ("internal_api", "version", "architecture", "threading_layer", "filepath")},
    }))


def sysblas() -> None:
    """The core type and thread count the system OpenBLAS picks in this
    environment, which is the one our binary runs in."""
    path = ctypes.util.find_library("openblas") or "libopenblas.so.0"
    lib = ctypes.CDLL(path)
    lib.openblas_get_corename.restype = ctypes.c_char_p
    lib.openblas_get_config.restype = ctypes.c_char_p
    print(json.dumps({
        "lib": path,
        "core": lib.openblas_get_corename().decode(),
        "config": lib.openblas_get_config().decode().strip(),
        "num_threads": lib.openblas_get_num_threads(),
    }))


def table(path: str) -> None:
    runs = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    rounds = sorted({r["round"] for r in runs})
    by = {(r["round"], r["impl"]): r for r in runs}
    print(f"{'round':>5}  {'numpy GFLOP/s':>13}  {'ours GFLOP/s':>12}  {'ours/numpy':>10}")
    ours_all, numpy_all = [], []
    for rnd in rounds:
        npy, ours = by.get((rnd, "numpy")), by.get((rnd, "tensor-wasm"))
        if not npy or not ours:
            continue
        numpy_all.append(npy["gflops"])
        ours_all.append(ours["gflops"])
        print(f"{rnd:>5}  {npy['gflops']:>13.1f}  {ours['gflops']:>12.1f}  {ours['gflops'] / npy['gflops']:>10.2f}")
    if not ours_all:
        sys.exit("no complete round to compare")
    npy_med, ours_med = statistics.median(numpy_all), statistics.median(ours_all)
    ratio = ours_med / npy_med
    print(f"{'median':>5}  {npy_med:>13.1f}  {ours_med:>12.1f}  {ratio:>10.2f}")
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(f"(best of each process's reps; median over rounds; ratio {ratio:.2f} {verdict} the {TARGET_RATIO} target)")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "numpy":
        numpy_matmul(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "sysblas":
        sysblas()
    elif cmd == "table":
        table(sys.argv[2])
    else:
        sys.exit(__doc__)
