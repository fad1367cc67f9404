"""The run of one benchmark: which providers run, and for every case, provider and mode the
inputs, the setup, the measurement (see timing.py) and the rows; a failure gives NaN rows."""
from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Callable, List, Optional

import torch

from .environment import _free, _is_oom
from .modes import _NotApplicable, _clear_grads, grad_leaves
from .results import _describe, _print_result, _rows, _setup_note
from .spec import Benchmark, _Run
from .timing import _measure, _run_case_interleaved


def run_benchmark(bench: Benchmark, run: _Run, cases, modes, providers, with_compile: bool,
                  on_case: Optional[Callable[[List[dict]], None]] = None):
    """Rows of every (case, provider, mode); returns (rows, failures). ``on_case(rows so far)``
    runs after each case (the CLI writes the CSV there, so a run stopped from outside keeps the
    cases it finished)."""
    rows: List[dict] = []
    failures = 0
    nan3 = [float("nan")] * 3
    active = []
    for p in providers:
        skip = p.compile if p.skip_in_smoke is None else p.skip_in_smoke
        if p.needs_cuda and run.device.type != "cuda":
            print(f"  {p.name}: skipped (needs CUDA)")
        elif run.smoke and skip and not with_compile:
            why = "torch.compile takes" if p.compile else "it takes"
            print(f"  {p.name}: skipped in smoke mode ({why} too long for a smoke run; pass --compile to run it)")
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
            if on_case is not None:
                on_case(rows)
            continue
        leaves = grad_leaves(inputs)
        if run.cpu_timing and not run.smoke:
            new_rows, failed = _run_case_interleaved(bench, run, case, inputs, leaves, active, modes)
            rows += new_rows
            failures += failed
            del inputs, leaves
            if on_case is not None:
                on_case(rows)
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
        if on_case is not None:
            on_case(rows)
    return rows, failures
