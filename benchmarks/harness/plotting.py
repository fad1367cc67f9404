"""The PNGs: per op and ``plot_by`` group, time and peak memory against the swept size, one line
per provider (the p20-p80 band shaded for time), one column per mode."""
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


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))
