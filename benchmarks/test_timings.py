"""The benchmark declarations timed through pytest-benchmark, for before/after checks of a change:

    pytest benchmarks/ --benchmark-only [--fastnote-cases quick|all] [-k tv_loss] [-m "not compile"]
    pytest benchmarks/ --benchmark-only --benchmark-save=before     # then, after the change:
    pytest benchmarks/ --benchmark-only --benchmark-compare

One test per op script (those ``run_all.discover()`` finds), Benchmark, case, provider and mode,
id ``op-provider-mode-<case>``; ``benchmark.group`` is op, mode and case, so the providers of one
measurement sit side by side in pytest-benchmark's table. The scripts' CSVs stay the record.

How a round is timed:

- CUDA: the GPU time of one call, from CUDA events (``harness.gpu_clock``, set per test with the
  ``benchmark(timer=...)`` marker), with the L2 cache flushed (``harness.flush_l2``) and the
  gradients of the leaves cleared in pedantic's untimed ``setup``. The first call (compilation,
  autotuning) and a few probe calls run before any warm-up round, and size the run: about 25 ms
  of warm-up rounds, then rounds to fill ``--benchmark-max-time``, at least
  ``--benchmark-min-rounds``.
- CPU, a ``cpu_real`` benchmark (spectral norm): pytest-benchmark's own timer (``perf_counter``),
  the Benchmark's ``cpu_warmup`` warm-up rounds, rounds sized as above. pytest-benchmark runs the
  providers one after the other, not taking turns as the script does.
- CPU, any other benchmark: its CPU path is the Triton interpreter, whose timings mean nothing, so
  it is skipped while benchmarking is on; under ``--benchmark-disable`` its ``smoke_cases`` run
  once each as plain tests, a check of the wiring end to end.

``torch.compile`` providers run and carry the ``compile`` marker (``-m "not compile"`` drops
them); a ``needs_cuda`` provider is skipped without CUDA. An out-of-memory case is a skip, as it
is a note rather than a failure in the CSVs. ``extra_info`` holds the case config, the bytes
moved and flops of the mode (the Benchmark's ``bytes_moved`` / ``flops``) and the device name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

import harness  # noqa: E402
import run_all  # noqa: E402
from harness.environment import _free, _is_oom, _sync  # noqa: E402
from harness.modes import _NotApplicable, _clear_grads, _mode_callable, grad_leaves  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
CUDA_WARMUP_S = 0.025  # warm-up rounds on a GPU: about this long (do_bench's default warm-up)
PROBE_ROUNDS = 3       # untimed rounds after the first call, whose wall time sizes the run
INTERPRETER_SKIP = ("no GPU: this benchmark's CPU path is the Triton interpreter, whose timings measure "
                    "nothing (--benchmark-disable runs its smoke cases once each)")


# ------------------------------------------------------------------------------------------------
# What is collected
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    """One test: a provider's mode on one case of a Benchmark. ``timing``: "gpu" (CUDA events),
    "cpu" (pytest-benchmark's timer) or "interpreter" (a CPU path that is not worth timing)."""
    bench: Any
    case: Any
    label: str
    provider: Any
    mode: str
    device: torch.device
    timing: str


@dataclasses.dataclass
class Broken:
    """A script that failed to load: its one test fails with the traceback."""
    path: str
    error: str


def _load(path: str) -> list:
    """The ``BENCHMARKS`` of the script at ``path``, imported as a module (not as __main__)."""
    name = "fastnote_benchmark_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in a script look their module up there
    try:
        spec.loader.exec_module(module)
        return list(module.BENCHMARKS)
    except BaseException:
        del sys.modules[name]
        raise


@functools.lru_cache(maxsize=None)
def _scripts() -> tuple:
    """(path, [Benchmark]) or (path, Broken) for every op script."""
    found = []
    for path in run_all.discover():
        try:
            found.append((path, _load(path)))
        except Exception:
            found.append((path, Broken(path, traceback.format_exc())))
    return tuple(found)


def _token(text: Any) -> str:
    """``text`` with only the characters a ``-k`` expression accepts in a name."""
    return re.sub(r"_+", "_", re.sub(r"[^\w.+-]", "_", str(text))).strip("_")


def _value(v: Any) -> str:
    return "x".join(str(e) for e in v) if isinstance(v, (list, tuple)) else str(v)


def case_labels(cases: Sequence) -> List[str]:
    """A readable label per case, unique within ``cases``: dtype and shape (or the x value; a whole
    model's name and dtype), then,
    for cases that still look alike, the config entries that tell them apart (text values first),
    then a number if the configs are the same."""
    parts = []
    for c in cases:
        if "model" in c.config:   # whole models (benchmarks/models.py): named, not sized
            parts.append([str(c.config["model"]), str(c.config.get("dtype", ""))])
            continue
        size = _value(c.config["shape"]) if "shape" in c.config else f"{c.x_name}{_value(c.x_value)}"
        parts.append([str(c.config.get("dtype", "")), size])
    groups: Dict[tuple, List[int]] = {}
    for i, p in enumerate(parts):
        groups.setdefault(tuple(p), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        keys = []
        for i in members:
            keys += [k for k in cases[i].config if k not in ("dtype", "shape") and k not in keys]
        differing = [k for k in keys if len({repr(cases[i].config.get(k)) for i in members}) > 1]
        differing.sort(key=lambda k: not all(isinstance(cases[i].config.get(k), str) for i in members))
        for k in differing:
            for i in members:
                v = cases[i].config.get(k)
                parts[i].append(v if isinstance(v, str) else f"{k}{_value(v)}")
            if len({tuple(parts[i]) for i in members}) == len(members):
                break
    labels = ["-".join(t for t in map(_token, p) if t) for p in parts]
    seen: Dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in seen:
            seen[label] += 1
            labels[i] = f"{label}-{seen[label]}"
        else:
            seen[label] = 1
    return labels


def _device(bench) -> torch.device:
    device = torch.device(bench.device or ("cuda" if HAS_CUDA else "cpu"))
    return torch.device("cpu") if device.type == "cuda" and not HAS_CUDA else device


def benchmarking_disabled(config) -> bool:
    """Whether pytest-benchmark runs benchmarked functions once, untimed (``--benchmark-disable``,
    unless ``--benchmark-enable``; also what it decides on its own, under xdist say)."""
    session = getattr(config, "_benchmarksession", None)
    if session is not None:
        return bool(session.disabled)
    return bool(config.getoption("benchmark_disable", False)) and not config.getoption("benchmark_enable", False)


def _params(config) -> list:
    which = config.getoption("fastnote_cases", "quick")
    disabled = benchmarking_disabled(config)
    params = []
    for path, benches in _scripts():
        if isinstance(benches, Broken):
            params.append(pytest.param(benches, id=_token(os.path.basename(path)[:-3]) + "-load"))
            continue
        for bench in benches:
            device = _device(bench)
            timing = "gpu" if device.type == "cuda" else "cpu" if bench.cpu_real else "interpreter"
            smoke = timing == "interpreter" and disabled
            source = list(bench.smoke_cases if smoke else bench.cases)
            labels = dict(zip(map(id, source), case_labels(source)))  # from the full list: stable ids
            cases = source if smoke or which == "all" else harness.quick_cases(bench, source)
            for case in cases:
                for p in bench.providers:
                    marks = [pytest.mark.compile] if p.compile else []
                    if p.needs_cuda and device.type != "cuda":
                        marks.append(pytest.mark.skip(reason="needs CUDA"))
                    elif timing == "interpreter" and not disabled:
                        marks.append(pytest.mark.skip(reason=INTERPRETER_SKIP))
                    if timing == "gpu":
                        marks.append(pytest.mark.benchmark(timer=harness.gpu_clock))
                    for mode in bench.modes:
                        target = Target(bench, case, labels[id(case)], p, mode, device, timing)
                        test_id = "-".join((_token(bench.op), _token(p.name), _token(mode), target.label))
                        params.append(pytest.param(target, id=test_id, marks=marks))
    return params


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", _params(metafunc.config))


# ------------------------------------------------------------------------------------------------
# Inputs and provider setups, shared by consecutive tests
# ------------------------------------------------------------------------------------------------
def _note(exc: BaseException) -> str:
    return "OOM" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"[:300]


def _again(what: str, note: str) -> None:
    if note == "OOM":
        pytest.skip(f"{what}: out of memory (in an earlier test)")
    pytest.fail(f"{what} failed in an earlier test: {note}", pytrace=False)


class CaseCache:
    """The current (benchmark, case)'s inputs, built once and shared by its providers' tests, and
    the current provider's setup, shared by its modes (the tests come in that order). Each is
    freed as soon as the next test needs another: a 4 GB case goes before the next one is built.
    A failure is remembered, so the other tests of that case or provider do not retry it."""

    def __init__(self) -> None:
        self.device: Optional[torch.device] = None
        self.key = None
        self.inputs = None
        self.leaves: List[torch.Tensor] = []
        self.failed: Optional[str] = None
        self.provider = None
        self.made = None
        self.provider_failed: Optional[str] = None

    def _drop_provider(self) -> None:
        self.provider = self.made = self.provider_failed = None

    def clear(self) -> None:
        self._drop_provider()
        self.key = self.inputs = self.failed = None
        self.leaves = []
        if self.device is not None:
            _free(self.device)

    def inputs_for(self, t: Target):
        """(inputs, gradient leaves) of ``t``'s case."""
        key = (t.bench.op, t.label)
        if key != self.key:
            self.clear()
            self.key, self.device = key, t.device
            torch.manual_seed(0)
            try:
                self.inputs = t.bench.make_inputs(t.case, t.device)
            except Exception as exc:
                self.failed = _note(exc)
                raise
            self.leaves = grad_leaves(self.inputs)
        elif self.failed is not None:
            _again("building the inputs", self.failed)
        return self.inputs, self.leaves

    def made_for(self, t: Target):
        """What ``t``'s provider setup returned, compiled as runner.py does for ``compile=True``."""
        if t.provider.name != self.provider:
            self._drop_provider()
            _free(t.device)
            self.provider = t.provider.name
            try:
                made = t.provider.setup(self.inputs, t.case)
                if t.provider.compile and not isinstance(made, Mapping):
                    torch._dynamo.reset()
                    made = torch.compile(made, dynamic=False)
            except Exception as exc:
                self.provider_failed = _note(exc)
                raise
            self.made = made
        elif self.provider_failed is not None:
            _again(f"{t.provider.name} setup", self.provider_failed)
        return self.made


@pytest.fixture(scope="module")
def case_cache():
    cache = CaseCache()
    yield cache
    cache.clear()


@contextlib.contextmanager
def _oom_is_a_skip(device: torch.device):
    """Out of memory: a skip (the CSVs note it; it is no failure), once the memory is freed."""
    try:
        yield
        return
    except Exception as exc:
        if not _is_oom(exc):
            raise
        message = f"out of memory: {exc}"[:300]
    _free(device)
    pytest.skip(message)


# ------------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else harness.cpu_name()


def _number(v):
    return None if v is None else v if isinstance(v, int) else float(v)


def _extra_info(t: Target) -> dict:
    b, c = t.bench, t.case
    info = {"op": b.op, "provider": t.provider.name, "mode": t.mode, "x_name": c.x_name, "x_value": c.x_value,
            "config": dict(c.config),
            "bytes_moved": _number(b.bytes_moved(c, t.mode)) if b.bytes_moved else None,
            "flops": _number(b.flops(c, t.mode)) if b.flops else None,
            "device": _device_name(t.device), "timing": t.timing}
    if t.device.type == "cpu":
        info["threads"] = torch.get_num_threads()
    return info


def _plan(fn, setup, t: Target, timer, config):
    """(warm-up rounds, rounds). The first call (compilation, autotuning, lazy initialisation) and
    ``PROBE_ROUNDS`` more run here, untimed; their wall time per round, setup included, sizes the
    rest: rounds to fill ``--benchmark-max-time``, at least ``--benchmark-min-rounds``; warm-up
    rounds about ``CUDA_WARMUP_S`` long (at least one) on a GPU, the Benchmark's ``cpu_warmup``
    on the CPU."""
    setup()
    fn()
    _sync(t.device)
    start = time.perf_counter()
    for _ in range(PROBE_ROUNDS):
        setup()
        timer()
        fn()
        timer()
    _sync(t.device)
    per_round = max((time.perf_counter() - start) / PROBE_ROUNDS, 1e-9)
    min_rounds = int(config.getoption("benchmark_min_rounds"))
    max_time = float(config.getoption("benchmark_max_time"))
    rounds = max(1, min_rounds, int(max_time / per_round))
    warmup = max(1, math.ceil(CUDA_WARMUP_S / per_round)) if t.timing == "gpu" else t.bench.cpu_warmup
    return warmup, rounds


def _time(benchmark, t: Target, fn, leaves, config) -> None:
    if t.timing == "gpu":
        def setup():
            _clear_grads(leaves)
            harness.flush_l2(t.device)
    else:
        def setup():
            _clear_grads(leaves)

    if benchmark.disabled:
        benchmark.pedantic(fn, setup=setup)  # one call, as a plain test
        return
    on_device = torch.cuda.device(t.device) if t.timing == "gpu" else contextlib.nullcontext()
    with on_device:
        timer = harness.gpu_clock if t.timing == "gpu" else time.perf_counter
        warmup, rounds = _plan(fn, setup, t, timer, config)
        benchmark.extra_info["warmup_rounds"] = warmup
        benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)


def test_timing(target, benchmark, case_cache, request):
    if isinstance(target, Broken):
        pytest.fail(f"{target.path} did not load:\n{target.error}", pytrace=False)
    t = target
    benchmark.group = f"{t.bench.op} {t.mode} {t.label}"
    benchmark.extra_info.update(_extra_info(t))
    if t.timing == "interpreter" and not benchmark.disabled:
        pytest.skip(INTERPRETER_SKIP)
    with _oom_is_a_skip(t.device):
        _, leaves = case_cache.inputs_for(t)
        made = case_cache.made_for(t)
        try:
            fn = _mode_callable(made, t.mode)
        except _NotApplicable as exc:
            pytest.skip(f"n/a: {exc}")
        try:
            _time(benchmark, t, fn, leaves, request.config)
        finally:
            del fn
            _clear_grads(leaves)
    _free(t.device)
