"""How times and memory are measured. On a GPU: ``triton.testing.do_bench`` for the time and the
peak allocation of one call for the memory (``_measure``). On the CPU: wall-clock calls, either
one smoke call (``_time_cpu``) or real timings with the providers taking turns
(``_run_case_interleaved``). Times are in ms, memory in MB."""
from __future__ import annotations

import gc
import math
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch

from .environment import _sync
from .modes import _NotApplicable, _clear_grads, _mode_callable
from .results import _describe, _print_result, _rows, _setup_note
from .spec import QUANTILES, Benchmark, _Run

CPU_ROUND = 1   # real CPU timings: calls per provider per turn (see _run_case_interleaved)


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


def _time_cuda(fn, leaves, rep_ms: int = 100) -> List[float]:
    import triton.testing

    return list(triton.testing.do_bench(fn, rep=rep_ms, quantiles=QUANTILES, grad_to_none=leaves or None))


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
            times = _time_cuda(fn, leaves, bench.gpu_rep_ms)
        return times, memory
    finally:
        del fn
        _clear_grads(leaves)


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
