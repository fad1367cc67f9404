"""The README's performance table, generated from the committed benchmark CSVs.

Reads ``benchmarks/results/<device>/*.csv`` (smoke results, in folders ending in ``-smoke``, are
ignored) and writes, for each device and op, a markdown table: shape, dtype, mode, the median
time of every provider, fastnote's speedup over each other provider (their time / fastnote's),
and fastnote's peak memory against eager's; for the whole models (benchmarks/models.py), the step
time and peak memory of the four providers and fastnote's speed-ups. The text goes between ``<!-- perf-table:start -->``
and ``<!-- perf-table:end -->`` in README.md; without those markers it is printed instead.

    python benchmarks/make_table.py [--results DIR] [--readme PATH] [--stdout]
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = "<!-- perf-table:start -->"
END = "<!-- perf-table:end -->"
MODE_ORDER = {"fwd": 0, "bwd": 1, "both": 2}
DTYPE_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2}
OURS = "fastnote"
BASELINE = "eager"
NO_RESULTS = ("No GPU results are committed yet: run the benchmarks on a GPU "
              "(`python benchmarks/run_all.py`), commit `benchmarks/results/`, then rerun "
              "`python benchmarks/make_table.py`.")


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def load(results_dir: str):
    """{device folder: [row dicts]} for every non-smoke CSV."""
    by_device = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*.csv"))):
        device = os.path.basename(os.path.dirname(path))
        if device.endswith("-smoke"):
            continue
        with open(path, newline="", encoding="utf-8") as f:
            by_device.setdefault(device, []).extend(csv.DictReader(f))
    return by_device


def _config(row):
    cfg = json.loads(row["config"]) if row.get("config") else {}
    cfg.pop("note", None)
    return cfg


def _shape(cfg) -> str:
    rest = {k: v for k, v in cfg.items() if k != "dtype"}
    if "shape" in rest:
        shape = "x".join(str(s) for s in rest.pop("shape"))
        return " ".join([shape] + [f"{k}={v}" for k, v in rest.items()])
    return " ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in rest.items())


def _ms(v) -> str:
    if not _finite(v):
        return "n/a"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _ratio(num, den) -> str:
    return f"{num / den:.2f}x" if _finite(num) and _finite(den) and den > 0 else "n/a"


def op_table(op: str, rows) -> list:
    """Markdown lines for one op on one device."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    if OURS in providers:  # fastnote last, next to its speedups
        providers = [p for p in providers if p != OURS] + [OURS]
    others = [p for p in providers if p != OURS]
    cells = {}  # (config json, mode) -> {"time": {provider: ms}, "memory": {provider: MB}}
    order = {}
    shown = {}  # config as written (its key order), for display
    for r in rows:
        if r["metric"] not in ("time", "memory"):
            continue
        cfg = _config(r)
        key = (json.dumps(cfg, sort_keys=True), r["mode"])
        cells.setdefault(key, {"time": {}, "memory": {}})[r["metric"]][r["provider"]] = _float(r["p50"])
        shown.setdefault(key, cfg)
        order[key] = (DTYPE_ORDER.get(cfg.get("dtype"), 9), str(cfg.get("dtype")), _float(r["x_value"]),
                      key[0], MODE_ORDER.get(r["mode"], 9), r["mode"])
    has_ours = OURS in providers
    has_memory = has_ours and BASELINE in providers and any(
        _finite(c["memory"].get(OURS)) for c in cells.values())

    # Front ends named "fastnote <kind>" are compared with the "<other> <kind>" they replace.
    pairs = [(ours, other) for ours in providers if ours.startswith(OURS + " ")
             for other in providers if not other.startswith(OURS) and other.endswith(ours[len(OURS):])]
    head = ["shape", "dtype", "mode"] + [f"{p} ms" for p in providers]
    if has_ours:
        head += [f"vs {p}" for p in others]
    head += [f"{ours} vs {other}" for ours, other in pairs]
    if has_memory:
        head += [f"{OURS} MB", f"mem vs {BASELINE}"]
    lines = [f"**{op}** (median ms; speedup = other's time / {OURS}'s; memory = peak during the call)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for key in sorted(cells, key=lambda k: order[k]):
        cfg, mode = shown[key], key[1]
        t, m = cells[key]["time"], cells[key]["memory"]
        line = [_shape(cfg), str(cfg.get("dtype", "")), mode] + [_ms(t.get(p)) for p in providers]
        if has_ours:
            line += [_ratio(t.get(p), t.get(OURS)) for p in others]
        line += [_ratio(t.get(other), t.get(ours)) for ours, other in pairs]
        if has_memory:
            mem = m.get(OURS)
            line += [f"{mem:.1f}" if _finite(mem) else "n/a", _ratio(mem, m.get(BASELINE))]
        lines.append("| " + " | ".join(line) + " |")
    return lines + [""]


MODEL_PROVIDERS = ("eager", "fastnote", "torch.compile", "torch.compile(fastnote)")


def models_table(rows, png: str = "") -> list:
    """Markdown lines for benchmarks/models.py on one device: step time of the four providers,
    fastnote's speed-ups, and peak memory."""
    cells = {}  # (model, dtype, batch) -> {(metric, provider): p50}
    for r in rows:
        if r["metric"] in ("time", "memory") and r["mode"] == "step":
            cfg = _config(r)
            key = (cfg.get("model", "?"), cfg.get("dtype", ""), int(_float(r["x_value"])))
            cells.setdefault(key, {})[(r["metric"], r["provider"])] = _float(r["p50"])
    head = (["model", "dtype", "batch"] + [f"{p} ms" for p in MODEL_PROVIDERS]
            + ["fastnote vs eager", "fastnote vs torch.compile", "compiled: fastnote vs eager"]
            + [f"{p} MB" for p in MODEL_PROVIDERS])
    lines = ["**models** (one training step: forward, backward, optimiser; median ms; "
             "MB = peak allocated during the step beyond the parameters and optimiser state)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for key, c in cells.items():
        t = {p: c.get(("time", p)) for p in MODEL_PROVIDERS}
        m = {p: c.get(("memory", p)) for p in MODEL_PROVIDERS}
        line = [key[0], key[1], str(key[2])] + [_ms(t[p]) for p in MODEL_PROVIDERS]
        line += [_ratio(t["eager"], t["fastnote"]), _ratio(t["torch.compile"], t["fastnote"]),
                 _ratio(t["torch.compile"], t["torch.compile(fastnote)"])]
        line += [f"{m[p]:.0f}" if _finite(m[p]) else "n/a" for p in MODEL_PROVIDERS]
        lines.append("| " + " | ".join(line) + " |")
    if png:
        lines += ["", f"![models]({png})"]
    return lines + [""]


def render(by_device, results_dir: str = "") -> str:
    has_gpu = any(not d.startswith("cpu-") for d in by_device)
    out = ["<!-- generated by benchmarks/make_table.py from benchmarks/results/*/*.csv; do not edit -->", ""]
    if not has_gpu:
        out += [NO_RESULTS, ""]
    for device in sorted(by_device, key=lambda d: (d.startswith("cpu-"), d)):
        rows = [r for r in by_device[device] if r.get("op") != "copy_bandwidth"]
        copy = [r for r in by_device[device] if r.get("op") == "copy_bandwidth"]
        if not rows:
            continue
        first = rows[0]
        versions = sorted({(r["torch"], r["triton"], r["fastnote_commit"]) for r in rows})
        desc = "; ".join(f"torch {t}, triton {tr}, commit {c}" for t, tr, c in versions)
        quick = ""
        if device.endswith("-quick"):
            quick = " -- quick run: each benchmark's first case per dtype, no torch.compile"
        out.append(f"#### {first['gpu']} ({desc}){quick}")
        out.append("")
        if copy:
            out.append(f"Measured copy bandwidth: {_float(copy[0]['p50']):.0f} GB/s.")
            out.append("")
        ops = list(dict.fromkeys(r["op"] for r in rows))
        for op in ops:
            op_rows = [r for r in rows if r["op"] == op]
            if op == "models":
                png = os.path.join(results_dir, device, "models.png")
                link = os.path.relpath(png, ROOT) if results_dir and os.path.exists(png) else ""
                out += models_table(op_rows, link)
            else:
                out += op_table(op, op_rows)
    return "\n".join(out).rstrip() + "\n"


def write_between_markers(readme: str, text: str) -> bool:
    """Replace what lies between the markers; False when the file or the markers are missing."""
    if not os.path.exists(readme):
        return False
    with open(readme, encoding="utf-8") as f:
        content = f.read()
    start, end = content.find(START), content.find(END)
    if start < 0 or end < 0 or end < start:
        return False
    new = content[: start + len(START)] + "\n" + text + content[end:]
    with open(readme, "w", encoding="utf-8") as f:
        f.write(new)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--stdout", action="store_true", help="print the table, leave README.md alone")
    args = p.parse_args(argv)

    by_device = load(args.results)
    text = render(by_device, args.results) if by_device else NO_RESULTS + "\n"
    if not args.stdout and write_between_markers(args.readme, text):
        print(f"updated {args.readme} ({sum(len(v) for v in by_device.values())} result rows)")
    else:
        if not args.stdout:
            print(f"(no {START} ... {END} markers in {args.readme}: printing the table)\n")
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
