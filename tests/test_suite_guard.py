"""The suite's own machinery (tests/conftest.py and the pytest configuration): the kernels-must-run
guard under CI, alone and under pytest-xdist; TF32 off for fp32 comparisons; the environment of
spawned workers; every marker declared.

The guard's runs are small pytest sessions in a subprocess (``pytester``) whose conftest is this
suite's: a test file named after a kernel file (test_gram.py for triton_kernels/gram.py) makes the
guard expect that kernel's launches.
"""
import ast
import os

import pytest
import torch

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# The inner session's conftest: this suite's conftest.py, loaded by path.
INNER_CONFTEST = f'''
import importlib.util

_spec = importlib.util.spec_from_file_location("fastnote_suite_conftest", {os.path.join(TESTS, "conftest.py")!r})
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
globals().update({{k: v for k, v in vars(_suite).items() if not k.startswith("__") and k != "pytest_plugins"}})
'''
INNER_INI = """[pytest]
markers =
    gpu: x
    no_kernel: x
addopts = --strict-markers -p no:cacheprovider
"""


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("TRUE", True), ("True", True), ("yes", True),
                                      ("YES", True), (" true ", True), ("", False), ("0", False),
                                      ("false", False), ("no", False)])
def test_ci_values(value, on, monkeypatch):
    monkeypatch.setenv("CI", value)
    assert conftest._in_ci() is on


