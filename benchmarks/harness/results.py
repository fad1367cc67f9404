"""Results: the rows of one measurement (time, memory, throughput and % of peak), the line
printed for it, the note a failed provider carries, and the CSV they are written to."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import List

import torch

from .environment import _is_oom, nominal_peak
from .spec import Case

COLUMNS = ["op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
           "config", "gpu", "torch", "triton", "fastnote_commit", "timestamp"]


def _flops_peak(run, case):
    """TFLOP/s the case's dtype can reach: --peak-tflops, else the GPU's nominal figure. fp32 with
    TF32 allowed counts at TF32's rate; fp32 without it at the better of the FMA units and 3xTF32
    (a third of TF32's rate), which is what fp32-accurate products can reach at all."""
    if run.peak_tflops is not None or run.cpu_timing:
        return run.peak_tflops
    # Imported here, not at the top: it imports triton, which only the GPU path needs.
    from fastnote.triton_kernels.utils import fp32_matmul_allows_tf32

    peaks = nominal_peak(run.gpu)
    name = case.config.get("dtype")
    if name == "fp32":
        if fp32_matmul_allows_tf32():
            return peaks.get("tf32")
        if "fp32" in peaks and "tf32" in peaks:
            return max(peaks["fp32"], peaks["tf32"] / 3)
    return peaks.get(name)


def _throughput_rows(bench, run, case, mode, times):
    """[(unit, p50, p20, p80)]: a shorter time is a higher throughput, so p20 comes from p80.

    Speed of light: the op's minimum bytes (``bytes_moved``: each input read once, each output
    written once) over the measured copy bandwidth (else the nominal one) and its useful FLOPs over
    the dtype's peak give two times; the larger is the time no implementation can beat. Every
    provider's row carries it and its own fraction of it, so eager's row says how much faster
    than eager anything could be."""
    t50, t20, t80 = times
    rows = []

    def rate(amount, scale):
        return [amount / scale / (t * 1e-3) if t and t > 0 else float("nan") for t in (t50, t80, t20)]

    bound_ms = []
    nbytes = bench.bytes_moved(case, mode) if bench.bytes_moved else None
    if nbytes:
        gbps = rate(nbytes, 1e9)
        rows.append(("GB/s", *gbps))
        if run.copy_gbps:
            rows.append(("% of copy BW", *[100 * v / run.copy_gbps for v in gbps]))
        peak = run.peak_gbps or (nominal_peak(run.gpu).get("gbps") if not run.cpu_timing else None)
        if peak:
            rows.append(("% of peak BW", *[100 * v / peak for v in gbps]))
        bw = run.copy_gbps or peak
        if bw:
            bound_ms.append(nbytes / (bw * 1e6))
    nflops = bench.flops(case, mode) if bench.flops else None
    if nflops:
        tflops = rate(nflops, 1e12)
        rows.append(("TFLOP/s", *tflops))
        peak = _flops_peak(run, case)
        if peak:
            rows.append(("% of peak TFLOP/s", *[100 * v / peak for v in tflops]))
            bound_ms.append(nflops / (peak * 1e9))
    if bound_ms and t50 is not None and not math.isnan(t50):   # nothing for a provider that failed
        bound = max(bound_ms)
        rows.append(("speed-of-light ms", bound, bound, bound))
        rows.append(("% of speed of light",
                     *[100 * bound / t if t and t > 0 else float("nan") for t in (t50, t80, t20)]))
    return rows


def _fmt(v) -> str:
    if v is None:
        return "nan"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _rows(bench, run, case, provider, mode, times, memory, note):
    config = dict(case.config)
    if run.cpu_timing and not run.smoke:
        config["threads"] = torch.get_num_threads()
    if note:
        config["note"] = note
    base = {"op": bench.op, "provider": provider, "mode": mode, "x_name": case.x_name,
            "x_value": case.x_value, "config": json.dumps(config), **run.meta}
    out = [dict(base, metric="time", unit="ms", p50=times[0], p20=times[1], p80=times[2])]
    if not run.cpu_timing:
        out.append(dict(base, metric="memory", unit="MB", p50=memory, p20=memory, p80=memory))
    for unit, p50, p20, p80 in _throughput_rows(bench, run, case, mode, times):
        out.append(dict(base, metric="throughput", unit=unit, p50=p50, p20=p20, p80=p80))
    return out


def _describe(case: Case) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in case.config.items())
    return f"{case.x_name}={case.x_value} [{cfg}]"


def _setup_note(exc: BaseException) -> str:
    """The note a failed provider's rows carry."""
    return "OOM" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"[:300]


def _print_result(bench, provider, mode, case, rows, note):
    parts = []
    for r in rows:
        v = r["p50"]
        if r["metric"] == "time":
            parts.append(f"{_fmt(v)} ms")
        elif r["metric"] == "memory":
            parts.append(f"{_fmt(v)} MB")
        elif r["unit"] in ("GB/s", "TFLOP/s") or r["unit"].startswith("%"):
            parts.append(f"{_fmt(v)} {r['unit']}")
    tail = f"  [{note}]" if note else ""
    print(f"  {bench.op:<14} {provider:<14} {mode:<4} {_describe(case)}: {', '.join(parts)}{tail}")


def _row_key(r: dict) -> tuple:
    cfg = json.loads(r["config"]) if isinstance(r["config"], str) else dict(r["config"])
    cfg.pop("note", None)
    return (r["provider"], r["mode"], r["metric"], r["unit"], json.dumps(cfg, sort_keys=True))


def merged_with_file(path: str, rows: List[dict]) -> List[dict]:
    """The rows already in the CSV at ``path`` (if any) that ``rows`` does not measure again
    (same provider, mode, metric, unit and case), followed by ``rows``: what ``--merge`` writes."""
    if not os.path.exists(path):
        return list(rows)
    with open(path, newline="", encoding="utf-8") as f:
        old = list(csv.DictReader(f))
    new_keys = {_row_key(r) for r in rows}
    return [r for r in old if _row_key(r) not in new_keys] + list(rows)


def write_csv(path: str, rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) if k in ("p50", "p20", "p80") else r[k] for k in COLUMNS})
