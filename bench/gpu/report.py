"""Merge our GPU benchmark results with the peers' and print the comparison.

    python3 bench/gpu/report.py --ours ours.json --peer peer.json \\
        [--fleet fleet.json] [--parity parity.json] \\
        --card "NVIDIA H200" --driver 580.x --out bench-results/gpu-<slug>.json

ours.json (written by the Rust benchmark) and peer.json (bench/gpu/peer.py)
share one schema: {"source", "device", "quick", "version", "results": [{"name",
"impl", "shape", "seconds", "flops"?, "bytes"?, "rounds", "detail",
"skipped"?}]}. Each comparison below pairs our entry (impl "tensor-wasm", or
"tensor-wasm-direct") with a peer entry of the same name (impl "cublas" from
ours.json, or "torch" from peer.json). The ratio is peer seconds / our seconds,
so above 1 means we are faster.

fleet.json ({"checks": [{"name", "result": "pass"|"fail", "detail"}]}) and
parity.json ({"tests": [{"name", "result": "pass"|"fail"|"skip"}]}) are
optional and only summarised.

Writes --out (card, driver, date, quick, parity, fleet, benchmarks,
all_targets_met, all_checks_passed) and prints a fixed-width table last,
ending with "targets met: X of Y". A missing or skipped measurement shows
"-" and leaves its target unjudged (met null, counted as not met). Exits 0
whatever the numbers; 2 when an input cannot be read.
"""

import argparse
import datetime
import json
import os
import sys

# Enqueue cost per small add we aim for, in seconds (and below torch's).
SMALL_ADD_MAX_S = 6e-6


class Comparison:
    """One table row: our impl against a peer impl on one benchmark name.

    min_ratio: the target ratio, or None when the row is reported only.
    max_ours_s: the small-add target instead: ours at most this many seconds
    and faster than the peer.
    """

    def __init__(self, name, peer_impl, min_ratio=None, ours_impl="tensor-wasm",
                 max_ours_s=None):
        self.name = name
        self.peer_impl = peer_impl
        self.min_ratio = min_ratio
        self.ours_impl = ours_impl
        self.max_ours_s = max_ours_s

    def label(self):
        if self.ours_impl == "tensor-wasm":
            return self.name
        return f"{self.name} [{self.ours_impl.replace('tensor-wasm-', '')}]"

    def target(self):
        if self.max_ours_s is not None:
            return f"≤{self.max_ours_s * 1e6:g}µs & <peer"
        if self.min_ratio is not None:
            return f"≥{self.min_ratio:.2f}x"
        return None

    def met(self, ours_s, peer_s, ratio):
        """True or False once judged; None when reported only or unmeasured."""
        if self.max_ours_s is not None:
            if ours_s is None:
                return None
            if ours_s > self.max_ours_s:
                return False
            return None if peer_s is None else ours_s < peer_s
        if self.min_ratio is None or ratio is None:
            return None
        return ratio >= self.min_ratio


COMPARISONS = [
    Comparison("matmul_bf16", "cublas", 0.95),
    Comparison("matmul_bf16", "torch"),
    Comparison("matmul_f32", "cublas", 0.95),
    Comparison("matmul_f32", "torch"),
    Comparison("add_f32", "torch", 0.9),
    Comparison("device_copy", "torch"),
    Comparison("softmax_f32", "torch", 1.0),
    Comparison("layer_norm_f32", "torch", 1.0),
    Comparison("attention_causal_bf16", "torch", 0.3),
    Comparison("attention_causal_bf16", "torch", ours_impl="tensor-wasm-gemm"),
    Comparison("small_add_enqueue", "torch", max_ours_s=SMALL_ADD_MAX_S),
    Comparison("small_add_enqueue", "torch", ours_impl="tensor-wasm-direct"),
    Comparison("small_add_roundtrip", "torch"),
    Comparison("upload_64mib", "torch", 0.5),
    Comparison("upload_64mib_pageable", "torch"),
]


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"report.py: cannot read {what} {path}: {exc}", file=sys.stderr)
        sys.exit(2)
    if not isinstance(data, dict):
        print(f"report.py: {what} {path} is not a JSON object", file=sys.stderr)
        sys.exit(2)
    return data


