"""The benchmark harness shared by every ``benchmarks/<op>.py`` script.

How to add a benchmark
======================
Write ``benchmarks/<op>.py`` (run_all.py picks up every script that calls ``harness.main(``)::

    '''<op>: what is measured. Bytes model: fwd 2*N*itemsize, bwd 3*N*itemsize (say why).'''
    import torch
    import torch.nn.functional as F
    import fastnote
    import harness
    from harness import Benchmark, Case, Provider

    def make_inputs(case, device):               # built once per case, shared by the providers
        x = torch.randn(case.config["shape"], dtype=case.dtype, device=device)
        return {"x": x.requires_grad_()}          # leaves that require grad get gradients

    def eager(inputs, case):                     # returns the forward callable
        return lambda: F.hardswish(inputs["x"])

    def ours(inputs, case):
        return lambda: fastnote.hard_swish(inputs["x"])

    BENCHMARKS = [Benchmark(
        op="hard_swish",                          # -> results/<gpu>/hard_swish.csv
        make_inputs=make_inputs,
        providers=[Provider("eager", eager),
                   Provider("torch.compile", eager, compile=True),
                   Provider("fastnote", ours)],
        cases=[Case("N", 128 * 72 * 56 * 56, {"dtype": "bf16", "shape": [128, 72, 56, 56]}), ...],
        smoke_cases=[Case("N", 2 * 8 * 7 * 7, {"dtype": "fp32", "shape": [2, 8, 7, 7]})],
        bytes_moved=lambda case, mode: {"fwd": 2, "bwd": 3, "both": 5}[mode] * case.x_value * case.itemsize,
    )]

    if __name__ == "__main__":
        harness.main(BENCHMARKS)

Providers
---------
``Provider(name, setup)``: ``setup(inputs, case)`` runs outside the timed region and returns either

- the forward callable (no arguments; returns a tensor, or a tuple/list/dict of tensors). The
  harness derives the modes from it: ``fwd`` times the forward (autograd on, as in training, so
  the memory figure includes what the forward saves for backward); ``bwd`` runs the forward
  once, untimed, then times ``torch.autograd.backward(outputs, grads, retain_graph=True)``;
  ``both`` times forward + backward. Leaf tensors in ``inputs`` (dict/list/tuple, nn.Module
  parameters included) get ``.grad = None`` before every timed call, so no accumulation is
  timed. Or
- a dict ``{"fwd": fn, "bwd": fn, "both": fn}`` of ready callables (any subset), for
  providers that need their own wiring.

``compile=True`` wraps the forward callable in ``torch.compile(dynamic=False)`` after
``torch._dynamo.reset()`` for every case (no recompile limit, no dynamic-shape kernels). Compiled
providers are skipped in smoke mode unless ``--compile`` is given. ``needs_cuda=True`` skips a
provider on the CPU.

Cases and models
----------------
``Case(x_name, x_value, config)``: ``x_value`` is the swept size plotted on the x axis;
``config`` (JSON-able: dtype as "fp32"/"fp16"/"bf16", the other dims) is written as a JSON string.
``case.dtype`` / ``case.itemsize`` read ``config["dtype"]``. ``bytes_moved(case, mode)`` and
``flops(case, mode)`` (each optional, may return None) give achieved GB/s and TFLOP/s; GB/s is
also reported as a percentage of the copy bandwidth measured once per run (1 GiB ``copy_``, also
written to ``device.csv``) and of the nominal peak (H100 SXM 3350 GB/s, H200 4800 GB/s; dense
bf16/fp16 989 TFLOP/s, fp32 67, tf32 494; ``--peak-gbps`` / ``--peak-tflops`` override).

Where and how it measures
-------------------------
- CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` for time; peak memory is
  ``max_memory_allocated()`` during one call minus what was allocated before it.
- No GPU: smoke mode (``smoke_cases``, one timed call with ``time.perf_counter``, no memory
  rows, compiled providers skipped). Results go to ``--out`` (default a fresh temp dir) under
  ``cpu-smoke/``, so CI never rewrites committed results. ``--smoke`` forces it on a GPU too.
- A benchmark whose CPU timings are real measurements (spectral norm's power iteration:
  ``Benchmark(..., cpu_real=True, device="cpu", modes=("fwd",))``) runs its full ``cases`` on
  the CPU, ``cpu_warmup`` untimed then ``cpu_repeats`` timed calls (median, 20th and 80th
  percentile via ``time.perf_counter``), the providers taking turns (``CPU_ROUND`` calls each)
  so that a drifting machine speed hits them alike, into ``results/cpu-<processor>/``; its config gains
  ``threads``. ``device="cpu"`` keeps it on the CPU where a GPU exists too; with
  ``device=None`` it uses the GPU when there is one. ``--smoke`` still means smoke.
- A provider that fails (CUDA OOM included) gives NaN rows with ``"note"`` in their config and
  the run goes on; any failure other than OOM makes the script exit non-zero at the end.

Output: ``<out>/<device slug>/<op>.csv`` (long format, columns ``COLUMNS``; a run rewrites its
op's file) and one PNG per op and ``plot_by`` group (time and memory vs x, one line per provider,
one column per mode).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

CPU_ROUND = 1   # real CPU timings: calls per provider per turn (see _run_case_interleaved)

COLUMNS = ["op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
           "config", "gpu", "torch", "triton", "fastnote_commit", "timestamp"]
MODES = ("fwd", "bwd", "both")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTILES = [0.5, 0.2, 0.8]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
COPY_BYTES = 1 << 30

# Nominal peaks (dense, no sparsity) by a substring of torch.cuda.get_device_name().
_NOMINAL = (
    ("H200", {"gbps": 4800.0, "bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 80GB HBM3", {"gbps": 3350.0, "bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 SXM", {"gbps": 3350.0, "bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
)


@dataclasses.dataclass
class Case:
    x_name: str
    x_value: float
    config: Dict[str, Any]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.config["dtype"]]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass
class Provider:
    name: str
    setup: Callable[[Any, Case], Any]
    compile: bool = False
    skip_in_smoke: Optional[bool] = None  # default: skip compiled providers in smoke mode
    needs_cuda: bool = False


@dataclasses.dataclass
class Benchmark:
    op: str
    make_inputs: Callable[[Case, torch.device], Any]
    providers: Sequence[Provider]
    cases: Sequence[Case]
    smoke_cases: Sequence[Case]
    modes: Sequence[str] = MODES
    bytes_moved: Optional[Callable[[Case, str], Optional[float]]] = None
    flops: Optional[Callable[[Case, str], Optional[float]]] = None
    device: Optional[str] = None  # None: cuda when available, else cpu
    cpu_real: bool = False        # CPU timings are real measurements, not a smoke run
    cpu_warmup: int = 3
    cpu_repeats: int = 20
    plot_by: Sequence[str] = ("dtype",)


class _NotApplicable(Exception):
    """A mode that does not exist for a provider (e.g. backward of an output without grad)."""


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------

def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def triton_version() -> str:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:
        return "absent"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    # gc.collect costs ~0.1 s with torch loaded: only worth it where memory is measured.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


_COPY_GBPS: Dict[str, float] = {}


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device copy bandwidth, (read + write bytes) / time of a 1 GiB ``copy_``, measured once."""
    key = str(device)
    if key not in _COPY_GBPS:
        import triton.testing

        src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=QUANTILES)[0]
        _COPY_GBPS[key] = 2 * COPY_BYTES / (ms * 1e-3) / 1e9
        del src, dst
        _free(device)
    return _COPY_GBPS[key]


