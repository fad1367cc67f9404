"""The README's performance tables, generated from the committed benchmark CSVs.

Reads ``benchmarks/results/<device>/*.csv`` (smoke results, in folders ending in ``-smoke``, are
ignored) and writes, for each device and op, a markdown table: shape, dtype, mode, the median
time of every provider, fastnote's speedup over each other provider (their time / fastnote's),
and fastnote's peak memory against eager's; for the whole models (benchmarks/models.py), the step
time and peak memory of the four providers and fastnote's speed-ups. The text goes between ``<!-- perf-table:start -->``
and ``<!-- perf-table:end -->`` in README.md; without those markers it is printed instead.

For every GPU folder it also checks the performance targets (``TARGETS``, one declaration per
target: the op, the provider to beat or the throughput unit, the cases and modes, the threshold)
and lists the rows where fastnote is slower than eager; that text goes between
``<!-- perf-targets:start -->`` and ``<!-- perf-targets:end -->``. A target is checked for each
dtype apart, over every case and mode it does not pin, and the worst case decides; one whose rows
the CSVs lack (a provider or an op the run skipped) is "not measured".

``--plots`` first redraws the PNGs of each results folder from its CSVs, with the plotting code
and the ``Benchmark`` declarations of the benchmark scripts (no GPU needed), so after a GPU run
one command refreshes the plots, the tables and the targets:

    python benchmarks/make_table.py [--results DIR] [--readme PATH] [--stdout]
    python benchmarks/make_table.py --plots [FOLDER ...]    # FOLDER: e.g. nvidia-h200-quick (default: all)
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import glob
import importlib
import json
import math
import os
import re
import sys
from typing import Dict, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
START = "<!-- perf-table:start -->"
END = "<!-- perf-table:end -->"
TARGETS_START = "<!-- perf-targets:start -->"
TARGETS_END = "<!-- perf-targets:end -->"
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


def read_rows(path: str) -> list:
    """The rows of one result CSV; [] for a CSV of another layout (e.g. spectral_norm_launches.csv)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"op", "provider", "metric", "p50", "config"} <= set(reader.fieldnames or ()):
            return []
        return list(reader)


def _folders(results_dir: str) -> list:
    return [d for d in sorted(glob.glob(os.path.join(results_dir, "*")))
            if os.path.isdir(d) and not os.path.basename(d).endswith("-smoke")]


def load(results_dir: str):
    """{device folder: [row dicts]} for every non-smoke CSV."""
    by_device = {}
    for folder in _folders(results_dir):
        for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
            rows = read_rows(path)
            if rows:
                by_device.setdefault(os.path.basename(folder), []).extend(rows)
    return by_device


def _is_gpu(device: str) -> bool:
    return not device.startswith("cpu-")


def _is_quick(device: str) -> bool:
    """A ``--quick`` run's folder (<device>-quick, or a copy of one such as <device>-quick-2)."""
    return re.search(r"-quick(-|$)", device) is not None


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


def _header(device: str, rows) -> str:
    """The line that names a results folder: device, versions, commit, date, and what a quick run
    left out."""
    versions = sorted({(r["torch"], r["triton"], r["fastnote_commit"]) for r in rows})
    desc = "; ".join(f"torch {t}, triton {tr}, commit {c}" for t, tr, c in versions)
    days = sorted({r.get("timestamp", "")[:10] for r in rows} - {""})
    if days:
        desc += f"; measured {days[0]}" + (f" to {days[-1]}" if days[-1] != days[0] else "")
    notes = []
    if _is_quick(device):
        notes.append("quick run (`--quick`): each benchmark's headline cases only")
    if _is_gpu(device) and not any("torch.compile" in r["provider"] for r in rows):
        notes.append("no torch.compile providers (`--no-compile`)")
    return f"#### {rows[0]['gpu']} ({desc})" + (" -- " + ", ".join(notes) if notes else "")


def _copy_gbps(rows) -> Optional[float]:
    """The copy bandwidth measured once per run (device.csv), if any."""
    for r in rows:
        if r.get("op") == "copy_bandwidth" and _finite(_float(r["p50"])):
            return _float(r["p50"])
    return None


def _devices(by_device) -> list:
    return sorted(by_device, key=lambda d: (not _is_gpu(d), d))