def index_results(*sources):
    """{(name, impl): entry} over the results of the given benchmark files."""
    index = {}
    for source in sources:
        for entry in source.get("results") or []:
            if isinstance(entry, dict):
                index.setdefault((entry.get("name"), entry.get("impl")), entry)
    return index


def seconds_of(entry):
    """The entry's seconds, or None when missing, skipped or not positive."""
    if not entry or entry.get("skipped"):
        return None
    seconds = entry.get("seconds")
    if isinstance(seconds, (int, float)) and seconds > 0:
        return float(seconds)
    return None


def three_figures(value):
    """About three significant figures, never in exponent notation."""
    decimals = 2 if value < 9.995 else 1 if value < 99.95 else 0
    return f"{value:.{decimals}f}"


def format_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 0.9995e-3:
        return f"{three_figures(seconds * 1e6)} µs"
    if seconds < 0.9995:
        return f"{three_figures(seconds * 1e3)} ms"
    return f"{three_figures(seconds)} s"


def format_rate(entry, seconds):
    """TFLOP/s (or GFLOP/s) for flops, GB/s or TB/s (decimal) for bytes."""
    if seconds is None:
        return None
    for work, unit in (("flops", "FLOP/s"), ("bytes", "B/s")):
        if isinstance(entry.get(work), (int, float)) and entry[work] > 0:
            rate = entry[work] / seconds
            if rate >= 0.9995e12:
                return f"{three_figures(rate / 1e12)} T{unit}"
            return f"{three_figures(rate / 1e9)} G{unit}"
    return None


def skip_note(side, entry, comparison, impl):
    """Why one side of a row has no number, or None when it has one."""
    if entry is None:
        # Reported-only rows (context such as device_copy) have one side by
        # design; say so only where a target goes unjudged.
        if comparison.target() is None:
            return None
        return f"{side} {comparison.name} ({impl}): not measured"
    if entry.get("skipped"):
        return f"{side} {comparison.name} ({impl}): skipped: {entry['skipped']}"
    if seconds_of(entry) is None:
        return f"{side} {comparison.name} ({impl}): no valid seconds"
    return None


def compare(comparison, results):
    ours = results.get((comparison.name, comparison.ours_impl))
    peer = results.get((comparison.name, comparison.peer_impl))
    ours_s, peer_s = seconds_of(ours), seconds_of(peer)
    ratio = peer_s / ours_s if ours_s and peer_s else None
    notes = [note for note in (skip_note("ours", ours, comparison, comparison.ours_impl),
                               skip_note("peer", peer, comparison, comparison.peer_impl))
             if note]
    if ours and peer and ours.get("shape") and peer.get("shape") \
            and ours["shape"] != peer["shape"]:
        notes.append(f"{comparison.name}: shapes differ, ours {ours['shape']} "
                     f"vs {comparison.peer_impl} {peer['shape']}")
    return {
        "name": comparison.name,
        "ours_impl": comparison.ours_impl,
        "ours_seconds": ours_s,
        "peer_impl": comparison.peer_impl,
        "peer_seconds": peer_s,
        "ratio": round(ratio, 4) if ratio is not None else None,
        "target": comparison.target(),
        "met": comparison.met(ours_s, peer_s, ratio),
        "ours_rate": format_rate(ours or {}, ours_s),
        "peer_rate": format_rate(peer or {}, peer_s),
        "label": comparison.label(),
        "notes": notes,
    }