def nominal_peak(gpu: str) -> Dict[str, float]:
    for key, peaks in _NOMINAL:
        if key.lower() in gpu.lower():
            return peaks
    return {}


# ------------------------------------------------------------------------------------------------
# Inputs, outputs and modes
# ------------------------------------------------------------------------------------------------

def grad_leaves(obj) -> List[torch.Tensor]:
    """Leaf tensors requiring grad in a nest of dicts/lists/tuples/modules."""
    found: List[torch.Tensor] = []
    seen = set()

    def visit(o):
        if isinstance(o, torch.Tensor):
            if o.requires_grad and o.is_leaf and id(o) not in seen:
                seen.add(id(o))
                found.append(o)
        elif isinstance(o, torch.nn.Module):
            for p in o.parameters():
                visit(p)
        elif isinstance(o, Mapping):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    visit(obj)
    return found


def _diff_outputs(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        outs = [out]
    elif isinstance(out, Mapping):
        outs = [v for v in out.values() if isinstance(v, torch.Tensor)]
    elif isinstance(out, (list, tuple)):
        outs = [v for v in out if isinstance(v, torch.Tensor)]
    else:
        outs = []
    outs = [t for t in outs if t.requires_grad]
    if not outs:
        raise _NotApplicable("no output requires grad")
    return outs


def _mode_callable(made, mode: str) -> Callable[[], Any]:
    """The callable to time for ``mode``; its untimed setup (a forward for bwd) runs here."""
    if isinstance(made, Mapping):
        if mode not in made:
            raise _NotApplicable(f"provider gives no {mode!r} callable")
        return made[mode]
    forward = made
    if mode == "fwd":
        return forward
    outs = _diff_outputs(forward())
    grads = [torch.randn_like(t) for t in outs]
    if mode == "bwd":
        return _retained_backward(outs, grads)
    del outs  # "both" runs its own forward on every call: free this graph
    return lambda: torch.autograd.backward(_diff_outputs(forward()), grads)


def _retained_backward(outs, grads) -> Callable[[], Any]:
    return lambda: torch.autograd.backward(outs, grads, retain_graph=True)


def _clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------

def _quantiles(times_ms: List[float]) -> List[float]:
    s = sorted(times_ms)

    def q(p):  # linear interpolation, as numpy's default
        pos = p * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return [q(p) for p in QUANTILES]


def _time_cpu(fn, leaves, warmup: int, repeats: int, device: torch.device) -> List[float]:
    """Wall-clock quantiles; synchronises, so it is also right for a smoke run on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        _clear_grads(leaves)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _time_cuda(fn, leaves) -> List[float]:
    import triton.testing

    return list(triton.testing.do_bench(fn, quantiles=QUANTILES, grad_to_none=leaves or None))


def _peak_memory_mb(fn, leaves, device) -> float:
    _clear_grads(leaves)
    gc.collect()
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    _clear_grads(leaves)
    return (peak - before) / 1e6


# ------------------------------------------------------------------------------------------------
# Running one benchmark
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Run:
    device: torch.device
    smoke: bool
    cpu_timing: bool
    slug: str
    gpu: str
    warmup: int
    repeats: int
    peak_gbps: Optional[float]
    peak_tflops: Optional[float]
    copy_gbps: Optional[float]
    meta: Dict[str, str]


def _measure(bench: Benchmark, run: _Run, made, mode: str, leaves):
    """(time quantiles in ms, peak memory in MB or None)."""
    fn = _mode_callable(made, mode)
    try:
        if run.cpu_timing:
            times = _time_cpu(fn, leaves, run.warmup, run.repeats, run.device)
            memory = None
        else:
            fn()  # warm-up: compilation and autotuning stay out of the memory figure
            _clear_grads(leaves)
            memory = _peak_memory_mb(fn, leaves, run.device)
            times = _time_cuda(fn, leaves)
        return times, memory
    finally:
        del fn
        _clear_grads(leaves)


def _throughput_rows(bench, run, case, mode, times):
    """[(unit, p50, p20, p80)]: a shorter time is a higher throughput, so p20 comes from p80."""
    t50, t20, t80 = times
    rows = []

    def rate(amount, scale):
        return [amount / scale / (t * 1e-3) if t and t > 0 else float("nan") for t in (t50, t80, t20)]

    nbytes = bench.bytes_moved(case, mode) if bench.bytes_moved else None
    if nbytes:
        gbps = rate(nbytes, 1e9)
        rows.append(("GB/s", *gbps))
        if run.copy_gbps:
            rows.append(("% of copy BW", *[100 * v / run.copy_gbps for v in gbps]))
        peak = run.peak_gbps or (nominal_peak(run.gpu).get("gbps") if not run.cpu_timing else None)
        if peak:
            rows.append(("% of peak BW", *[100 * v / peak for v in gbps]))
    nflops = bench.flops(case, mode) if bench.flops else None
    if nflops:
        tflops = rate(nflops, 1e12)
        rows.append(("TFLOP/s", *tflops))
        peak = run.peak_tflops
        if peak is None and not run.cpu_timing:
            name = case.config.get("dtype")
            if name == "fp32" and (torch.backends.cuda.matmul.allow_tf32
                                   or torch.get_float32_matmul_precision() != "highest"):
                name = "tf32"
            peak = nominal_peak(run.gpu).get(name)
        if peak:
            rows.append(("% of peak TFLOP/s", *[100 * v / peak for v in tflops]))
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


def run_benchmark(bench: Benchmark, run: _Run, cases, modes, providers, with_compile: bool):
    """Rows of every (case, provider, mode); returns (rows, failures)."""
    rows: List[dict] = []
    failures = 0
    nan3 = [float("nan")] * 3
    active = []
    for p in providers:
        skip = p.compile if p.skip_in_smoke is None else p.skip_in_smoke
        if p.needs_cuda and run.device.type != "cuda":
            print(f"  {p.name}: skipped (needs CUDA)")
        elif run.smoke and skip and not with_compile:
            print(f"  {p.name}: skipped in smoke mode (torch.compile takes too long for a smoke run; "
                  f"pass --compile to run it)")
        else:
            active.append(p)
    for case in cases:
        torch.manual_seed(0)
        try:
            inputs = bench.make_inputs(case, run.device)
        except Exception as exc:  # the case cannot even be built: NaN for everyone
            oom = _is_oom(exc)
            note = "OOM" if oom else f"{type(exc).__name__}: {exc}"[:300]
            if not oom:
                failures += 1
                traceback.print_exc()
            print(f"  {_describe(case)}: inputs failed ({note})")
            del exc
            _free(run.device)
            for p in active:
                for mode in modes:
                    rows += _rows(bench, run, case, p.name, mode, nan3, float("nan"), f"inputs: {note}")
            continue
        leaves = grad_leaves(inputs)
        if run.cpu_timing and not run.smoke:
            new_rows, failed = _run_case_interleaved(bench, run, case, inputs, leaves, active, modes)
            rows += new_rows
            failures += failed
            del inputs, leaves
            continue
        for p in active:
            made = None
            setup_note = None
            try:
                made = p.setup(inputs, case)
                if p.compile and not isinstance(made, Mapping):
                    torch._dynamo.reset()
                    made = torch.compile(made, dynamic=False)
            except Exception as exc:
                setup_note = _setup_note(exc)
                if setup_note != "OOM":
                    failures += 1
                    traceback.print_exc()
                del exc
            for mode in modes:
                note = setup_note
                times, memory = nan3, float("nan")
                if note is None:
                    try:
                        times, memory = _measure(bench, run, made, mode, leaves)
                    except _NotApplicable as exc:
                        print(f"  {bench.op:<14} {p.name:<14} {mode:<4} {_describe(case)}: n/a ({exc})")
                        continue
                    except Exception as exc:
                        note = _setup_note(exc)
                        if note != "OOM":
                            failures += 1
                            traceback.print_exc()
                        del exc
                    _free(run.device)
                new = _rows(bench, run, case, p.name, mode, times, memory, note)
                rows += new
                _print_result(bench, p.name, mode, case, new, note)
            del made
            _clear_grads(leaves)
            _free(run.device)
        del inputs, leaves
        _free(run.device)
    return rows, failures


def _run_case_interleaved(bench, run, case, inputs, leaves, providers, modes):
    """Real CPU timings of one case: the providers take turns, ``CPU_ROUND`` calls each per
    round, until each has ``run.repeats`` timed calls. A machine whose speed drifts (a shared
    VM, frequency scaling, a neighbour's load) then slows every provider alike, and the ratios
    between them stay fair. Returns (rows, failures)."""
    rows: List[dict] = []
    failures = 0
    nan3 = [float("nan")] * 3
    made: Dict[str, Any] = {}
    notes: Dict[str, Optional[str]] = {}
    for p in providers:
        try:
            made[p.name] = p.setup(inputs, case)
            notes[p.name] = None
        except Exception as exc:
            notes[p.name] = _setup_note(exc)
            failures += 1
            traceback.print_exc()
            del exc
    for mode in modes:
        fns: Dict[str, Callable[[], Any]] = {}
        mode_notes = dict(notes)
        for p in providers:
            if mode_notes[p.name] is not None:
                continue
            try:
                fns[p.name] = _mode_callable(made[p.name], mode)
            except _NotApplicable as exc:
                print(f"  {bench.op:<14} {p.name:<14} {mode:<4} {_describe(case)}: n/a ({exc})")
                mode_notes[p.name] = "n/a"
            except Exception as exc:
                mode_notes[p.name] = _setup_note(exc)
                failures += 1
                traceback.print_exc()
                del exc
        def call(name) -> bool:
            """One call of provider ``name``; a failure records its note and drops it."""
            nonlocal failures
            try:
                fns[name]()
                return True
            except Exception as exc:
                mode_notes[name] = _setup_note(exc)
                failures += 1
                traceback.print_exc()
                del fns[name], exc
                return False

        for _ in range(run.warmup):
            for name in list(fns):
                call(name)
        samples: Dict[str, List[float]] = {name: [] for name in fns}
        while any(len(samples[name]) < run.repeats for name in fns):
            for name in list(fns):
                for _ in range(CPU_ROUND):
                    _clear_grads(leaves)
                    t0 = time.perf_counter()
                    if not call(name):
                        break
                    samples[name].append((time.perf_counter() - t0) * 1e3)
        _clear_grads(leaves)
        for p in providers:
            note = mode_notes[p.name]
            if note == "n/a":
                continue
            times = _quantiles(samples[p.name]) if note is None else nan3
            new = _rows(bench, run, case, p.name, mode, times, None, note)
            rows += new
            _print_result(bench, p.name, mode, case, new, note)
    del made
    _clear_grads(leaves)
    return rows, failures


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


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

def write_csv(path: str, rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) if k in ("p50", "p20", "p80") else r[k] for k in COLUMNS})


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


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _csv_list(text: Optional[str]) -> Optional[List[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, one timed call (automatic when there is no CUDA GPU)")
    p.add_argument("--out", help="output root; results go to OUT/<device>/<op>.csv "
                                 "(default: benchmarks/results, or a temp dir in smoke mode)")
    p.add_argument("--modes", help="comma list of fwd,bwd,both")
    p.add_argument("--dtypes", help="comma list of fp32,fp16,bf16")
    p.add_argument("--providers", help="comma list of provider names")
    p.add_argument("--compile", action="store_true", help="run torch.compile providers in smoke mode too")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile providers (their compilation dominates a short GPU run)")
    p.add_argument("--quick", action="store_true",
                   help="only each benchmark's first case per dtype (a GPU run on a short budget); "
                        "results go to a folder named <device>-quick")
    p.add_argument("--repeats", type=int, help="timed calls per measurement on the CPU")
    p.add_argument("--peak-gbps", type=float, help="nominal memory bandwidth for the %% of peak rows")
    p.add_argument("--peak-tflops", type=float, help="nominal compute peak for the %% of peak rows")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    return p


def main(benchmarks: Sequence[Benchmark], argv: Optional[Sequence[str]] = None) -> None:
    args = parser(sys.modules["__main__"].__doc__ or "").parse_args(argv)
    modes_wanted = _csv_list(args.modes)
    dtypes_wanted = _csv_list(args.dtypes)
    providers_wanted = _csv_list(args.providers)
    for name in modes_wanted or []:
        if name not in MODES:
            sys.exit(f"--modes: unknown mode {name!r}; choose from {MODES}")
    for name in dtypes_wanted or []:
        if name not in DTYPES:
            sys.exit(f"--dtypes: unknown dtype {name!r}; choose from {tuple(DTYPES)}")

    meta_common = {"torch": torch.__version__, "triton": triton_version(), "fastnote_commit": git_commit(),
                   "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp_out = None
    failures = 0
    for bench in benchmarks:
        has_cuda = torch.cuda.is_available()
        device = torch.device(bench.device or ("cuda" if has_cuda else "cpu"))
        if device.type == "cuda" and not has_cuda:
            print(f"{bench.op}: needs CUDA, none here: smoke on the CPU instead")
            device = torch.device("cpu")
        smoke = args.smoke or (device.type == "cpu" and not bench.cpu_real)
        cpu_timing = smoke or device.type == "cpu"
        if device.type == "cuda":
            gpu = torch.cuda.get_device_name(device)
            slug = slugify(gpu) + ("-smoke" if smoke else "")
        else:
            gpu = cpu_name()
            slug = "cpu-smoke" if smoke else "cpu-" + slugify(gpu)
        if args.quick and not smoke:
            slug += "-quick"   # a subset of the cases: never overwrites a full run's CSV
        out_root = args.out
        if out_root is None:
            if smoke:
                tmp_out = tmp_out or tempfile.mkdtemp(prefix="fastnote-bench-")
                out_root = tmp_out
            else:
                out_root = RESULTS
        copy_gbps = None
        if not cpu_timing and bench.bytes_moved is not None:
            copy_gbps = copy_bandwidth_gbps(device)
            write_csv(os.path.join(out_root, slug, "device.csv"), [dict(
                op="copy_bandwidth", provider="torch.copy_", mode="copy", metric="throughput", unit="GB/s",
                x_name="bytes", x_value=COPY_BYTES, p50=copy_gbps, p20=copy_gbps, p80=copy_gbps,
                config=json.dumps({"dtype": "uint8"}), gpu=gpu, **meta_common)])
        run = _Run(device=device, smoke=smoke, cpu_timing=cpu_timing, slug=slug, gpu=gpu,
                   warmup=0 if smoke else bench.cpu_warmup,
                   repeats=1 if smoke else (args.repeats or bench.cpu_repeats),
                   peak_gbps=args.peak_gbps, peak_tflops=args.peak_tflops, copy_gbps=copy_gbps,
                   meta=dict(gpu=gpu, **meta_common))

        cases = list(bench.smoke_cases if smoke else bench.cases)
        if dtypes_wanted:
            cases = [c for c in cases if c.config.get("dtype") in (None, *dtypes_wanted)]
        modes = [m for m in bench.modes if not modes_wanted or m in modes_wanted]
        providers = [p for p in bench.providers if (not providers_wanted or p.name in providers_wanted)
                     and not (args.no_compile and p.compile)]
        if args.quick and not smoke:
            firsts = {}
            for c in cases:
                firsts.setdefault(c.config.get("dtype"), c)
            cases = list(firsts.values())

        how = ("smoke (tiny shapes, one timed call, no memory)" if smoke else
               f"CPU, median of {run.repeats} calls" if cpu_timing else "triton.testing.do_bench")
        print(f"== {bench.op} on {gpu} ({device.type}): {how}")
        print(f"   torch {meta_common['torch']}, triton {meta_common['triton']}, "
              f"commit {meta_common['fastnote_commit']}, fastnote backend: {_backend_name(device)}")
        if copy_gbps:
            print(f"   measured copy bandwidth: {copy_gbps:.1f} GB/s")
        rows, failed = run_benchmark(bench, run, cases, modes, providers, args.compile)
        failures += failed
        out_dir = os.path.join(out_root, slug)
        path = os.path.join(out_dir, f"{bench.op}.csv")
        write_csv(path, rows)
        print(f"   wrote {path} ({len(rows)} rows)")
        if not args.no_plot and rows:
            try:
                for png in plot(bench, rows, out_dir):
                    print(f"   wrote {png}")
            except Exception:
                failures += 1
                traceback.print_exc()
    if failures:
        print(f"{failures} measurement(s) failed (see the tracebacks above)")
        sys.exit(1)


def _backend_name(device: torch.device) -> str:
    try:
        from fastnote import backend

        if backend.use_triton(device):
            return "triton (interpreter)" if device.type == "cpu" else "triton"
        return "reference"
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"
