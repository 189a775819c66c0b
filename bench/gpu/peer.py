"""PyTorch peer measurements for the GPU benchmark comparison.

    python3 bench/gpu/peer.py --out peer.json [--device cuda|cpu] [--quick]

Times PyTorch on the shapes our Rust GPU benchmark uses and writes one JSON
file with the schema bench/gpu/report.py reads (impl "torch" throughout):

    {"source": "torch", "device": ..., "quick": ..., "version": ...,
     "results": [{"name", "impl", "shape", "seconds", "flops" | "bytes",
                  "rounds", "reps", "detail"} | {..., "skipped": reason}]}

Method for every timed item: warm up 3 times, then 5 rounds of `reps`
iterations, each round bracketed by device synchronisation and timed with
time.perf_counter. `reps` starts at a per-item minimum and grows until one
round lasts at least MIN_ROUND_S. "seconds" is the median over rounds of
(round time / reps); "rounds" lists each round's per-rep seconds. Every item
reseeds torch.manual_seed(SEED), so each sees the same data whatever ran
before it.

`small_add_enqueue` is the exception: it times only the host loop that
enqueues the adds (synchronising after the clock stops), so it is the
per-op launch cost of eager PyTorch. `small_add_roundtrip` synchronises
after every add.

f32 matmuls run in true f32: TF32 is switched off through the legacy flags
(torch.backends.cuda.matmul.allow_tf32, torch.set_float32_matmul_precision),
which torch >= 2.4 all honour. TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 in the
environment would force TF32 back on; the matmul_f32 detail records it.

--quick shrinks every shape for a dry run; --device cpu runs on the CPU and
skips the host-to-device uploads. An item that raises (out of memory, an
unsupported kernel) is recorded as skipped with the error, and the run goes on.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

try:
    import torch
except ImportError:
    sys.exit("peer.py: PyTorch is not installed (python3 -c 'import torch' fails); "
             "install torch >= 2.4 with CUDA support")

SEED = 0
WARMUP = 3
ROUNDS = 5
MIN_ROUND_S = 0.05
MIB = 1 << 20

# Full and --quick sizes of every measured shape.
FULL = {
    "matmul_n": 8192,
    "add_elems": 256 * MIB // 4,
    "rows_cols": (4096, 8192),
    "attention": (8, 16, 2048, 128),
    "upload_bytes": 64 * MIB,
    "small_elems": 1024,
    "enqueue_n": 10000,
    "roundtrip_n": 2000,
}
QUICK = {
    "matmul_n": 256,
    "add_elems": 4 * MIB // 4,
    "rows_cols": (256, 512),
    "attention": (1, 2, 128, 64),
    "upload_bytes": 4 * MIB,
    "small_elems": 1024,
    "enqueue_n": 1000,
    "roundtrip_n": 200,
}


class Bench:
    """The device, its synchronisation, and the sizes of one run."""

    def __init__(self, device, sizes):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.sizes = sizes

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def randn(self, *shape, dtype=torch.float32):
        """Uniform data in [-1, 1), drawn in f32 and converted (as for bf16):
        the distribution of gpu-bench's inputs, since a GEMM's speed on a
        GPU depends a little on its data."""
        return (torch.rand(*shape, device=self.device) * 2 - 1).to(dtype)

    def timed_rounds(self, op, reps):
        """Per-rep seconds of ROUNDS rounds of `reps` calls to op."""
        rounds = []
        for _ in range(ROUNDS):
            self.sync()
            start = time.perf_counter()
            for _ in range(reps):
                op()
            self.sync()
            rounds.append((time.perf_counter() - start) / reps)
        return rounds

    def time_op(self, op, min_reps, calibrate=True):
        """Warm up, size reps so a round lasts MIN_ROUND_S, time ROUNDS rounds."""
        for _ in range(WARMUP):
            op()
        self.sync()
        reps = min_reps
        if calibrate:
            start = time.perf_counter()
            for _ in range(reps):
                op()
            self.sync()
            elapsed = time.perf_counter() - start
            if elapsed < MIN_ROUND_S:
                reps = math.ceil(reps * MIN_ROUND_S / max(elapsed, 1e-9))
        return self.timed_rounds(op, reps), reps

    def time_enqueue(self, op, n):
        """Per-op host seconds of n unsynchronised calls, ROUNDS rounds."""
        for _ in range(n):
            op()
        self.sync()
        rounds = []
        for _ in range(ROUNDS):
            self.sync()
            start = time.perf_counter()
            for _ in range(n):
                op()
            rounds.append((time.perf_counter() - start) / n)
            self.sync()
        return rounds, n


def result(name, shape, timing, detail, flops=None, nbytes=None):
    rounds, reps = timing
    entry = {
        "name": name,
        "impl": "torch",
        "shape": shape,
        "seconds": statistics.median(rounds),
        "rounds": rounds,
        "reps": reps,
        "detail": detail,
    }
    if flops is not None:
        entry["flops"] = float(flops)
    if nbytes is not None:
        entry["bytes"] = float(nbytes)
    return entry


def skipped(name, reason):
    return {"name": name, "impl": "torch", "seconds": None, "skipped": reason}


def tf32_state():
    """A note on whether f32 matmuls could use TF32 in this process."""
    try:
        note = f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}, " \
               f"float32_matmul_precision={torch.get_float32_matmul_precision()}"
    except RuntimeError as exc:  # newer torch refuses to read mixed-API flags
        note = f"TF32 flags unreadable: {exc}".splitlines()[0]
    override = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "")
    if override not in ("", "0"):
        note += f", TORCH_ALLOW_TF32_CUBLAS_OVERRIDE={override} (forces TF32 on)"
    return note


def matmul(b, name, dtype, min_reps):
    n = b.sizes["matmul_n"]
    x, y = b.randn(n, n, dtype=dtype), b.randn(n, n, dtype=dtype)
    detail = f"torch.matmul {dtype} n={n}, new output per call"
    if dtype == torch.float32:
        detail += "; " + tf32_state()
    return [result(name, f"{n}x{n}x{n}", b.time_op(lambda: torch.matmul(x, y), min_reps),
                   detail, flops=2 * n**3)]


def matmul_f32(b):
    return matmul(b, "matmul_f32", torch.float32, 5)


def matmul_bf16(b):
    return matmul(b, "matmul_bf16", torch.bfloat16, 20)


def add_and_copy(b):
    n = b.sizes["add_elems"]
    x, y, out = b.randn(n), b.randn(n), torch.empty(n, device=b.device)
    nbytes = 4 * n
    mib = nbytes // MIB
    return [
        result("add_f32", f"3x{mib} MiB", b.time_op(lambda: torch.add(x, y), 20),
               "torch.add(a, b), new output per call (caching allocator reuses it); "
               "bytes = 3 x operand", nbytes=3 * nbytes),
        result("device_copy", f"2x{mib} MiB", b.time_op(lambda: out.copy_(x), 20),
               "c.copy_(a) f32; bytes = 2 x operand", nbytes=2 * nbytes),
    ]


def softmax(b):
    rows, cols = b.sizes["rows_cols"]
    x = b.randn(rows, cols)
    return [result("softmax_f32", f"{rows}x{cols}",
                   b.time_op(lambda: torch.softmax(x, dim=-1), 50),
                   "torch.softmax(x, dim=-1); bytes = 2 x input", nbytes=2 * x.numel() * 4)]


def layer_norm(b):
    rows, cols = b.sizes["rows_cols"]
    x, weight, bias = b.randn(rows, cols), b.randn(cols), b.randn(cols)
    op = lambda: torch.nn.functional.layer_norm(x, (cols,), weight, bias, eps=1e-5)
    return [result("layer_norm_f32", f"{rows}x{cols}", b.time_op(op, 50),
                   "F.layer_norm over the last axis, random weight and bias, eps=1e-5; "
                   "bytes = 2 x input", nbytes=2 * x.numel() * 4)]


def attention(b):
    batch, heads, seq, dim = b.sizes["attention"]
    q, k, v = (b.randn(batch, heads, seq, dim, dtype=torch.bfloat16) for _ in range(3))
    op = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return [result("attention_causal_bf16", f"{batch}x{heads}x{seq}x{dim}",
                   b.time_op(op, 20),
                   "F.scaled_dot_product_attention(q, k, v, is_causal=True), [B,H,S,D] bf16; "
                   "flops = 4*B*H*S^2*D/2 (causal half)",
                   flops=4 * batch * heads * seq**2 * dim / 2)]


def small_add(b):
    n = b.sizes["small_elems"]
    x, y = b.randn(n), b.randn(n)

    def roundtrip():
        x + y
        b.sync()

    return [
        result("small_add_enqueue", f"{n} f32", b.time_enqueue(lambda: x + y, b.sizes["enqueue_n"]),
               "eager c = a + b f32, host time of the unsynchronised loop per op"),
        result("small_add_roundtrip", f"{n} f32",
               b.time_op(roundtrip, b.sizes["roundtrip_n"], calibrate=False),
               "eager c = a + b f32 then synchronize, per op"),
    ]


def upload(b):
    if not b.cuda:
        reason = "needs CUDA (host-to-device copy)"
        return [skipped("upload_64mib", reason), skipped("upload_64mib_pageable", reason)]
    nbytes = b.sizes["upload_bytes"]
    device = torch.empty(nbytes, dtype=torch.uint8, device=b.device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).random_(0, 256)
    pageable = torch.empty(nbytes, dtype=torch.uint8).random_(0, 256)

    def copy_from(host, non_blocking):
        def op():
            device.copy_(host, non_blocking=non_blocking)
            torch.cuda.synchronize()
        return op

    shape = f"{nbytes // MIB} MiB"
    return [
        result("upload_64mib", shape, b.time_op(copy_from(pinned, True), 20),
               "pinned host tensor, d.copy_(h, non_blocking=True) + synchronize",
               nbytes=nbytes),
        result("upload_64mib_pageable", shape, b.time_op(copy_from(pageable, False), 20),
               "pageable host tensor, d.copy_(h) + synchronize", nbytes=nbytes),
    ]


# Each runs with a fresh seed and returns the results of the names it measures.
BENCHMARKS = {
    ("matmul_f32",): matmul_f32,
    ("matmul_bf16",): matmul_bf16,
    ("add_f32", "device_copy"): add_and_copy,
    ("softmax_f32",): softmax,
    ("layer_norm_f32",): layer_norm,
    ("attention_causal_bf16",): attention,
    ("small_add_enqueue", "small_add_roundtrip"): small_add,
    ("upload_64mib", "upload_64mib_pageable"): upload,
}


def run_all(b):
    results = []
    for names, bench in BENCHMARKS.items():
        torch.manual_seed(SEED)
        try:
            entries = bench(b)
        except Exception as exc:  # one failing item must not lose the others
            reason = f"error: {type(exc).__name__}: {exc}".splitlines()[0]
            entries = [skipped(name, reason) for name in names]
        for entry in entries:
            print_entry(entry)
        results.extend(entries)
        if b.cuda:
            torch.cuda.empty_cache()
    return results


def print_entry(entry):
    if entry.get("skipped"):
        print(f"{entry['name']:<24} skipped: {entry['skipped']}", file=sys.stderr)
    else:
        print(f"{entry['name']:<24} {entry['shape']:<18} {entry['seconds'] * 1e6:12.2f} us "
              f"(reps {entry['reps']})", file=sys.stderr)


def device_name(b):
    if b.cuda:
        return torch.cuda.get_device_name(b.device)
    return "cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a dry run")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("peer.py: torch sees no CUDA device (use --device cpu for a dry run)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    b = Bench(args.device, QUICK if args.quick else FULL)
    results = run_all(b)
    report = {
        "source": "torch",
        "device": device_name(b),
        "quick": args.quick,
        "version": f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}",
        "results": results,
    }
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"peer results: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