def render(by_device, results_dir: str = "") -> str:
    has_gpu = any(_is_gpu(d) for d in by_device)
    out = ["<!-- generated by benchmarks/make_table.py from benchmarks/results/*/*.csv; do not edit -->", ""]
    if not has_gpu:
        out += [NO_RESULTS, ""]
    for device in _devices(by_device):
        rows = [r for r in by_device[device] if r.get("op") != "copy_bandwidth"]
        if not rows:
            continue
        out.append(_header(device, rows))
        out.append("")
        copy = _copy_gbps(by_device[device])
        if copy:
            out.append(f"Measured copy bandwidth: {copy:.0f} GB/s.")
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


# ------------------------------------------------------------------------------------------------
# Performance targets
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    """One performance target, checked against a run's rows.

    Either a speed-up of ``ours`` over ``vs`` (the other provider's median time / ours, in the
    same case and mode) or, with ``unit``, a throughput row of ``ours`` in that unit (e.g.
    "% of copy BW": achieved GB/s on the benchmark's minimum bytes over the copy bandwidth
    measured in the same run). ``op`` is an fnmatch pattern; ``modes`` () means every mode
    measured; ``where`` pins config values of the case ("x_value" is the swept size): a string
    is an fnmatch pattern, a tuple any of its values, a number equal as a number. Every matching
    case must reach ``at_least``; the cases are checked apart for each value of the ``per``
    config keys (one line each: its worst case), together when ``per`` is (). ``itemize`` lists
    every case that misses."""
    what: str
    op: str
    at_least: float
    vs: str = ""
    unit: str = ""
    modes: Tuple[str, ...] = ()
    where: Dict[str, object] = dataclasses.field(default_factory=dict)
    ours: str = OURS
    per: Tuple[str, ...] = ("dtype",)
    skip_ops: Tuple[str, ...] = ()
    itemize: bool = False


SWIN_T_STAGE1_BF16 = {"model": "swin_t_224", "x_value": 1, "dtype": "bf16"}   # window_attention.py's stage 1
SAGAN_N4096 = {"N": 4096}

TARGETS = [
    Target("Window attention core, Swin-T stage 1: forward vs SDPA with the mask", "window_attention", 2.0,
           vs="sdpa", modes=("fwd",), where=SWIN_T_STAGE1_BF16),
    Target("Window attention core, Swin-T stage 1: forward vs eager", "window_attention", 3.0,
           vs="eager", modes=("fwd",), where=SWIN_T_STAGE1_BF16),
    Target("Window attention core, Swin-T stage 1: forward+backward vs SDPA with the mask",
           "window_attention", 1.5, vs="sdpa", modes=("both",), where=SWIN_T_STAGE1_BF16),
    Target("Fused Swin block (swin_window_attention), Swin-T stage 1: vs eager", "swin_window_attention", 2.0,
           vs="eager", where=SWIN_T_STAGE1_BF16),
    Target("Window attention core, Swin-T stage 1: bandwidth on minimum bytes", "window_attention", 75.0,
           unit="% of copy BW", where=SWIN_T_STAGE1_BF16),
    Target("SAGAN attention, N=4096: forward vs eager", "sagan_attention", 5.0, vs="eager", modes=("fwd",),
           where=SAGAN_N4096),
    Target("SAGAN attention, N=4096: forward+backward vs eager", "sagan_attention", 3.0, vs="eager",
           modes=("both",), where=SAGAN_N4096),
    Target("SAGAN attention, N=4096: forward vs SDPA (scale=1)", "sagan_attention", 1.0, vs="sdpa",
           modes=("fwd",), where=SAGAN_N4096),
    Target("SAGAN attention, N=4096: backward vs SDPA (scale=1)", "sagan_attention", 1.0, vs="sdpa",
           modes=("bwd",), where=SAGAN_N4096),
    Target("Gram: forward vs bmm (eager)", "gram", 1.6, vs="eager", modes=("fwd",), where={"dtype": "bf16"}),
    Target("Gram, C=512: forward, useful FLOPs vs dense bf16 peak", "gram", 70.0, unit="% of peak TFLOP/s",
           modes=("fwd",), where={"dtype": "bf16", "x_value": 512}),
    Target("Style loss: forward+backward vs eager", "style_loss", 2.0, vs="eager", modes=("both",)),
    Target("PatchNCE: forward+backward vs eager", "patch_nce", 3.0, vs="eager", modes=("both",)),
    Target("CLIP loss: forward+backward vs eager", "clip_loss", 3.0, vs="eager", modes=("both",)),
    Target("SE (hswish_se): vs eager", "hswish_se", 1.8, vs="eager"),
    Target("SE (hswish_se): vs torch.compile", "hswish_se", 1.2, vs="torch.compile"),
    Target("Spectral norm: SAGAN discriminator step (hook)", "sagan_discriminator", 1.3,
           ours="fastnote hook", vs="torch hook"),
    Target("Spectral norm: SAGAN discriminator step (parametrization)", "sagan_discriminator", 1.3,
           ours="fastnote parametrization", vs="torch parametrization"),
    Target("Whole models: every example vs eager", "models", 1.3, vs="eager", per=()),
    Target("Whole models: SAGAN and Swin-T vs torch.compile(eager)", "models", 1.0, vs="torch.compile",
           where={"model": ("SAGAN*", "Swin-T*")}, per=()),
    Target("No op slower than eager (every shape, dtype and mode)", "*", 1.0, vs="eager", per=(),
           skip_ops=("models",), itemize=True),
]

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"


