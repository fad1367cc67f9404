"""The GPU plan (benchmarks/run_gpu.sh quick), simulated on the CPU: every step of the plan runs
(interpreter on, smoke sizes, one test per family) and writes the files a GPU run writes, so the
plan is known to work before a GPU is at hand."""
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
STEPS = ["install (simulated: import check)", "parity", "gpu tests", "precompile (benchmark kernels)",
         "models (quick, no compile)", "host overhead", "README tables"]


@pytest.mark.serial
def test_quick_plan_simulated(tmp_path):
    env = dict(os.environ, FASTNOTE_GPU_SIMULATE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_gpu.sh"), "quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary-quick.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["gpu-run-quick.tar.gz", "summary-quick.txt"]
    for name in STEPS:
        assert f"== {name}: exit 0" in summary, name
    sys.path.insert(0, BENCH)
    try:
        from run_all import discover
    finally:
        sys.path.remove(BENCH)
    # the plan's families: every op script but models.py (its own step)
    families = [os.path.basename(p)[:-3] for p in discover(BENCH) if not p.endswith("models.py")]
    assert len(families) >= 6 and "window_attention" in families, families
    for fam in families:
        assert f"== bench {fam} (quick, no compile): exit 0" in summary, fam
    with tarfile.open(tmp_path / "gpu-run-quick.tar.gz") as tar:
        names = set(tar.getnames())
    for want in ("./parity.csv", "./pytest.xml", "./overhead.csv", "./README.md", "./bench-gram.log",
                 "./precompile.log"):
        assert want in names, want
    assert any(n.startswith("./bench/") and n.endswith("/window_attention.csv") for n in names)
    assert any(n.startswith("./bench/") and n.endswith("/models.csv") for n in names)
