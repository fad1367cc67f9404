"""The benchmark scripts stay runnable: run_all in smoke mode, the parity report, the README table.

Subprocesses inherit this process's environment, so without a GPU the conftest's
TRITON_INTERPRET=1 applies and the fastnote provider runs the Triton kernels."""
import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest

from fastnote import cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
COLUMNS = ["op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
           "config", "gpu", "torch", "triton", "fastnote_commit", "timestamp"]
# op CSV -> (providers that run on the CPU in smoke mode (torch.compile is skipped there), modes)
ALL_MODES = {"fwd", "bwd", "both"}
SPECTRAL = {"torch hook", "fastnote hook", "torch parametrization", "fastnote parametrization"}
EXPECTED = {
    "hswish_se": ({"eager", "fastnote"}, ALL_MODES),
    "spectral_norm": (SPECTRAL, {"fwd"}),
    "sagan_discriminator": (SPECTRAL, {"both"}),
    "gram": ({"eager", "fastnote"}, {"fwd"}),
    "style_loss": ({"eager", "fastnote"}, ALL_MODES),
    "tv_loss": ({"eager", "fastnote"}, ALL_MODES),
    "patch_nce": ({"eager", "fastnote"}, ALL_MODES),
    "clip_loss": ({"eager", "fastnote"}, ALL_MODES),
    "siglip_loss": ({"eager", "fastnote"}, ALL_MODES),
    "models": ({"eager", "fastnote"}, {"step"}),
}
PARITY_OPS = [c.name for c in cases.all_cases()]   # every case of fastnote.cases


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run(os.path.join(BENCH, "run_all.py"), "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    folders = list(out.glob("*-smoke"))  # cpu-smoke, or <gpu>-smoke on a GPU machine
    assert len(folders) == 1, folders
    return folders[0], proc.stdout


def test_run_all_smoke_writes_every_csv(smoke_results):
    folder, stdout = smoke_results
    assert "0 failed" in stdout
    for op, (providers, modes) in EXPECTED.items():
        path = folder / f"{op}.csv"
        assert path.exists(), f"missing {path}"
        with open(path, newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == COLUMNS
            rows = [dict(zip(COLUMNS, r)) for r in reader]
        assert rows, f"{op}: no rows"
        assert providers <= {r["provider"] for r in rows}, f"{op}: providers {({r['provider'] for r in rows})}"
        assert {r["op"] for r in rows} == {op}
        for r in rows:
            json.loads(r["config"])
            assert r["metric"] in ("time", "memory", "throughput")
        times = [r for r in rows if r["provider"].startswith("fastnote") and r["metric"] == "time"]
        assert times and all(math.isfinite(float(r["p50"])) for r in times), f"{op}: fastnote times"
        assert {r["mode"] for r in times} == modes
        assert list(folder.glob(f"{op}*.png")), f"{op}: no plot"


def test_run_all_smoke_every_csv_has_the_header(smoke_results):
    folder, _ = smoke_results
    paths = list(folder.glob("*.csv"))
    assert len(paths) >= len(EXPECTED)
    for path in paths:
        with open(path, newline="") as f:
            assert next(csv.reader(f)) == COLUMNS, path


def test_parity_report_passes(tmp_path):
    out = tmp_path / "parity.csv"
    proc = _run(os.path.join(BENCH, "parity_report.py"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    for op in PARITY_OPS:
        assert any(line.split()[:1] == [op] and line.rstrip().endswith("PASS") for line in lines), op
    assert "FAIL" not in proc.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} >= set(PARITY_OPS)


# The op of the fake results: one a benchmark script declares (for --plots) with a bandwidth target
# in make_table.TARGETS, in the case that target pins (Swin-T stage 1, bf16).
FAKE_OP = "window_attention"
FAKE_CASE = {"dtype": "bf16", "model": "swin_t_224", "B": 128, "H": 56, "W": 56, "C": 96, "heads": 3, "window": 7,
             "shift": 3}
FAKE_CASE_LABEL = "model=swin_t_224 B=128 H=56 W=56 C=96 heads=3 window=7 shift=3"   # make_table's shape cell


def _write_results(folder, rows):
    folder.mkdir(parents=True)
    base = {"op": FAKE_OP, "x_name": "stage", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
            "triton": "3.6.0", "fastnote_commit": "abc1234", "timestamp": "2026-01-01T00:00:00+00:00"}
    with open(folder / f"{FAKE_OP}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for provider, mode, metric, unit, value in rows:
            w.writerow(dict(base, provider=provider, mode=mode, metric=metric, unit=unit, x_value=1,
                            p50=value, p20=value, p80=value, config=json.dumps(FAKE_CASE)))


def test_make_table_writes_between_markers(tmp_path):
    results = tmp_path / "results"
    _write_results(results / "nvidia-h100-80gb-hbm3", [
        ("eager", "fwd", "time", "ms", 0.2), ("torch.compile", "fwd", "time", "ms", 0.15),
        ("fastnote", "fwd", "time", "ms", 0.1), ("eager", "fwd", "memory", "MB", 100.0),
        ("fastnote", "fwd", "memory", "MB", 50.0), ("fastnote", "fwd", "throughput", "GB/s", 2000.0),
    ])
    _write_results(results / "cpu-smoke", [("smokeprovider", "fwd", "time", "ms", 9.0)])
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- perf-table:start -->\nold\n<!-- perf-table:end -->\n\ntail\n")
    proc = _run(os.path.join(BENCH, "make_table.py"), "--results", str(results), "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith("<!-- perf-table:end -->\n\ntail\n")
    table = text.split("<!-- perf-table:start -->")[1].split("<!-- perf-table:end -->")[0]
    assert "old" not in table and "smokeprovider" not in table
    assert "NVIDIA H100 80GB HBM3" in table and f"**{FAKE_OP}**" in table
    row = next(line for line in table.splitlines() if line.startswith(f"| {FAKE_CASE_LABEL} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == [FAKE_CASE_LABEL, "bf16", "fwd"]
    assert "2.00x" in cells and "1.50x" in cells and "0.50x" in cells  # speedups, memory ratio


def test_make_table_models(tmp_path):
    """The whole-model table: the four providers' step times, fastnote's speed-ups, peak memory."""
    folder = tmp_path / "results" / "nvidia-h200"
    folder.mkdir(parents=True)
    base = {"op": "models", "mode": "step", "x_name": "batch", "x_value": 64, "gpu": "NVIDIA H200",
            "torch": "2.11.0", "triton": "3.6.0", "fastnote_commit": "abc1234", "timestamp": "2026-01-01"}
    cfg = json.dumps({"model": "SAGAN 64x64", "dtype": "fp32", "example": "sagan", "full": True})
    values = {"eager": (40.0, 900.0), "fastnote": (20.0, 300.0), "torch.compile": (30.0, 600.0),
              "torch.compile(fastnote)": (15.0, 250.0)}
    with open(folder / "models.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for provider, (ms, mb) in values.items():
            for metric, unit, v in (("time", "ms", ms), ("memory", "MB", mb)):
                w.writerow(dict(base, provider=provider, metric=metric, unit=unit, p50=v, p20=v, p80=v, config=cfg))
    proc = _run(os.path.join(BENCH, "make_table.py"), "--results", str(tmp_path / "results"), "--stdout")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| SAGAN 64x64"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:7] == ["SAGAN 64x64", "fp32", "64", "40.0", "20.0", "30.0", "15.0"]
    assert cells[7:10] == ["2.00x", "1.50x", "2.00x"]   # vs eager, vs torch.compile, compiled vs compiled
    assert cells[10:] == ["900", "300", "600", "250"]


def test_results_name_the_code_measured(monkeypatch):
    """fastnote_commit: run_gpu.sh's pinned FASTNOTE_COMMIT, else the short hash with -dirty when
    tracked files differ from it (a run of uncommitted changes once carried the commit's name)."""
    sys.path.insert(0, BENCH)
    try:
        import harness
    finally:
        sys.path.remove(BENCH)
    monkeypatch.setenv("FASTNOTE_COMMIT", "abc1234-dirty")
    assert harness.git_commit() == "abc1234-dirty"
    monkeypatch.delenv("FASTNOTE_COMMIT")
    described = harness.git_commit()
    if described == "unknown":
        pytest.skip("not a git checkout: nothing to describe")
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    assert described == head.stdout.strip() + ("-dirty" if dirty else "")


def test_quick_cases():
    sys.path.insert(0, BENCH)
    try:
        import harness
    finally:
        sys.path.remove(BENCH)
    cases = [harness.Case("N", n, {"dtype": d}) for n, d in ((1, "bf16"), (2, "bf16"), (3, "fp32"), (4, "fp32"))]

    def bench(quick):
        return harness.Benchmark(op="toy", make_inputs=None, providers=[], cases=cases, smoke_cases=[],
                                 quick_cases=quick)

    assert [c.x_value for c in harness.quick_cases(bench(None), cases)] == [1, 3]   # first per dtype
    assert [c.x_value for c in harness.quick_cases(bench([cases[1], cases[3]]), cases)] == [2, 4]


def test_make_table_without_results_or_markers(tmp_path):
    results = tmp_path / "results"
    _write_results(results / "cpu-smoke", [("fastnote", "fwd", "time", "ms", 1.0)])
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    proc = _run(os.path.join(BENCH, "make_table.py"), "--results", str(results), "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr
    assert "No GPU results are committed yet" in proc.stdout
    assert readme.read_text() == "# no markers here\n"


def _make_table_module():
    sys.path.insert(0, BENCH)
    try:
        import make_table
    finally:
        sys.path.remove(BENCH)
    return make_table


def _write_rows(path, op, rows, gpu="NVIDIA H200"):
    """rows: (provider, mode, metric, unit, value, config) -> a result CSV of ``op``."""
    base = {"op": op, "x_name": "N", "x_value": 1024, "gpu": gpu, "torch": "2.11.0", "triton": "3.6.0",
            "fastnote_commit": "abc1234", "timestamp": "2026-01-01T00:00:00+00:00"}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for provider, mode, metric, unit, value, cfg in rows:
            w.writerow(dict(base, provider=provider, mode=mode, metric=metric, unit=unit, p50=value, p20=value,
                            p80=value, config=json.dumps(cfg)))


def _targets_rows(text):
    """{(target, dtype): (worst case, measured, needed, status)} from the targets table."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("target", "---"):
            out[(cells[0], cells[1])] = tuple(cells[2:])
    return out


def test_make_table_targets_met_not_met_not_measured(tmp_path):
    """The targets computation on a tiny CSV: a speed-up target met in one dtype and not in the
    other, a bandwidth target from the % row and, where that row is missing, from GB/s and the
    copy bandwidth, targets whose provider or op the run lacks, and the cases slower than eager."""
    make_table = _make_table_module()
    Target = make_table.Target
    folder = tmp_path / "results" / "nvidia-h200-quick"
    folder.mkdir(parents=True)
    bf16, fp32, oom = {"dtype": "bf16", "shape": [4, 256]}, {"dtype": "fp32", "shape": [4, 256]}, \
        {"dtype": "fp32", "shape": [8, 256]}
    _write_rows(folder / "toy.csv", "toy", [
        ("eager", "fwd", "time", "ms", 3.0, bf16), ("sdpa", "fwd", "time", "ms", 1.5, bf16),
        ("fastnote", "fwd", "time", "ms", 1.0, bf16),                          # 3x eager, 1.5x sdpa
        ("fastnote", "fwd", "throughput", "% of copy BW", 90.0, bf16),
        ("eager", "fwd", "time", "ms", 1.0, fp32), ("fastnote", "fwd", "time", "ms", 2.0, fp32),  # 0.5x
        ("fastnote", "fwd", "throughput", "GB/s", 3000.0, fp32),               # no % row: 3000 / 4000
        ("eager", "both", "time", "ms", 4.0, bf16), ("fastnote", "both", "time", "ms", 5.0, bf16),  # 0.8x
        ("eager", "fwd", "time", "ms", "nan", dict(oom, note="OOM")),           # eager failed: no comparison
        ("fastnote", "fwd", "time", "ms", 1.0, oom),
    ])
    _write_rows(folder / "device.csv", "copy_bandwidth",
                [("torch.copy_", "copy", "throughput", "GB/s", 4000.0, {"dtype": "uint8"})])
    (folder / "spectral_norm_launches.csv").write_text("provider,kernels_per_layer\nfastnote hook,3\n")
    targets = [
        Target("toy forward vs eager", "toy", 2.0, vs="eager", modes=("fwd",)),
        Target("toy forward vs sdpa", "toy", 2.0, vs="sdpa", modes=("fwd",), where={"dtype": "bf16"}),
        Target("toy bandwidth", "toy", 85.0, unit="% of copy BW", where={"shape": "[[]4, 256[]]"}),
        Target("toy vs torch.compile", "toy", 1.2, vs="torch.compile"),
        Target("absent op", "absent", 1.3, vs="eager"),
        Target("no op slower than eager", "*", 1.0, vs="eager", per=(), itemize=True),
    ]
    text = make_table.render_targets(make_table.load(str(tmp_path / "results")), targets)
    got = _targets_rows(text)
    assert got[("toy forward vs eager", "bf16")] == ("4x256, fwd", "3.00x", ">= 2.00x eager", "met")
    # the 8x256 case, where eager ran out of memory, is not compared: one case, no "(worst of 2)"
    assert got[("toy forward vs eager", "fp32")] == ("4x256, fwd", "0.50x", ">= 2.00x eager", "**not met**")
    assert got[("toy forward vs sdpa", "bf16")][1:] == ("1.50x", ">= 2.00x sdpa", "**not met**")
    assert got[("toy bandwidth", "bf16")][1:] == ("90.0%", ">= 85% of copy BW", "met")
    assert got[("toy bandwidth", "fp32")][1:] == ("75.0%", ">= 85% of copy BW", "**not met**")
    assert got[("toy vs torch.compile", "-")] == ("(no torch.compile rows)", "n/a", ">= 1.20x torch.compile",
                                                   "not measured")
    assert got[("absent op", "-")][0] == "(no absent rows in this run)"
    assert got[("absent op", "-")][3] == "not measured"
    assert got[("no op slower than eager", "bf16, fp32")][1:] == ("0.50x", ">= 1.00x eager", "**not met**")
    assert "Met: 2 of the 6 checks measured; 2 not measured." in text
    assert "**no op slower than eager**: 2 of 3 cases miss it:" in text
    listed = [line for line in text.splitlines() if line.startswith("| toy |")]
    assert listed == ["| toy | 4x256 | bf16 | both | 4.000 | 5.000 | 0.80x |",
                      "| toy | 4x256 | fp32 | fwd | 1.000 | 2.000 | 0.50x |"]
    assert "NVIDIA H200" in text and "quick run" in text and "no torch.compile providers" in text
    # every declared target evaluates on these rows (not measured, mostly) without raising
    assert len(_targets_rows(make_table.render_targets(make_table.load(str(tmp_path / "results"))))) >= len(
        make_table.TARGETS)


def test_make_table_plots_and_targets_in_the_readme(tmp_path):
    """``--plots`` redraws a folder's PNGs from its CSVs (the benchmark scripts' declarations, no
    GPU), and the targets go between their own markers with the declared TARGETS."""
    results = tmp_path / "results"
    _write_results(results / "nvidia-h100-80gb-hbm3", [
        ("eager", "fwd", "time", "ms", 0.2), ("fastnote", "fwd", "time", "ms", 0.1),
        ("eager", "fwd", "memory", "MB", 100.0), ("fastnote", "fwd", "memory", "MB", 50.0),
        ("fastnote", "fwd", "throughput", "% of copy BW", 88.0),
    ])
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n<!-- perf-table:start -->\nSTALE\n<!-- perf-table:end -->\n\n### Targets\n\n"
                      "<!-- perf-targets:start -->\nSTALE targets\n<!-- perf-targets:end -->\n\ntail\n")
    proc = _run(os.path.join(BENCH, "make_table.py"), "--results", str(results), "--readme", str(readme),
                "--plots", "nvidia-h100-80gb-hbm3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (results / "nvidia-h100-80gb-hbm3" / f"{FAKE_OP}.png").exists()
    text = readme.read_text()
    assert text.endswith("<!-- perf-targets:end -->\n\ntail\n") and "STALE" not in text
    targets = text.split("<!-- perf-targets:start -->")[1].split("<!-- perf-targets:end -->")[0]
    got = _targets_rows(targets)
    assert got[("Window attention core, Swin-T stage 1: bandwidth on minimum bytes", "bf16")][1:] == (
        "88.0%", ">= 75% of copy BW", "met")
    assert got[("No op slower than eager (every shape, dtype and mode)", "bf16")][1:] == (
        "2.00x", ">= 1.00x eager", "met")
    assert got[("SE (hswish_se): vs eager", "-")] == ("(no hswish_se rows in this run)", "n/a", ">= 1.80x eager",
                                                      "not measured")


def _stand_in_gpu_timers(harness, monkeypatch):
    """do_bench and the memory probe replaced (2 ms, 12.5 MB), where the measurement looks them up."""
    monkeypatch.setattr(harness.timing, "_time_cuda", lambda fn, leaves, rep_ms=100: (fn(), [2.0, 1.0, 4.0])[1])
    monkeypatch.setattr(harness.timing, "_peak_memory_mb", lambda fn, leaves, device: (fn(), 12.5)[1])


def test_harness_gpu_rows_with_a_stand_in_timer(tmp_path, monkeypatch):
    """The rows a GPU run writes (memory, GB/s, % of copy and nominal bandwidth, NaN on OOM),
    exercised on the CPU with do_bench and the memory probe replaced."""
    import torch

    sys.path.insert(0, BENCH)
    try:
        import harness
    finally:
        sys.path.remove(BENCH)
    _stand_in_gpu_timers(harness, monkeypatch)

    def oom(inputs, case):
        def fn():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return fn

    bench = harness.Benchmark(
        op="toy", make_inputs=lambda case, device: {"x": torch.randn(4, 8, requires_grad=True)},
        providers=[harness.Provider("eager", lambda inputs, case: lambda: inputs["x"] * 2),
                   harness.Provider("big", oom)],
        cases=[harness.Case("N", 32, {"dtype": "fp32"})], smoke_cases=[],
        bytes_moved=lambda case, mode: 2e9,  # 2 GB in 2 ms -> 1000 GB/s
    )
    run = harness._Run(device=torch.device("cpu"), smoke=False, cpu_timing=False, slug="fake-h100",
                       gpu="NVIDIA H100 80GB HBM3", warmup=0, repeats=1, peak_gbps=None, peak_tflops=None,
                       copy_gbps=2000.0, meta=dict(gpu="NVIDIA H100 80GB HBM3", torch="t", triton="t",
                                                   fastnote_commit="c", timestamp="now"))
    rows, failures = harness.run_benchmark(bench, run, bench.cases, list(harness.MODES), bench.providers, False)
    assert failures == 0  # OOM is recorded, not counted as a failure
    eager = {(r["mode"], r["metric"], r["unit"]): r for r in rows if r["provider"] == "eager"}
    assert eager[("fwd", "time", "ms")]["p50"] == 2.0
    assert eager[("bwd", "memory", "MB")]["p50"] == 12.5
    gbps = eager[("both", "throughput", "GB/s")]
    assert (gbps["p50"], gbps["p20"], gbps["p80"]) == pytest.approx((1000.0, 500.0, 2000.0))
    assert eager[("fwd", "throughput", "% of copy BW")]["p50"] == pytest.approx(50.0)
    assert eager[("fwd", "throughput", "% of peak BW")]["p50"] == pytest.approx(100 * 1000 / 3350)
    # speed of light: 2 GB over the measured 2000 GB/s is 1 ms, so a 2 ms call is at 50% of it
    assert eager[("fwd", "throughput", "speed-of-light ms")]["p50"] == pytest.approx(1.0)
    assert eager[("fwd", "throughput", "% of speed of light")]["p50"] == pytest.approx(50.0)
    big = [r for r in rows if r["provider"] == "big"]
    assert big and all(math.isnan(r["p50"]) for r in big)
    assert all(json.loads(r["config"])["note"] == "OOM" for r in big)
    path = tmp_path / "toy.csv"
    harness.write_csv(str(path), rows)
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == COLUMNS
    assert harness.plot(bench, rows, str(tmp_path))


def test_interleaved_cpu_timing_survives_a_failing_provider(tmp_path):
    """Real CPU timings take turns between providers; one that raises mid-run gets NaN rows and a
    note, the others their full sample count, and the script exits 1 (it does not wait forever
    for the failed provider's samples)."""
    sys.path.insert(0, BENCH)
    try:
        import harness
    finally:
        sys.path.remove(BENCH)
    calls = {"good": 0, "bad": 0}

    def provider(name, fail_after):
        def setup(inputs, case):
            def fn():
                calls[name] += 1
                if calls[name] > fail_after:
                    raise RuntimeError("fails on purpose")
            return fn
        return harness.Provider(name, setup)

    bench = harness.Benchmark(
        op="interleave_check", make_inputs=lambda case, device: {},
        providers=[provider("good", 10 ** 9), provider("bad", 7)],
        cases=[harness.Case("x", 1, {"dtype": "fp32"})], smoke_cases=[], modes=("fwd",),
        device="cpu", cpu_real=True, cpu_warmup=2, cpu_repeats=20)
    with pytest.raises(SystemExit) as exited:
        harness.main([bench], ["--out", str(tmp_path), "--no-plot"])
    assert exited.value.code == 1
    assert calls["good"] == 2 + 20 and calls["bad"] == 8
    (path,) = tmp_path.glob("*/interleave_check.csv")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "time"]
    by = {r["provider"]: r for r in rows}
    assert math.isfinite(float(by["good"]["p50"])) and math.isnan(float(by["bad"]["p50"]))
    assert "fails on purpose" in json.loads(by["bad"]["config"])["note"]


def test_harness_tf32_peak_under_the_new_fp32_precision_api(monkeypatch):
    """Once torch's ``fp32_precision`` is set, its legacy TF32 getters raise; the % of peak
    TFLOP/s row of an fp32 case reads the setting without raising and takes the TF32 peak."""
    import torch

    sys.path.insert(0, BENCH)
    try:
        import harness
    finally:
        sys.path.remove(BENCH)
    _stand_in_gpu_timers(harness, monkeypatch)
    bench = harness.Benchmark(
        op="toy_matmul", make_inputs=lambda case, device: {"x": torch.randn(4, 8, requires_grad=True)},
        providers=[harness.Provider("eager", lambda inputs, case: lambda: inputs["x"] * 2)],
        cases=[harness.Case("N", 32, {"dtype": "fp32"})], smoke_cases=[], modes=("fwd",),
        flops=lambda case, mode: 2e9,  # 2 GFLOP in 2 ms -> 1 TFLOP/s
    )
    run = harness._Run(device=torch.device("cpu"), smoke=False, cpu_timing=False, slug="fake-h100",
                       gpu="NVIDIA H100 80GB HBM3", warmup=0, repeats=1, peak_gbps=None, peak_tflops=None,
                       copy_gbps=None, meta=dict(gpu="NVIDIA H100 80GB HBM3", torch="t", triton="t",
                                                 fastnote_commit="c", timestamp="now"))
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        rows, failures = harness.run_benchmark(bench, run, bench.cases, ["fwd"], bench.providers, False)
    finally:
        matmul.fp32_precision = previous
    assert failures == 0
    (peak,) = [r for r in rows if r["unit"] == "% of peak TFLOP/s"]
    assert peak["p50"] == pytest.approx(100 * 1.0 / 494)
    # 2 GFLOP at 494 TFLOP/s (no byte count here): the bound is the arithmetic's
    (sol,) = [r for r in rows if r["unit"] == "speed-of-light ms"]
    assert sol["p50"] == pytest.approx(2e9 / 494e12 * 1e3)
    # exact fp32 asked for: the better of the FMA units (67) and 3xTF32 (494 / 3)
    rows, _ = harness.run_benchmark(bench, run, bench.cases, ["fwd"], bench.providers, False)
    (peak,) = [r for r in rows if r["unit"] == "% of peak TFLOP/s"]
    assert peak["p50"] == pytest.approx(100 * 1.0 / (494 / 3))


def test_merge_keeps_the_rows_a_second_run_does_not_measure(tmp_path):
    """--merge: a second run with other providers adds its rows to the op's CSV; without it the
    second run rewrites the file; the same provider measured again replaces its own rows."""
    script = os.path.join(BENCH, "squeeze_excitation.py")

    def providers_in_csv(*args):
        proc = _run(script, "--smoke", "--out", str(tmp_path), "--no-plot", *args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with open(tmp_path / "cpu-smoke" / "hswish_se.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        return sorted({r["provider"] for r in rows}), len(rows)

    assert providers_in_csv("--providers", "eager")[0] == ["eager"]
    merged, n_merged = providers_in_csv("--providers", "fastnote", "--merge")
    assert merged == ["eager", "fastnote"]
    assert providers_in_csv("--providers", "fastnote", "--merge") == (merged, n_merged)  # replaced, not doubled
    assert providers_in_csv("--providers", "fastnote")[0] == ["fastnote"]


def test_models_benchmark_step_rows_with_a_stand_in_timer(monkeypatch):
    """benchmarks/models.py's providers through the GPU measurement path (do_bench and the memory
    probe replaced, each still calling the step): one CLIP smoke case, eager and fastnote, a time
    and a memory row each for the ``step`` mode, and the CSV callback after the case."""
    import torch

    sys.path.insert(0, BENCH)
    try:
        import harness
        import models
    finally:
        sys.path.remove(BENCH)
    _stand_in_gpu_timers(harness, monkeypatch)
    bench = models.BENCHMARKS[0]
    case = next(c for c in bench.smoke_cases if c.config["example"] == "clip_step")
    run = harness._Run(device=torch.device("cpu"), smoke=False, cpu_timing=False, slug="fake-h200", gpu="NVIDIA H200",
                       warmup=0, repeats=1, peak_gbps=None, peak_tflops=None, copy_gbps=None,
                       meta=dict(gpu="NVIDIA H200", torch="t", triton="t", fastnote_commit="c", timestamp="now"))
    providers = [p for p in bench.providers if not p.compile]
    seen = []
    rows, failures = harness.run_benchmark(bench, run, [case], list(bench.modes), providers, False,
                                           on_case=lambda r: seen.append(len(r)))
    assert failures == 0 and seen == [len(rows)]
    got = {(r["provider"], r["mode"], r["metric"]): r["p50"] for r in rows}
    for p in ("eager", "fastnote"):
        assert got[(p, "step", "time")] == 2.0 and got[(p, "step", "memory")] == 12.5


def test_sagan_square_tiles_provider_times_its_backward_on_them(device, launches):
    # benchmarks/sagan_attention.py's "fastnote square tiles" provider (harness.modes.under_setting):
    # its bwd and both callables run the backward on the square tiles (64 positions a program
    # where the default owns 128), and the module's default is back in place afterwards.
    import importlib.util

    import torch

    from fastnote.triton_kernels import sagan_attention as kernels

    if BENCH not in sys.path:
        sys.path.append(BENCH)
    path = os.path.join(BENCH, "sagan_attention.py")
    spec = importlib.util.spec_from_file_location("fastnote_benchmarks_sagan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    provider = next(p for p in module.BENCHMARKS[0].providers if p.name == "fastnote square tiles")
    B, N = 1, 200

    def leaf(*shape):
        return torch.randn(*shape, device=device).to(torch.bfloat16).requires_grad_()

    inputs = {"q": leaf(B, 2, N), "k": leaf(B, 2, N), "v": leaf(B, 16, N), "x": leaf(B, 16, N),
              "gamma": torch.full((1,), 0.5, device=device, requires_grad=True)}
    callables = provider.setup(inputs, None)
    assert sorted(callables) == ["both", "bwd"]
    for mode, run in callables.items():
        launches.clear()
        run()
        grids = {kernel: [g[0] for m, k, g in launches if m.endswith("sagan_attention") and k == kernel]
                 for kernel in ("_dkdv_kernel", "_dq_kernel")}
        assert grids == {"_dkdv_kernel": [B * -(-N // 64)], "_dq_kernel": [B * -(-N // 64)]}, (mode, grids)
    assert kernels.BACKWARD_TILES == "wide"


def test_gram_no_split_provider_times_one_launch(device, launches):
    # benchmarks/gram.py's "fastnote no split" provider: where the default forward splits K (two
    # programs and a reduce launch for one 8-channel image of 256 positions in fp32), its callables
    # launch one forward program over all of K and no reduce kernel; where the default does not
    # split (the smoke cases) it gives nothing; the module's default is back afterwards.
    import dataclasses
    import importlib.util

    import torch

    from fastnote.triton_kernels import gram as kernels

    if BENCH not in sys.path:
        sys.path.append(BENCH)
    spec = importlib.util.spec_from_file_location("fastnote_benchmarks_gram", os.path.join(BENCH, "gram.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    smoke = module.BENCHMARKS[0].smoke_cases[0]
    case = dataclasses.replace(smoke, config={**smoke.config, "dtype": "fp32", "shape": [1, 8, 16, 16]})
    inputs = module.make_features(case, device)

    def forward_grids():
        return [(k, tuple(g)) for m, k, g in launches if m.endswith("gram") and k != "_backward_kernel"]

    for bench, modes in ((module.BENCHMARKS[0], ["fwd"]), (module.BENCHMARKS[1], ["both", "fwd"])):
        providers = {p.name: p for p in bench.providers}
        assert providers["fastnote no split"].setup(module.make_features(smoke, device), smoke) == {}
        launches.clear()
        default = providers["fastnote"].setup(inputs, case)()
        grids = forward_grids()
        assert grids[0] == ("_forward_kernel", (1, 2)) and [k for k, _ in grids] == [
            "_forward_kernel", "_reduce_kernel"], (bench.op, grids)
        no_split = providers["fastnote no split"].setup(inputs, case)
        assert sorted(no_split) == modes, bench.op
        launches.clear()
        out = no_split["fwd"]()
        assert forward_grids() == [("_forward_kernel", (1, 1))], bench.op
        torch.testing.assert_close(out, default, rtol=1e-5, atol=1e-6)
        assert kernels.SPLIT_K is True


def test_window_one_stage_provider_builds_the_kernels_unpipelined(device, monkeypatch):
    # benchmarks/window_attention.py's "fastnote one stage" provider: in bf16 its callables launch
    # the V1 kernels with one stage (PIPELINED off), where the default "fastnote" provider launches
    # them with two; in fp32 it gives nothing (one stage there either way), and the module's
    # default is back in place afterwards.
    import dataclasses
    import importlib.util

    from fastnote.triton_kernels import window_attention as kernels

    if BENCH not in sys.path:
        sys.path.append(BENCH)
    spec = importlib.util.spec_from_file_location("fastnote_benchmarks_window",
                                                  os.path.join(BENCH, "window_attention.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    launched = []
    real = kernels._stages
    monkeypatch.setattr(kernels, "_stages", lambda *a: launched.append(real(*a)) or launched[-1])
    smoke = module.SMOKE_CASES[1]   # stage 2 of the smoke model: a 7x7 map, one window per image
    bf16 = dataclasses.replace(smoke, config={**smoke.config, "dtype": "bf16"})
    for bench, make_inputs in ((module.BENCHMARKS[0], module.core_inputs), (module.BENCHMARKS[1], module.block_inputs)):
        providers = {p.name: p for p in bench.providers}
        inputs = make_inputs(bf16, device)
        assert providers["fastnote one stage"].setup(inputs, smoke) == {}   # fp32: n/a
        launched.clear()
        out = providers["fastnote"].setup(inputs, bf16)()   # forward and backward, as the provider runs them
        out.float().sum().backward()
        assert launched == [2, 2], bench.op
        one_stage = providers["fastnote one stage"].setup(inputs, bf16)
        assert sorted(one_stage) == ["both", "bwd", "fwd"]
        for mode, expected in (("fwd", [1]), ("bwd", [1]), ("both", [1, 1])):
            launched.clear()
            one_stage[mode]()
            assert launched == expected, (bench.op, mode)
        assert kernels.PIPELINED is True


def test_precompile_builds_the_benchmarks_kernels_into_tritons_cache(tmp_path):
    # benchmarks/precompile.py (run_gpu.sh quick's step before the benchmarks): the gram family's
    # smoke cases record their launches (gram, style loss and TV loss, forward and backward,
    # through Triton's own binder) and build each distinct variant for sm_90 into the cache
    # directory it is given; a second run finds every one there and adds nothing.
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    command = [sys.executable, os.path.join(BENCH, "precompile.py"), "--smoke", "--only", "gram", "--jobs", "2",
               "--arch", "90"]

    def run():
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        recorded = re.search(r"recorded (\d+) distinct variants \(smoke cases\)", proc.stdout)
        built = re.search(r"built (\d+) of (\d+)", proc.stdout)
        assert recorded and built, proc.stdout
        return int(recorded.group(1)), int(built.group(1)), int(built.group(2)), sorted(os.listdir(tmp_path / "cache"))

    variants, built, of, entries = run()
    assert variants >= 12 and built == of == variants, (variants, built, of)
    assert len(entries) >= variants   # one cache entry per built kernel (at least)
    assert run() == (variants, variants, variants, entries)