def summarise(items, key):
    """Pass/fail (and skip) counts of parity tests or fleet checks."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for item in items:
        result = item.get("result")
        counts["passed" if result == "pass" else "failed" if result == "fail" else "skipped"] += 1
    return {**counts, key: items}


def quick_flag(ours, peer):
    both = ours.get("results") and peer.get("results")
    if both and bool(ours.get("quick")) != bool(peer.get("quick")):
        print("report.py: warning: one side ran --quick shapes and the other did not",
              file=sys.stderr)
    return bool(ours.get("quick") or peer.get("quick"))


def checks_passed(parity, fleet):
    """No fleet check or parity test failed, and parity (when given) passed some."""
    if fleet and fleet["failed"]:
        return False
    if parity and (parity["failed"] or not parity["passed"]):
        return False
    return True


def build_report(args):
    ours = read_json(args.ours, "--ours") if args.ours else {"results": []}
    peer = read_json(args.peer, "--peer") if args.peer else {"results": []}
    fleet = read_json(args.fleet, "--fleet") if args.fleet else None
    parity = read_json(args.parity, "--parity") if args.parity else None

    results = index_results(ours, peer)
    rows = [compare(comparison, results) for comparison in COMPARISONS]
    judged = [row for row in rows if row["target"]]
    fleet = summarise(fleet.get("checks", []), "checks") if fleet is not None else None
    parity = summarise(parity.get("tests", []), "tests") if parity is not None else None
    report = {
        "card": args.card,
        "driver": args.driver,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": quick_flag(ours, peer),
        "ours": {key: ours.get(key) for key in ("device", "version")},
        "peer": {key: peer.get(key) for key in ("device", "version")},
        "parity": parity,
        "fleet": fleet,
        "benchmarks": rows,
        "all_targets_met": bool(judged) and all(row["met"] is True for row in judged),
        "all_checks_passed": checks_passed(parity, fleet),
    }
    return report, judged


def write_report(report, path):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")


def cell(time_s, rate):
    return format_time(time_s) + (f" {rate}" if rate else "")


def met_text(met):
    return "-" if met is None else "yes" if met else "NO"


def print_table(report, judged):
    header = ("benchmark", "ours", "peer", "peer time", "ratio", "target", "met")
    widths = (26, 22, 6, 22, 7, 13, 3)
    lines = [header, tuple("-" * len(name) for name in header)]
    for row in report["benchmarks"]:
        lines.append((
            row["label"],
            cell(row["ours_seconds"], row["ours_rate"]),
            row["peer_impl"],
            cell(row["peer_seconds"], row["peer_rate"]),
            f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-",
            row["target"] or "-",
            met_text(row["met"]),
        ))
    # Checks first, so that the benchmark table is what the run ends with.
    if report["fleet"] is not None:
        for check in report["fleet"]["checks"]:
            detail = f"  {check['detail']}" if check.get("detail") else ""
            print(f"fleet {check.get('name', '?'):<28} {check.get('result', '?')}{detail}")
    if report["parity"] is not None:
        parity = report["parity"]
        print(f"parity: {parity['passed']} passed, {parity['failed']} failed, "
              f"{parity['skipped']} skipped")
    print()
    print(f"card: {report['card']}   driver: {report['driver']}   "
          f"date: {report['date']}" + ("   (quick shapes)" if report["quick"] else ""))
    for line in lines:
        print(" ".join(f"{text:<{width}}" for text, width in zip(line, widths)).rstrip())
    notes = (note for row in report["benchmarks"] for note in row["notes"])
    for note in dict.fromkeys(notes):  # rows sharing a name share notes
        print(f"  note: {note}")
    met = sum(row["met"] is True for row in judged)
    print(f"targets met: {met} of {len(judged)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", help="our benchmark JSON (gpu-bench)")
    parser.add_argument("--peer", help="peer.py's JSON")
    parser.add_argument("--fleet", help="fleet checks JSON")
    parser.add_argument("--parity", help="parity tests JSON")
    parser.add_argument("--card", required=True, help="GPU name, as nvidia-smi prints it")
    parser.add_argument("--driver", required=True, help="driver version")
    parser.add_argument("--out", required=True, help="merged JSON to write")
    args = parser.parse_args()
    sys.stdout.reconfigure(errors="replace")

    report, judged = build_report(args)
    write_report(report, args.out)
    print(f"results: {args.out}")
    print_table(report, judged)


if __name__ == "__main__":
    main()