@dataclasses.dataclass
class Outcome:
    target: Target
    status: str
    group: Tuple = ()                                         # the values of target.per
    checked: list = dataclasses.field(default_factory=list)  # cases: op, cfg, mode, x, value (+ times)
    failed: list = dataclasses.field(default_factory=list)   # cases where ours gave no number
    reason: str = ""                                          # why not measured

    @property
    def worst(self) -> Optional[dict]:
        return min(self.checked, key=lambda c: c["value"]) if self.checked else None


def _match_value(have, want) -> bool:
    if isinstance(want, (tuple, list)):
        return any(_match_value(have, w) for w in want)
    if isinstance(want, str):
        return fnmatch.fnmatchcase(str(have), want)
    try:
        return float(have) == float(want)
    except (TypeError, ValueError):
        return have == want


def _in_scope(target: Target, row) -> bool:
    return fnmatch.fnmatchcase(row["op"], target.op) and row["op"] not in target.skip_ops + ("copy_bandwidth",)


def _cells(target: Target, rows) -> dict:
    """(op, config json, mode) -> {"cfg", "x", "time": {provider: ms}, "unit", "gbps"} for the
    target's cases."""
    cells = {}
    for r in rows:
        if target.modes and r["mode"] not in target.modes:
            continue
        cfg = _config(r)
        values = dict(cfg, x_value=r["x_value"])
        if not all(k in values and _match_value(values[k], v) for k, v in target.where.items()):
            continue
        c = cells.setdefault((r["op"], json.dumps(cfg, sort_keys=True), r["mode"]),
                             {"cfg": cfg, "x": _float(r["x_value"]), "time": {}, "unit": None, "gbps": None})
        if r["metric"] == "time" and r["provider"] in (target.ours, target.vs):
            c["time"][r["provider"]] = _float(r["p50"])
        elif r["metric"] == "throughput" and r["provider"] == target.ours:
            if r["unit"] == target.unit:
                c["unit"] = _float(r["p50"])
            elif r["unit"] == "GB/s":
                c["gbps"] = _float(r["p50"])
    return cells


def _check(out: Outcome, case: dict, c: dict, copy_gbps: Optional[float]) -> None:
    """Add one case to ``out.checked`` or ``out.failed`` (or neither, when it lacks the rows)."""
    target = out.target
    mine = c["time"].get(target.ours)
    if target.unit:
        value = c["unit"]
        if value is None and target.unit == "% of copy BW" and c["gbps"] is not None and copy_gbps:
            value = 100.0 * c["gbps"] / copy_gbps   # a run without the % row: derived from its GB/s
        if value is not None and _finite(value):
            out.checked.append(dict(case, value=value))
        elif value is not None and mine is not None:
            out.failed.append(case)
        return
    theirs = c["time"].get(target.vs)
    if mine is None or theirs is None:
        return
    if not _finite(mine):
        if _finite(theirs):
            out.failed.append(case)
    elif _finite(theirs) and mine > 0:   # else the other provider failed (e.g. out of memory): no comparison
        out.checked.append(dict(case, value=theirs / mine, mine=mine, theirs=theirs))


