"""The direct launch path runs exactly the binary, grid, stream and arguments that Triton's own
launch path runs (tests/launch_probe.py, with Triton's driver faked: no GPU needed), and falls back
to Triton's path wherever it is off."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastnote.triton_kernels import utils

HERE = os.path.dirname(os.path.abspath(__file__))


def test_direct_launch_matches_tritons_own_launch():
    if torch.cuda.is_available():
        pytest.skip("the probe fakes Triton's driver; on a GPU every test launches for real, directly")
    pytest.importorskip("triton.backends.nvidia")
    low, high = utils.DIRECT_LAUNCH_TRITON
    if not low <= utils._triton_version() < high:
        pytest.skip(f"Triton {utils._triton_version()} is outside the checked range {low}..{high}: "
                    "launch() takes Triton's own path there")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(HERE, "launch_probe.py"), "--time"], env=env,
                         capture_output=True, text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    summary = next(line for line in lines if "binaries" in line)
    launches, binaries = int(summary.split()[0]), int(summary.split()[2])
    # the sequence's launches pick distinct specialisations (alignment, n == 1, n % 16, dtypes, strides)
    assert launches >= 15 and binaries >= 12, summary
    assert summary.endswith(f"first pass {binaries}, second pass 0"), summary
    assert not any(line.startswith("FAIL") for line in lines), run.stdout


def test_launch_takes_tritons_path_where_direct_is_off(monkeypatch):
    # In this process the kernels are interpreted (or no CUDA device exists): the direct path
    # stays off and every launch is kernel[grid](...), whatever the environment asks.
    assert not utils.direct_launch_supported()
    monkeypatch.setenv("FASTNOTE_DIRECT_LAUNCH", "1")
    try:
        assert utils.set_direct_launch() is False
        assert utils.set_direct_launch(True) is False
        calls = []

        class Kernel:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append((grid, args, kwargs))

        utils.launch(Kernel(), (3, 2), 1, None, BLOCK=4)
        assert calls == [((3, 2), (1, None), {"BLOCK": 4})]
    finally:
        utils.set_direct_launch()


def test_direct_launch_switch_is_read_from_the_environment_once(monkeypatch):
    from triton.runtime import driver

    monkeypatch.setattr(utils, "direct_launch_supported", lambda: True)
    # set_active then reset_active would leave Triton creating a real driver, which fails here
    monkeypatch.setattr(driver, "_active", SimpleNamespace(get_current_device=lambda: 0,
                                                            get_current_stream=lambda device=None: 0))
    try:
        monkeypatch.setenv("FASTNOTE_DIRECT_LAUNCH", "0")
        assert utils.set_direct_launch() is False
        monkeypatch.setenv("FASTNOTE_DIRECT_LAUNCH", "1")
        assert utils._DirectLaunch.on is False          # not re-read until asked
        assert utils.set_direct_launch() is True
        assert utils._DirectLaunch.device() == 0          # binds the driver at first use
        assert utils._DirectLaunch.stream(0) == 0
        assert utils.set_direct_launch(False) is False
    finally:
        monkeypatch.undo()
        utils.set_direct_launch()
    assert utils._DirectLaunch.on is utils.direct_launch_supported()


def _ops():
    benchmarks = os.path.join(os.path.dirname(HERE), "benchmarks")
    if benchmarks not in sys.path:
        sys.path.append(benchmarks)   # after the tests' own folders, as tests/test_overhead.py
    import overhead  # noqa: E402  (benchmarks/overhead.py: every op with its inputs)
    return overhead.OPS_BY_NAME


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:.*deterministic")
@pytest.mark.parametrize("name", sorted(_ops()) if torch.cuda.is_available() else ["every op"])
def test_direct_launch_matches_tritons_launch_bitwise_gpu(name, monkeypatch):
    from triton.runtime.jit import JITFunction

    if not utils.direct_launch_supported():
        pytest.skip(f"Triton {utils._triton_version()}: launch() takes Triton's own path")
    op = _ops()[name]
    inputs = op.make_inputs(torch.device("cuda"), torch.bfloat16, True)
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        out = op.fastnote(inputs)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return [out.detach(), *grads]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert utils.set_direct_launch(True)
        run()                                       # learns each binary through Triton's path
        through_jit = []
        original = JITFunction.run
        monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: through_jit.append(self) or original(self, *a, **k))
        direct = run()
        assert not through_jit, f"{len(through_jit)} launches went through JITFunction.run"
        with utils.tritons_launch_path():
            triton_path = run()
        assert through_jit, "tritons_launch_path() did not route the launches through Triton"
    finally:
        torch.use_deterministic_algorithms(previous)
        utils.set_direct_launch()
    for i, (a, b) in enumerate(zip(direct, triton_path)):
        assert torch.equal(a, b), f"{name}: tensor {i} differs between the direct and Triton's launch"


def test_every_kernel_launch_goes_through_launch():
    # kernel[grid](...) in a kernel file would bypass the direct path (and the probe above);
    # utils.launch itself is the one place that calls it
    import ast

    folder = os.path.join(os.path.dirname(HERE), "triton_kernels")
    found, launches = [], 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py") or name == "utils.py":
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            calls = [node for node in ast.walk(ast.parse(f.read(), name)) if isinstance(node, ast.Call)]
        found += [f"{name}:{call.lineno}" for call in calls if isinstance(call.func, ast.Subscript)]
        launches += sum(getattr(call.func, "id", None) == "launch" for call in calls)
    assert not found, f"subscript launches: {found}"
    assert launches >= 24, launches