def test_ci_unset(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert not conftest._in_ci()


def _session(pytester, monkeypatch, ci, files, *args):
    """Runs ``files`` (name -> source) under CI=``ci`` in a subprocess; returns the result."""
    monkeypatch.setenv("CI", ci)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makeini(INNER_INI)
    for name, source in files.items():
        pytester.makepyfile(**{name: source})
    return pytester.runpytest_subprocess(*(args or ("-q",)), timeout=600)


NO_LAUNCH = """
import pytest
import torch

def test_uses_the_device_but_launches_nothing(device):
    assert torch.ones(3, device=device).sum() == 3
"""

# Only tests that say they launch nothing: each passes the per-test check; the run as a whole
# launched none of gram's kernels, which the end-of-run check must catch.
NO_KERNEL_ONLY = """
import pytest
import torch

@pytest.mark.no_kernel
@pytest.mark.parametrize("i", range(4))
def test_reference_only(device, i):
    assert torch.zeros(2, device=device).sum() == 0
"""

# One test launches a kernel, in one worker; the others, in the other worker, launch none on
# purpose. Judged per worker the second would fail; the run launched tv_loss's kernels.
SPLIT_OVER_WORKERS = """
import pytest
import torch
import fastnote

@pytest.mark.xdist_group("launches")
def test_launches(device, launches):
    y = torch.randn(1, 3, 8, 8, device=device)
    torch.testing.assert_close(fastnote.tv_loss(y), fastnote.reference.tv_loss(y))
    assert launches

@pytest.mark.no_kernel
@pytest.mark.xdist_group("none")
@pytest.mark.parametrize("i", range(3))
def test_reference_only(device, i):
    assert torch.zeros(2, device=device).sum() == 0
"""


def test_guard_with_ci_1(pytester, monkeypatch):
    # a test on the device that launches nothing fails; a kernel's test file whose tests launched
    # none of its kernels fails the run
    result = _session(pytester, monkeypatch, "1", {"test_gram": NO_LAUNCH + NO_KERNEL_ONLY})
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.assert_outcomes(passed=5, errors=1)
    result.stdout.fnmatch_lines(["*CI: this test uses the kernels' device but launched no kernel*"])
    result.stdout.fnmatch_lines(["*CI=1: tests ran for fastnote.triton_kernels.gram but none of their kernels*"])


def test_guard_under_xdist(pytester, monkeypatch):
    """Two workers: gram's tests launch nothing (the run fails, though each test passes);
    tv_loss's launch in one worker only, and that counts for the run."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        if conftest._in_ci():
            pytest.fail("pytest-xdist is not installed: CI must check the guard under it (scripts/setup.sh installs it)")
        pytest.skip("pytest-xdist is not installed")
    result = _session(pytester, monkeypatch, "yes", {"test_gram": NO_KERNEL_ONLY, "test_tv_loss": SPLIT_OVER_WORKERS},
                      "-n", "2", "--dist", "loadgroup", "-v")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*CI=yes: tests ran for fastnote.triton_kernels.gram but none of their kernels*"])
    assert "tv_loss but none" not in result.stdout.str() and "tv_loss, " not in result.stdout.str()
    # tv_loss's two groups ran in different workers
    workers = {line.split("]")[0] for line in result.stdout.lines
               if line.startswith("[gw") and "test_tv_loss.py" in line and "PASSED" in line}
    assert len(workers) == 2, result.stdout.str()


# ------------------------------------------------------------------------------------------------
# TF32
# ------------------------------------------------------------------------------------------------
_LEGACY = {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False}
_NEW = {"cuda.matmul.fp32_precision": "ieee", "cudnn.conv.fp32_precision": "ieee", "cudnn.rnn.fp32_precision": "ieee"}


def _has_fp32_precision() -> bool:
    return conftest._backend_attr(("cuda", "matmul", "fp32_precision")) is not None


@pytest.fixture
def tf32_restored():
    """This process's TF32 settings put back after the test (which changes them)."""
    with conftest.tf32_disabled():   # saves them on entry, puts them back on exit
        yield


def test_tf32_disabled_turns_both_apis_off_and_restores_legacy(tf32_restored):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    before = conftest.tf32_settings()
    assert before["cuda.matmul.allow_tf32"] is True and before["cudnn.allow_tf32"] is True
    with conftest.tf32_disabled():
        inside = conftest.tf32_settings()
        assert {k: inside[k] for k in _LEGACY} == _LEGACY
        if _has_fp32_precision():
            assert {k: inside[k] for k in _NEW} == _NEW
    assert conftest.tf32_settings() == before


def test_tf32_disabled_restores_the_new_api(tf32_restored):
    if not _has_fp32_precision():
        pytest.skip("this torch has no fp32_precision settings")
    torch.backends.cuda.matmul.fp32_precision = "tf32"   # the legacy flag is then unreadable
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    before = conftest.tf32_settings()
    with conftest.tf32_disabled():
        inside = conftest.tf32_settings()
        assert {k: inside[k] for k in _NEW} == _NEW
        assert {k: inside[k] for k in _LEGACY} == _LEGACY
    assert conftest.tf32_settings() == before


def test_no_tf32_fixture(no_tf32):
    assert not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32


def _module_fixtures(path):
    """The fixtures a test file's ``pytestmark = pytest.mark.usefixtures(...)`` names."""
    names = set()
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            for call in ast.walk(node.value):
                if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "usefixtures":
                    names.update(a.value for a in call.args if isinstance(a, ast.Constant))
    return names


@pytest.mark.parametrize("name", ["test_spectral_norm.py", "test_models.py", "test_examples.py"])
def test_fp32_parity_files_turn_tf32_off(name):
    assert "no_tf32" in _module_fixtures(os.path.join(TESTS, name))


# ------------------------------------------------------------------------------------------------
# Spawned workers
# ------------------------------------------------------------------------------------------------
def _report_kernel_kind(queue):
    """In a spawned child: how triton decorated fastnote's kernels (decided at their import)."""
    from fastnote.triton_kernels import utils

    queue.put((os.environ.get("TRITON_INTERPRET"), type(utils.hard_sigmoid_f32).__name__))


def test_spawned_children_inherit_the_interpreter(interpreted_children, monkeypatch):
    import multiprocessing as mp

    # as on a GPU machine: this process runs without the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with interpreted_children():
        child = ctx.Process(target=_report_kernel_kind, args=(queue,))
        child.start()
    assert "TRITON_INTERPRET" not in os.environ, "set around the start only"
    child.join(300)
    assert child.exitcode == 0
    assert queue.get() == ("1", "InterpretedFunction")


def test_workers_do_not_set_the_interpreter_themselves():
    """Setting TRITON_INTERPRET in a worker is too late (see conftest.interpreted_children)."""
    offenders = []
    for name in sorted(os.listdir(TESTS)):
        if not name.endswith(".py") or name in ("conftest.py", "aot_compile.py", os.path.basename(__file__)):
            continue
        tree = ast.parse(open(os.path.join(TESTS, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                    and t.slice.value == "TRITON_INTERPRET" for t in node.targets):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------
# Markers
# ------------------------------------------------------------------------------------------------
BUILTIN_MARKERS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def _declared_markers():
    try:
        import tomllib
    except ImportError:   # Python < 3.11
        tomllib = pytest.importorskip("tomli")

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    return ini, {line.split(":")[0].strip() for line in ini["markers"]}


def _used_markers():
    used = {}
    for folder in ("tests", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                    # pytest.mark.<name>
                    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                            and node.value.attr == "mark" and getattr(node.value.value, "id", None) == "pytest":
                        used.setdefault(node.attr, f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    return used


def test_strict_markers_and_every_marker_declared():
    ini, declared = _declared_markers()
    assert "--strict-markers" in ini.get("addopts", "").split()
    undeclared = {m: where for m, where in _used_markers().items() if m not in declared | BUILTIN_MARKERS}
    assert not undeclared, f"markers used but not declared in pyproject.toml: {undeclared}"


def _needs_gpu(func):
    """A test body that skips without CUDA, or puts tensors on "cuda" (not a comparison with it)."""
    compared = {id(c) for node in ast.walk(func) if isinstance(node, (ast.Compare, ast.IfExp))
                for c in ast.walk(node) if isinstance(c, ast.Constant)}
    for node in ast.walk(func):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "not torch.cuda.is_available()":
            if any(isinstance(n, ast.Call) and ast.unparse(n.func) == "pytest.skip" for n in ast.walk(node)):
                return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda" \
                and not node.args:
            return True
        if isinstance(node, ast.Constant) and node.value == "cuda" and id(node) not in compared:
            return True
    return False


def test_tests_that_need_a_gpu_are_marked_gpu():
    unmarked = []
    for name in sorted(os.listdir(TESTS)):
        if not (name.startswith("test_") and name.endswith(".py")) or name == os.path.basename(__file__):
            continue
        tree = ast.parse(open(os.path.join(TESTS, name), encoding="utf-8").read())
        file_gpu = "pytest.mark.gpu" in "".join(ast.unparse(n) for n in tree.body if isinstance(n, ast.Assign)
                                                 and any(getattr(t, "id", None) == "pytestmark" for t in n.targets))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and _needs_gpu(node):
                marks = {ast.unparse(d) for d in node.decorator_list}
                if not file_gpu and "pytest.mark.gpu" not in marks:
                    unmarked.append(f"{name}::{node.name}")
    assert not unmarked, f"need a GPU but have no gpu marker: {unmarked}"
