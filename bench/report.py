#!/usr/bin/env python3
"""lathe's benchmark report: runs the PyTorch peer beside lathe's benchmarks when the peer's
Python environment is present (else uses its recorded figures and says so), then prints one
report and writes bench/results/summary.{json,md} and bench/results/accuracy_vs_bytes.svg
(accuracy against artifact bytes for every stage of the digits job, lathe beside the peer).

Usage: python3 bench/report.py [--peer-dir ../shared/bench] [--peer-python PY] [--no-peer-run]
The lathe side must have run first (`just bench` does): bench/results/model.json, and when
present distill.json, compress.json, serve.json and pipeline.json. Plain Python, no plotting
library.
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


def mean_of(v):
    """A figure that the peer records either plainly or as {mean, std, ...}."""
    return v.get("mean") if isinstance(v, dict) else v


def stage_points(model, distill, compress, peer):
    """(stage, who, label, accuracy, bytes) for every stage of the digits job."""
    pts = []

    def add(stage, who, label, acc, size):
        if isinstance(acc, (int, float)) and isinstance(size, (int, float)) and size > 0:
            pts.append({"stage": stage, "who": who, "label": label, "accuracy": acc, "bytes": size})

    add("trained", "lathe", "64-256-128-10", get(model, "train.test_accuracy"), get(model, "artifact.bytes"))
    for s in get(distill, "summary", []) or []:
        add("distilled", "lathe", f"{s['student']} {s.get('chosen_setting', '')} @ {s.get('chosen_epochs')} ep",
            s.get("distilled_test_mean"), s.get("artifact_bytes"))
    for r in get(compress, "prune", []) or []:
        add("pruned", "lathe", r["run"], r.get("test_accuracy"), r.get("bytes"))
    for r in get(compress, "quantize", []) or []:
        stage = "pruned+quantized" if r["run"].startswith("pruned") else "quantized"
        add(stage, "lathe", r["run"], r.get("test_accuracy"), r.get("bytes"))

    d = get(peer, "datasets.digits", {}) or {}
    add("trained", "peer", "64-256-128-10 state_dict", mean_of(get(d, "teacher.test_acc")),
        get(d, "teacher.state_dict_file_bytes"))
    for student, v in (get(d, "distill", {}) or {}).items():
        add("distilled", "peer", f"{student} KD, 60 ep", mean_of(v.get("test_acc_kd")), v.get("state_dict_file_bytes"))
    for level, v in (get(d, "prune", {}) or {}).items():
        add("pruned", "peer", f"{float(level):.2f} L1 one-shot + 10 ep (saved dense)",
            mean_of(v.get("test_acc_after_finetune")), v.get("state_dict_after_prune_remove_bytes"))
    add("quantized", "peer", "dynamic int8", mean_of(get(d, "quant_dynamic_int8.teacher.test_acc")),
        get(d, "quant_dynamic_int8.teacher.state_dict_file_bytes"))
    add("pruned+quantized", "peer", "pruned 90 % + dynamic int8",
        mean_of(get(d, "quant_dynamic_int8.pruned90.test_acc")),
        get(d, "quant_dynamic_int8.pruned90.state_dict_file_bytes"))
    return pts


STAGES = ["trained", "distilled", "pruned", "quantized", "pruned+quantized"]
COLOURS = {"trained": "#1f77b4", "distilled": "#9467bd", "pruned": "#2ca02c",
           "quantized": "#ff7f0e", "pruned+quantized": "#d62728"}


def svg_chart(points, peer_source):
    """Accuracy (%) against artifact bytes (log scale), one colour per stage; lathe filled
    circles, the peer hollow squares."""
    import math
    from xml.sax.saxutils import escape

    W, H, L, R, T, B = 860, 520, 70, 230, 50, 60
    xs = [math.log10(p["bytes"]) for p in points]
    ys = [100 * p["accuracy"] for p in points]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    y0 = max(0.0, math.floor(min(ys) / 5) * 5)
    y1 = 100.0
    px = lambda v: L + (v - x0) / (x1 - x0) * (W - L - R)
    py = lambda v: T + (y1 - v) / (y1 - y0) * (H - T - B)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="22" font-size="15" font-weight="bold">digits job: test accuracy against artifact bytes, '
           'every stage</text>',
           f'<text x="{L}" y="38" font-size="10" fill="#555">peer: {escape(peer_source[:110])}</text>']
    for e in range(x0, x1 + 1):
        for m in (1, 2, 5):
            v = e + math.log10(m)
            if v > x1 + 1e-9:
                break
            x = px(v)
            out.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" stroke="#eee"/>')
            label = f"{m * 10 ** e / 1000:g} kB" if 10 ** e >= 1000 else f"{m * 10 ** e:g} B"
            out.append(f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">{label}</text>')
    step = 1 if y1 - y0 <= 10 else 5
    y = y0
    while y <= y1 + 1e-9:
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g} %</text>')
        y += step
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 18}" text-anchor="middle">artifact / saved model bytes '
               '(log scale)</text>')
    out.append(f'<text transform="translate(18 {(T + H - B) / 2}) rotate(-90)" text-anchor="middle">'
               'test accuracy</text>')
    for p, xv, yv in zip(points, xs, ys):
        c = COLOURS[p["stage"]]
        tip = escape(f'{p["who"]} {p["stage"]}: {p["label"]} — {yv:.2f} %, {p["bytes"]:,} B')
        if p["who"] == "lathe":
            out.append(f'<circle cx="{px(xv):.1f}" cy="{py(yv):.1f}" r="5" fill="{c}" fill-opacity="0.85">'
                       f'<title>{tip}</title></circle>')
        else:
            out.append(f'<rect x="{px(xv) - 5:.1f}" y="{py(yv) - 5:.1f}" width="10" height="10" fill="none" '
                       f'stroke="{c}" stroke-width="2"><title>{tip}</title></rect>')
    lx, ly = W - R + 20, T + 10
    for i, st in enumerate(STAGES):
        out.append(f'<circle cx="{lx + 6}" cy="{ly + 20 * i}" r="5" fill="{COLOURS[st]}"/>')
        out.append(f'<rect x="{lx + 17}" y="{ly + 20 * i - 5}" width="10" height="10" fill="none" '
                   f'stroke="{COLOURS[st]}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 34}" y="{ly + 20 * i + 4}">{st}</text>')
    ly += 20 * len(STAGES) + 10
    out.append(f'<text x="{lx}" y="{ly}">● lathe (artifact file)</text>')
    out.append(f'<text x="{lx}" y="{ly + 18}">□ PyTorch peer (torch.save)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def load_optional(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-dir", default=str(ROOT.parent / "shared" / "bench"))
    ap.add_argument("--peer-python")
    ap.add_argument("--no-peer-run", action="store_true")
    args = ap.parse_args()

    model = json.loads((RESULTS / "model.json").read_text())
    distill, compress, serve, pipeline = (load_optional(f) for f in
                                          ("distill.json", "compress.json", "serve.json", "pipeline.json"))
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
    sections = ["## Training and the engine\n\n" + table]

    # Every stage of the digits job: accuracy against bytes.
    points = stage_points(model, distill, compress, peer)
    stage_rows = [[p["stage"], p["who"], p["label"], f'{100 * p["accuracy"]:.2f}', f'{p["bytes"]:,}']
                  for st in STAGES for p in points if p["stage"] == st]
    missing = [n for n, d in (("distill.json", distill), ("compress.json", compress)) if d is None]
    stage_md = md_table(["stage", "who", "run", "test accuracy %", "bytes"], stage_rows)
    if missing:
        stage_md += f"\n\n(not run: {', '.join(missing)})"
    if points:
        (RESULTS / "accuracy_vs_bytes.svg").write_text(svg_chart(points, peer_source))
        stage_md = "![accuracy against bytes](accuracy_vs_bytes.svg)\n\n" + stage_md
    sections.append("## Every stage of the digits job: accuracy against bytes\n\n" + stage_md)

    serving = None
    if serve:
        e, i, m = serve.get("echo_single", {}), serve.get("infer_single_json", {}), serve.get("infer_single_msgpack", {})
        tp = serve.get("throughput_rps", {})
        serving = {
            "infer_p50_us": i.get("p50_us"), "infer_p99_us": i.get("p99_us"),
            "echo_p50_us": e.get("p50_us"), "echo_p99_us": e.get("p99_us"),
            "p50_over_echo": serve.get("single_p50_over_echo"),
            "p99_over_echo": (i["p99_us"] / e["p99_us"]) if i.get("p99_us") and e.get("p99_us") else None,
            "throughput_rps": tp, "in_flight": serve.get("in_flight"), "requests": serve.get("requests"),
        }
        ratio = lambda a, b: fmt(a / b) + "×" if a and b else "—"
        srows = [
            ["one row, JSON: p50 µs", fmt(i.get("p50_us")), fmt(e.get("p50_us")), ratio(i.get("p50_us"), e.get("p50_us"))],
            ["one row, JSON: p99 µs", fmt(i.get("p99_us")), fmt(e.get("p99_us")), ratio(i.get("p99_us"), e.get("p99_us"))],
            ["one row, MessagePack: p50 µs", fmt(m.get("p50_us")), fmt(e.get("p50_us")), ratio(m.get("p50_us"), e.get("p50_us"))],
            ["batch of 64, JSON: p50 µs", fmt(get(serve, "infer_batch64_json.p50_us")),
             fmt(get(serve, "echo_batch64_bytes.p50_us")),
             ratio(get(serve, "infer_batch64_json.p50_us"), get(serve, "echo_batch64_bytes.p50_us"))],
            [f"throughput, 1 replica, {serve.get('in_flight')} in flight: req/s", fmt(tp.get("infer_1_replica")),
             fmt(tp.get("echo_1")), ratio(tp.get("echo_1"), tp.get("infer_1_replica"))],
            [f"throughput, 2 replicas, {serve.get('in_flight')} in flight: req/s", fmt(tp.get("infer_2_replicas")),
             fmt(tp.get("echo_2")), ratio(tp.get("echo_2"), tp.get("infer_2_replicas"))],
        ]
        sections.append("## Serving over NATS (lathe.infer.digits beside a NATS echo of the same bytes)\n\n"
                        + md_table(["figure", "lathe.infer", "NATS echo", "lathe / echo (throughput: echo / lathe)"],
                                   srows)
                        + f"\n\n{serve.get('setup', '')}; {serve.get('requests')} timed requests.")

    if pipeline:
        prow = [[h["what"], fmt(h.get("p50_ms")), fmt(h.get("max_ms")), str(h.get("n", ""))]
                for h in pipeline.get("hops", [])]
        text = md_table(["step / hop", "p50 ms", "max ms", "n"], prow)
        jpm = pipeline.get("jobs_per_minute", {})
        if jpm:
            text += "\n\n" + md_table(["replicas per stage", "jobs per minute"],
                                        [[k, fmt(v)] for k, v in jpm.items()])
        share = pipeline.get("orchestration_share_of_wall")
        if isinstance(share, (int, float)):
            text += f"\n\nOrchestration (all hops) is {100 * share:.2f} % of the whole-job wall time."
        io = pipeline.get("artifact_io", [])
        if io:
            text += "\n\n" + md_table(["artifact", "bytes", "get p50 ms", "put p50 ms"],
                                        [[a["artifact"], f"{a['bytes']:,}", fmt(a["get_p50_ms"]),
                                          fmt(a["put_p50_ms"])] for a in io])
        setup = pipeline.get("setup")
        if setup:
            text += f"\n\n{setup}; {pipeline.get('cores', '?')} cores; jobs per minute from " \
                    f"{pipeline.get('jobs_at_once', '?')} jobs submitted at once."
        sections.append(f"## The pipeline ({pipeline.get('job', 'digits chain')})\n\n" + text)

    report = "# lathe benchmarks\n\n" + header + "\n" + "\n\n".join(sections) + "\n"
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps({
        "peer_source": peer_source, "rows": rows, "stages": points, "serving": serving,
        "pipeline": pipeline}, indent=2) + "\n")
    (RESULTS / "summary.md").write_text(report)
    print(f"wrote {RESULTS / 'summary.md'}, summary.json and accuracy_vs_bytes.svg", file=sys.stderr)


if __name__ == "__main__":
    main()
