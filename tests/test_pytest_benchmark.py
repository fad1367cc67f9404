"""The pytest-benchmark entry to the benchmarks (benchmarks/test_timings.py), run as a user would,
in subprocesses: spectral norm timed on the CPU into a JSON report and a saved run, a comparison
against that run, and the smoke cases of an interpreter-only op as plain tests.

Subprocesses inherit this process's environment, so without a GPU the conftest's
TRITON_INTERPRET=1 applies there too."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("pytest_benchmark")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SPECTRAL = ["torch_hook", "fastnote_hook", "torch_parametrization", "fastnote_parametrization"]
# two of spectral norm's weights, the smallest ones, with --fastnote-cases all
SPECTRAL_CASES = {"fp32-64x48": (64, 48), "fp32-1x8192": (1, 8192)}
SPECTRAL_K = "spectral_norm and (64x48 or 1x8192)"
MIN_ROUNDS = 7


def _pytest(*args, timeout=240):
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "-p", "no:cacheprovider", *args]
    # a run of its own: under pytest-xdist the worker's variables would make pytest-benchmark in
    # the child believe it runs under xdist too, and disable itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST") and k != "PYTEST_CURRENT_TEST"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _output(proc) -> str:
    return proc.stdout[-6000:] + proc.stderr[-3000:]


def _summary(proc) -> str:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("=") and " in " in line]
    assert lines, _output(proc)
    return lines[-1]


def _count(summary: str, outcome: str) -> int:
    found = re.search(rf"(\d+) {outcome}", summary)
    return int(found.group(1)) if found else 0


def _names(cases=SPECTRAL_CASES):
    return {f"test_timing[spectral_norm-{p}-fwd-{label}]" for p in SPECTRAL for label in cases}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """Spectral norm on the CPU, two cases: the JSON report, and the run saved in a storage."""
    tmp = tmp_path_factory.mktemp("pytest-benchmark")
    report, storage = tmp / "report.json", tmp / "storage"
    proc = _pytest("--benchmark-only", "--fastnote-cases", "all", "-k", SPECTRAL_K,
                   f"--benchmark-min-rounds={MIN_ROUNDS}", "--benchmark-max-time=0.02",
                   f"--benchmark-json={report}", f"--benchmark-storage=file://{storage}", "--benchmark-save=base")
    assert proc.returncode == 0, _output(proc)
    return json.loads(report.read_text()), storage


def test_spectral_norm_timed_on_the_cpu(saved_run):
    report, _ = saved_run
    benches = report["benchmarks"]
    assert {b["fullname"].split("::")[-1] for b in benches} == _names()
    assert len(benches) == len(_names())
    for b in benches:
        stats, info = b["stats"], b["extra_info"]
        assert stats["min"] > 0 and stats["median"] >= stats["min"], b["name"]
        assert stats["rounds"] >= MIN_ROUNDS and b["options"]["timer"] == "perf_counter", b["name"]
        label = b["name"].rsplit("-fwd-", 1)[1].rstrip("]")
        h, w = SPECTRAL_CASES[label]
        assert info["op"] == "spectral_norm" and info["mode"] == "fwd" and info["timing"] == "cpu"
        assert info["config"] == {"dtype": "fp32", "shape": [h, w]}
        assert info["bytes_moved"] == 4 * h * w * 4 and info["flops"] is None
        assert info["device"] and info["threads"] >= 1
        assert b["group"] == f"spectral_norm fwd {label}"
    groups = {}
    for b in benches:
        groups.setdefault(b["group"], set()).add(b["extra_info"]["provider"])
    assert set(groups) == {f"spectral_norm fwd {label}" for label in SPECTRAL_CASES}
    assert all(len(providers) == len(SPECTRAL) for providers in groups.values()), groups


def test_compare_against_a_saved_run(saved_run):
    _, storage = saved_run
    saved = list(storage.glob("*/0001_base.json"))
    assert len(saved) == 1, list(storage.rglob("*"))
    proc = _pytest("--benchmark-only", "--fastnote-cases", "all", "-k", SPECTRAL_K, "--benchmark-min-rounds=3",
                   "--benchmark-max-time=0.01", f"--benchmark-storage=file://{storage}", "--benchmark-compare=0001")
    assert proc.returncode == 0, _output(proc)
    rows = [line.split()[0:2] for line in proc.stdout.splitlines() if line.startswith("test_timing[")]
    for name in _names():
        assert [name, "(0001_base)"] in rows and [name, "(NOW)"] in rows, (name, _output(proc))


def test_default_cases_are_the_quick_ones():
    proc = _pytest("--collect-only", "-q", "-k", "spectral_norm")
    assert proc.returncode == 0, _output(proc)
    collected = {line.split("::")[-1] for line in proc.stdout.splitlines() if "::test_timing[" in line}
    assert collected == _names({"fp32-64x48": None})  # the first (and only) fp32 case


def _tv_loss_cases(monkeypatch):
    """tv_loss's Benchmark (benchmarks/gram.py) and the cases --benchmark-disable runs: the smoke
    cases without a GPU (the interpreter), the quick ones on a GPU."""
    monkeypatch.syspath_prepend(BENCH)
    import torch

    import harness

    spec = importlib.util.spec_from_file_location("gram_declarations", os.path.join(BENCH, "gram.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bench = next(b for b in module.BENCHMARKS if b.op == "tv_loss")
    return bench, bench.smoke_cases if not torch.cuda.is_available() else harness.quick_cases(bench, bench.cases)


def test_benchmarks_disabled_run_each_case_once_as_a_plain_test(monkeypatch):
    bench, cases = _tv_loss_cases(monkeypatch)
    expected = len(cases) * sum(not p.compile for p in bench.providers) * len(bench.modes)
    proc = _pytest("--benchmark-disable", "-k", "tv_loss", "-m", "not compile", "-v")
    assert proc.returncode == 0, _output(proc)
    summary = _summary(proc)
    assert _count(summary, "passed") == expected and expected > 0, summary
    assert _count(summary, "skipped") == 0 and _count(summary, "failed") == 0, summary
    shape = "x".join(map(str, cases[0].config["shape"]))
    assert f"tv_loss-fastnote-bwd-{cases[0].config['dtype']}-{shape}] PASSED" in proc.stdout


def test_interpreter_benchmarks_skip_while_benchmarking():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only without a GPU, where the op benchmarks run under the Triton interpreter")
    proc = _pytest("--benchmark-only", "-k", "tv_loss", "-m", "not compile", "-rs")
    assert proc.returncode == 0, _output(proc)
    summary = _summary(proc)
    assert _count(summary, "skipped") > 0 and _count(summary, "passed") == 0, summary
    assert "the Triton interpreter, whose timings measure nothing" in proc.stdout


def test_gpu_clock_adds_up_short_intervals(monkeypatch):
    """The clock's arithmetic, with stand-in events that keep float32 milliseconds as CUDA's do:
    an interval of 3 us an hour after the reference still reads as 3 us."""
    import numpy as np
    import torch

    monkeypatch.syspath_prepend(BENCH)
    from harness import clock

    now = [0.0]

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = now[0]

        def synchronize(self):
            assert self.at is not None

        def elapsed_time(self, end):
            return float(np.float32((end.at - self.at) * 1e3))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(clock, "_READINGS", {})
    readings = []
    for at in (5.0, 3605.0, 3605.000003, 3605.5):
        now[0] = at
        readings.append(clock.gpu_clock())
    assert readings[0] == 0.0
    assert readings[1] == pytest.approx(3600.0, abs=1e-6)
    assert readings[2] - readings[1] == pytest.approx(3e-6, abs=1e-9)
    assert readings[3] - readings[2] == pytest.approx(0.499997, abs=1e-7)  # float32 ms near 500
