#!/usr/bin/env python3
"""lathe's benchmark report: runs the PyTorch peer beside lathe's benchmarks when the peer's
Python environment is present (else uses its recorded figures and says so), then prints one
table and writes bench/results/summary.{json,md}.

Usage: python3 bench/report.py [--peer-dir ../shared/bench] [--peer-python PY] [--no-peer-run]
The lathe side must have run first (`just bench` does: bench/results/model.json).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def peer_python(explicit):
    """A Python that can import torch and sklearn, or None."""
    candidates = [explicit] if explicit else [os.environ.get("LATHE_PEER_PYTHON"), "python3"]
    for py in filter(None, candidates):
        try:
            ok = subprocess.run([py, "-c", "import torch, sklearn, numpy"], capture_output=True).returncode == 0
        except OSError:
            ok = False
        if ok:
            return py
    return None


def load_peer(args):
    recorded = Path(args.peer_dir) / "results.json"
    script = Path(args.peer_dir) / "torch_peer.py"
    py = None if args.no_peer_run else peer_python(args.peer_python)
    if py and script.exists():
        out = RESULTS / "peer"
        out.mkdir(parents=True, exist_ok=True)
        print(f"running the PyTorch peer ({py} {script} --quick) ...", file=sys.stderr)
        run = subprocess.run([py, str(script), "--quick", "--out-dir", str(out)], capture_output=True, text=True)
        if run.returncode == 0 and (out / "results.json").exists():
            return json.loads((out / "results.json").read_text()), "run now, same machine (--quick: 2 seeds, 1 000 latency calls)"
        print(f"the peer run failed ({run.returncode}): {run.stderr[-400:]}", file=sys.stderr)
    if recorded.exists():
        return json.loads(recorded.read_text()), f"recorded figures from {recorded} (another run, another time: ratios are indicative only)"
    return None, "no peer figures available"


def get(d, path, default=None):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-dir", default=str(ROOT.parent / "shared" / "bench"))
    ap.add_argument("--peer-python")
    ap.add_argument("--no-peer-run", action="store_true")
    args = ap.parse_args()

    model = json.loads((RESULTS / "model.json").read_text())
    peer, peer_source = load_peer(args)
    lat = get(peer, "latency_digits.threads_1", {}) or {}
    teacher = get(peer, "datasets.digits.teacher", {}) or {}

    rows = []

    def row(what, lathe, peer_value, unit, lower_is_better=True):
        ratio = None
        if isinstance(lathe, (int, float)) and isinstance(peer_value, (int, float)) and lathe and peer_value:
            ratio = peer_value / lathe if lower_is_better else lathe / peer_value
        rows.append({"what": what, "lathe": lathe, "peer": peer_value, "unit": unit, "advantage": ratio})

    row("train 64-256-128-10, 60 epochs, batch 64", get(model, "train.without_early_stopping.train_seconds"),
        get(teacher, "train_time_s.mean"), "s")
    row("train with early stopping (lathe default)", get(model, "train.train_seconds"), None, "s")
    row("test accuracy, 60 epochs", get(model, "train.without_early_stopping.test_accuracy"),
        get(teacher, "test_acc.mean"), "fraction", lower_is_better=False)
    row("single row p50 (eager)", get(model, "engine.single_row.p50_us"), get(lat, "teacher_fp32.single_sample.p50_us"), "µs")
    row("single row p50 (TorchScript)", get(model, "engine.single_row.p50_us"),
        get(lat, "teacher_fp32_torchscript.single_sample.p50_us"), "µs")
    row("single row p99 (eager)", get(model, "engine.single_row.p99_us"), get(lat, "teacher_fp32.single_sample.p99_us"), "µs")
    row("batch 1000 median", get(model, "engine.batch_1000.median_ms"), get(lat, "teacher_fp32.batch_1000.median_ms"), "ms")
    row("model file bytes", get(model, "artifact.bytes"), get(teacher, "state_dict_file_bytes"), "bytes")

    def fmt(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| what | lathe | PyTorch peer | unit | lathe's advantage (×) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {fmt(r['lathe'])} | {fmt(r['peer'])} | {r['unit']} | {fmt(r['advantage'])} |")
    table = "\n".join(lines)
    header = f"Peer figures: {peer_source}.\n"
    print(header)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps({"peer_source": peer_source, "rows": rows}, indent=2) + "\n")
    (RESULTS / "summary.md").write_text("# lathe benchmarks\n\n" + header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
