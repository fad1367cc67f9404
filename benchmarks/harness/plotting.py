"""The PNGs: per op and ``plot_by`` group, time and peak memory against the swept size, one line
per provider (the p20-p80 band shaded for time), one column per mode; or, for a Benchmark with
``plot_kind="bars"`` (whole models: cases that are no sweep), one PNG of grouped bars, a group per
case, speed-up and peak memory relative to the first provider."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List

from .spec import MODES, Benchmark


def _plain_config(config_json: str) -> dict:
    cfg = json.loads(config_json)
    cfg.pop("note", None)
    return cfg


def plot(bench: Benchmark, rows: List[dict], out_dir: str) -> List[str]:
    """One PNG per ``plot_by`` group: rows time/memory, columns modes, a line per provider."""
    if bench.plot_kind == "bars":
        return [_plot_bars(bench, rows, out_dir)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r["metric"] not in ("time", "memory"):
            continue
        cfg = _plain_config(r["config"])
        key = tuple((k, cfg.get(k)) for k in bench.plot_by if k in cfg)
        groups.setdefault(key, []).append(r)
    paths = []
    for key, grp in sorted(groups.items(), key=lambda kv: str(kv[0])):
        metrics = [m for m in ("time", "memory")
                   if any(r["metric"] == m and _finite(r["p50"]) for r in grp)] or ["time"]
        modes = [m for m in MODES if any(r["mode"] == m for r in grp)] + sorted(
            {r["mode"] for r in grp} - set(MODES))
        providers = list(dict.fromkeys(r["provider"] for r in grp))
        fig, axes = plt.subplots(len(metrics), len(modes), figsize=(4.2 * len(modes), 3.4 * len(metrics)),
                                 squeeze=False)
        for i, metric in enumerate(metrics):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                xs_all = []
                for prov in providers:
                    pts = sorted((float(r["x_value"]), r["p50"], r["p20"], r["p80"]) for r in grp
                                 if r["metric"] == metric and r["mode"] == mode and r["provider"] == prov)
                    if not pts:
                        continue
                    xs = [p[0] for p in pts]
                    xs_all += xs
                    ax.plot(xs, [_num(p[1]) for p in pts], marker="o", label=prov)
                    if metric == "time":
                        ax.fill_between(xs, [_num(p[2]) for p in pts], [_num(p[3]) for p in pts], alpha=0.2)
                if xs_all and all(float(x).is_integer() for x in xs_all):
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                positive = [x for x in xs_all if x > 0]
                if positive and max(positive) / min(positive) > 16:
                    ax.set_xscale("log")
                ax.set_title(f"{bench.op} {mode}")
                ax.set_xlabel(grp[0]["x_name"])
                ax.set_ylabel("time (ms)" if metric == "time" else "peak memory (MB)")
                ax.grid(True, alpha=0.3)
                if i == 0 and j == 0:
                    ax.legend(fontsize="small")
        label = ", ".join(f"{k}={v}" for k, v in key)
        fig.suptitle(f"{bench.op} on {grp[0]['gpu']}" + (f" ({label})" if label else ""))
        fig.tight_layout()
        suffix = "".join(f"-{v}" for _, v in key) if len(groups) > 1 else ""
        path = os.path.join(out_dir, f"{bench.op}{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _case_label(config_json: str) -> str:
    cfg = _plain_config(config_json)
    return " ".join(str(cfg[k]) for k in ("model", "dtype") if k in cfg) or config_json


def _plot_bars(bench: Benchmark, rows: List[dict], out_dir: str) -> str:
    """Speed-up (baseline time / time) and peak memory relative to the baseline, the baseline being
    the first provider declared; a group of bars per case, one bar per provider; a missing or
    failed measurement leaves its bar out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = [p.name for p in bench.providers if any(r["provider"] == p.name for r in rows)]
    baseline = bench.providers[0].name
    cases = list(dict.fromkeys(_case_label(r["config"]) for r in rows))
    p50 = {(_case_label(r["config"]), r["provider"], r["metric"]): _num(r["p50"]) for r in rows
           if r["metric"] in ("time", "memory")}
    metrics = [m for m in ("time", "memory") if any(k[2] == m and math.isfinite(v) for k, v in p50.items())]
    fig, axes = plt.subplots(1, len(metrics) or 1, figsize=(max(6.0, 1.6 * len(cases)) * len(metrics or [1]), 3.8),
                             squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, metric in zip(axes[0], metrics):
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, case in enumerate(cases):
                base, value = p50.get((case, baseline, metric)), p50.get((case, prov, metric))
                if base is None or value is None or not (math.isfinite(base) and math.isfinite(value)) or value <= 0:
                    continue
                xs.append(i + (j - (len(providers) - 1) / 2) * width)
                ys.append(base / value if metric == "time" else value / base)
            ax.bar(xs, ys, width, label=prov)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize="small")
        ax.set_ylabel(f"speed-up over {baseline}" if metric == "time" else f"peak memory / {baseline}'s")
        ax.set_title(f"{bench.op}: {'step time' if metric == 'time' else 'peak memory'}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{bench.op} on {rows[0]['gpu']}" if rows else bench.op)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{bench.op}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))
