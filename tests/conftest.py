"""Test setup. Without a GPU the Triton interpreter is turned on here, before triton is imported,
so every kernel runs (on the CPU) in every CI run. Fresh kernel outputs are NaN-poisoned so a
kernel that leaves part of its output unwritten fails its parity test."""
import os
import sys

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTNOTE_POISON_ALLOC", "1")

import torch  # noqa: E402


def _torchvision_op_schemas() -> None:
    """torchvision beside a CPU torch: its CUDA-built extension cannot load and ``import
    torchvision`` fails on two missing op schemas, which the examples' helper defines (written once
    there, since the examples run without the tests). Loaded by path: examples/ is no package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastnote_examples_common",
                                                  os.path.join(os.path.dirname(os.path.dirname(
                                                      os.path.abspath(__file__))), "examples", "_common.py"))
    common = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = common      # its dataclasses look their module up there
    spec.loader.exec_module(common)
    common._torchvision_op_schemas()


_torchvision_op_schemas()


# ------------------------------------------------------------------------------------------------
# Kernel launches, recorded. A parity test that silently takes the reference path compares the
# reference with itself and passes, so under CI=true the run fails unless the kernels ran.
# ------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHES = []           # (module, kernel, grid) of the current test's launches
LAUNCH_COUNTS = {}      # kernel module -> launches over the whole run
_ran_test_files = set()


def _record_launches() -> None:
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        return
    original = KernelInterface.__getitem__

    def recording(self, grid):
        fn = getattr(self, "fn", None)
        module = getattr(fn, "__module__", "?")
        LAUNCHES.append((module, getattr(fn, "__name__", "?"), grid))
        LAUNCH_COUNTS[module] = LAUNCH_COUNTS.get(module, 0) + 1
        return original(self, grid)

    KernelInterface.__getitem__ = recording


_record_launches()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_sessionstart(session):
    """Under CI=true: the run must exercise the kernels, whatever the environment says."""
    if not _in_ci():
        return
    problems = []
    try:
        import triton  # noqa: F401
    except ImportError:
        problems.append("triton is not importable")
    from fastnote import backend
    from fastnote.ops import power_iteration

    if backend.requested() == "reference":
        problems.append("FASTNOTE_BACKEND=reference: every parity test would compare the reference with itself")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        problems.append(f"no GPU and TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}: the Triton kernels "
                        "cannot run (the suite sets it to 1 unless the environment already set it)")
    elif not backend.use_triton(torch.device("cuda" if HAS_CUDA else "cpu")):
        problems.append("fastnote.backend would not run the Triton kernels")
    if not power_iteration.extension_available():
        problems.append("fastnote._C is not built: the spectral-norm kernels would not be tested")
    if problems:
        raise pytest.UsageError("CI=true but the kernels would not run: " + "; ".join(problems))


def _kernel_module(test_path: str):
    """``fastnote.triton_kernels.<name>`` for tests/test_<name>.py when that kernel file exists."""
    base = os.path.basename(test_path)
    if base.startswith("test_") and base.endswith(".py"):
        name = base[len("test_"):-3]
        if os.path.exists(os.path.join(ROOT, "triton_kernels", name + ".py")):
            return "fastnote.triton_kernels." + name
    return None


@pytest.fixture(autouse=True)
def _launch_log(request):
    LAUNCHES.clear()
    yield
    _ran_test_files.add(str(request.node.fspath))
    # A test on the kernels' device that launched no kernel compared the reference with itself,
    # unless it says it launches none (errors raised before any launch, pure reference checks).
    if _in_ci() and "device" in request.fixturenames and not LAUNCHES \
            and request.node.get_closest_marker("no_kernel") is None:
        pytest.fail("CI=true: this test uses the kernels' device but launched no kernel (it would compare "
                    "the reference with itself); mark it no_kernel if it launches none on purpose")


@pytest.fixture
def launches():
    """The kernel launches made so far by the current test: (module, kernel name, grid)."""
    return LAUNCHES


def pytest_sessionfinish(session, exitstatus):
    if not _in_ci():
        return
    missing = sorted({m for f in _ran_test_files if (m := _kernel_module(f)) and not LAUNCH_COUNTS.get(m)})
    if missing:
        print(f"\nCI=true: tests ran for {', '.join(missing)} but none of their kernels was launched")
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    import torch as _t

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "absent"
    mode = "GPU " + _t.cuda.get_device_name(0) if HAS_CUDA else "no GPU: Triton interpreter on"
    return f"fastnote: torch {_t.__version__}, triton {tv}, {mode}"


@pytest.fixture
def compile_backend():
    """torch.compile backend for the fullgraph tests: inductor on a GPU; on the CPU under the
    interpreter aot_eager, which traces the same graph (dynamo + fake tensors + autograd) without
    spending minutes in the C++ compiler on two cores."""
    return "inductor" if HAS_CUDA else "aot_eager"