def evaluate(target: Target, rows, copy_gbps: Optional[float] = None) -> list:
    """Check one target against the rows of one results folder: an Outcome per ``per`` group
    (in dtype order), or one "not measured" Outcome saying why."""
    rows = [r for r in rows if _in_scope(target, r)]
    groups = {}
    for (op, _, mode), c in _cells(target, rows).items():
        group = tuple(c["cfg"].get(k) for k in target.per)
        out = groups.setdefault(group, Outcome(target, NOT_MEASURED, group))
        _check(out, {"op": op, "cfg": c["cfg"], "mode": mode, "x": c["x"]}, c, copy_gbps)
    outcomes = []
    for group in sorted(groups, key=lambda g: [(DTYPE_ORDER.get(v, 9), str(v)) for v in g]):
        out = groups[group]
        if out.failed:
            out.status = NOT_MET
        elif out.checked:
            out.status = MET if out.worst["value"] >= target.at_least else NOT_MET
        if out.status != NOT_MEASURED:
            outcomes.append(out)
    if outcomes:
        return outcomes
    providers = {r["provider"] for r in rows}
    units = {r["unit"] for r in rows if r["provider"] == target.ours}
    if not rows:
        reason = f"no {target.op} rows in this run" if target.op != "*" else "no rows"
    elif target.ours not in providers:
        reason = f"no {target.ours} rows"
    elif target.vs and target.vs not in providers:
        reason = f"no {target.vs} rows"
    elif target.unit and target.unit not in units:
        reason = f"no '{target.unit}' rows"
    else:
        reason = "no matching case"
    return [Outcome(target, NOT_MEASURED, reason=reason)]


def _case_text(target: Target, case: dict) -> str:
    """The case as the targets table shows it: without what the target or its group pins."""
    cfg = {k: v for k, v in case["cfg"].items() if k not in target.where and k not in target.per}
    text = ", ".join(p for p in (_shape(cfg), str(cfg.get("dtype", "")), case["mode"]) if p)
    return f"{case['op']}: {text}" if any(ch in target.op for ch in "*?[") else text


def _value_text(target: Target, value: float) -> str:
    if target.unit:
        return f"{value:.1f}%" if target.unit.startswith("%") else f"{value:.3g} {target.unit}"
    return f"{value:.2f}x"


def _needed_text(target: Target) -> str:
    if target.unit:
        return f">= {target.at_least:g}{target.unit}" if target.unit.startswith("%") else \
            f">= {target.at_least:g} {target.unit}"
    who = f"{target.ours} " if target.ours != OURS else ""
    return f"{who}>= {target.at_least:.2f}x {target.vs}"


def _order(case: dict) -> tuple:
    cfg = case["cfg"]
    return (case["op"], DTYPE_ORDER.get(cfg.get("dtype"), 9), str(cfg.get("dtype")), case["x"],
            json.dumps(cfg, sort_keys=True), MODE_ORDER.get(case["mode"], 9), case["mode"])


def _dtype_text(out: Outcome) -> str:
    if out.status == NOT_MEASURED:
        return "-"
    if out.group:
        return ", ".join(str(v) for v in out.group if v is not None) or "-"
    dtypes = {c["cfg"].get("dtype") for c in out.checked + out.failed} - {None}
    return ", ".join(sorted(dtypes, key=lambda d: (DTYPE_ORDER.get(d, 9), d))) or "-"


def targets_table(rows, targets: Optional[Sequence[Target]] = None) -> list:
    """Markdown lines: for each target (and dtype), its worst measured case, the threshold and
    met / not met / not measured; then, for an ``itemize`` target, every case that misses it."""
    targets = TARGETS if targets is None else targets
    copy = _copy_gbps(rows)
    outcomes = [o for t in targets for o in evaluate(t, rows, copy)]
    measured = [o for o in outcomes if o.status != NOT_MEASURED]
    met = sum(o.status == MET for o in measured)
    lines = [f"Met: {met} of the {len(measured)} checks measured; {len(outcomes) - len(measured)} not measured. "
             "Speed-up = the other provider's median time / fastnote's; a target that names no mode (or "
             "shape) holds for every one measured, and the table shows its worst case.", "",
             "| target | dtype | worst case | measured | needed | status |", "|---|---|---|---:|---|---|"]
    for o in outcomes:
        t = o.target
        if o.status == NOT_MEASURED:
            where, value = f"({o.reason})", "n/a"
        else:
            n = len(o.checked) + len(o.failed)
            if o.failed:
                where = f"{len(o.failed)} of {n} cases: {t.ours} failed"
                value = _value_text(t, o.worst["value"]) if o.checked else "failed"
            else:
                where = _case_text(t, o.worst) + (f" (worst of {n})" if n > 1 else "")
                value = _value_text(t, o.worst["value"])
        status = {MET: "met", NOT_MET: "**not met**", NOT_MEASURED: "not measured"}[o.status]
        lines.append(f"| {t.what} | {_dtype_text(o)} | {where} | {value} | {_needed_text(t)} | {status} |")
    lines.append("")
    for o in outcomes:
        t = o.target
        if not t.itemize or o.status == NOT_MEASURED:
            continue
        misses = sorted([c for c in o.checked if c["value"] < t.at_least] + o.failed, key=_order)
        lines.append(f"**{t.what}**: {len(misses)} of {len(o.checked) + len(o.failed)} cases miss it"
                     + (":" if misses else "."))
        lines.append("")
        if not misses:
            continue
        head = ["op", "shape", "dtype", "mode"] + ([] if t.unit else [f"{t.vs} ms", f"{t.ours} ms"])
        head.append("measured" if t.unit else f"{t.vs} / {t.ours}")
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
        for c in misses:
            cells = [c["op"], _shape(c["cfg"]), str(c["cfg"].get("dtype", "")), c["mode"]]
            if not t.unit:
                cells += [_ms(c.get("theirs")), _ms(c.get("mine"))]
            cells.append(_value_text(t, c["value"]) if "value" in c else "failed")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render_targets(by_device, targets: Optional[Sequence[Target]] = None) -> str:
    out = ["<!-- generated by benchmarks/make_table.py (its TARGETS) from benchmarks/results/*/*.csv; "
           "do not edit -->", ""]
    gpus = [d for d in _devices(by_device) if _is_gpu(d)]
    if not gpus:
        out += ["No GPU results are committed yet: the targets are checked against each GPU run's CSVs.", ""]
    for device in gpus:
        rows = [r for r in by_device[device] if r.get("op") != "copy_bandwidth"]
        if not rows:
            continue
        out += [_header(device, rows), "", f"From `benchmarks/results/{device}/`.", ""]
        out += targets_table(by_device[device], targets)
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------
# Plots from committed CSVs
# ------------------------------------------------------------------------------------------------

def declarations() -> dict:
    """{op: Benchmark} from every benchmark script (the ones run_all.py runs)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import run_all

    found = {}
    for path in run_all.discover(BENCH):
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # a script that needs what is not installed here: its plots are left as they are
            print(f"(plots: benchmarks/{name}.py does not import here: {type(exc).__name__}: {exc})")
            continue
        for bench in getattr(module, "BENCHMARKS", ()):
            found[bench.op] = bench
    return found


def replot(results_dir: str, folders: Sequence[str] = ()) -> list:
    """Redraw the PNGs of each results folder (a name under ``results_dir`` or a path; default
    every non-smoke folder) from its CSVs, with harness.plot and the op's Benchmark declaration."""
    benches = declarations()
    from harness import plot

    chosen = []
    for f in folders:
        path = os.path.join(results_dir, f) if os.path.isdir(os.path.join(results_dir, f)) else f
        if not os.path.isdir(path):
            raise SystemExit(f"--plots: no results folder {f!r} (in {results_dir} or here)")
        chosen.append(path)
    written = []
    for folder in chosen or _folders(results_dir):
        by_op = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
            for r in read_rows(path):
                by_op.setdefault(r["op"], []).append(r)
        for op, op_rows in by_op.items():
            bench = benches.get(op)
            if bench is None:
                if op != "copy_bandwidth":
                    print(f"(plots: no benchmark script declares {op!r}: its PNG in {folder} is left as it is)")
                continue
            written += plot(bench, op_rows, folder)
    return written


# ------------------------------------------------------------------------------------------------

def write_between_markers(readme: str, text: str, start_marker: str = START, end_marker: str = END) -> bool:
    """Replace what lies between the markers; False when the file or the markers are missing."""
    if not os.path.exists(readme):
        return False
    with open(readme, encoding="utf-8") as f:
        content = f.read()
    start, end = content.find(start_marker), content.find(end_marker)
    if start < 0 or end < 0 or end < start:
        return False
    new = content[: start + len(start_marker)] + "\n" + text + content[end:]
    with open(readme, "w", encoding="utf-8") as f:
        f.write(new)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--stdout", action="store_true", help="print the tables, leave README.md alone")
    p.add_argument("--plots", nargs="*", metavar="FOLDER",
                   help="first redraw the PNGs of these results folders from their CSVs (none named: all)")
    args = p.parse_args(argv)

    if args.plots is not None:
        for png in replot(args.results, args.plots):
            print(f"wrote {os.path.relpath(png)}")
    by_device = load(args.results)
    blocks = [(START, END, render(by_device, args.results) if by_device else NO_RESULTS + "\n", "table"),
              (TARGETS_START, TARGETS_END, render_targets(by_device), "targets")]
    for start, end, text, what in blocks:
        if not args.stdout and write_between_markers(args.readme, text, start, end):
            print(f"updated the {what} in {args.readme} ({sum(len(v) for v in by_device.values())} result rows)")
        else:
            if not args.stdout:
                print(f"(no {start} ... {end} markers in {args.readme}: printing the {what})\n")
            sys.stdout.write(text)
            if what == "table":
                sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
