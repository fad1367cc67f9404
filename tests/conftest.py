"""Test setup. Without a GPU the Triton interpreter is turned on here, before triton is imported,
so every kernel runs (on the CPU) in every CI run. Fresh kernel outputs are NaN-poisoned so a
kernel that leaves part of its output unwritten fails its parity test."""
import contextlib
import os
import sys
import warnings

import pytest

# ``pytester`` runs small pytest sessions in a subprocess: the guard's own tests (test_suite_guard.py)
pytest_plugins = ["pytester"]


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

from fastnote.compat import torchvision_op_schemas  # noqa: E402


def _share_cores() -> None:
    """Under pytest-xdist each worker takes its share of the cores for torch's intra-op threads, and
    passes it on to the processes it starts (OMP_NUM_THREADS). torch's default, one thread per core
    in every worker, oversubscribes the cores, and OpenMP's waiting threads spin: on 2 cores with 2
    workers, tests/test_models.py's MobileNet and RegNet tests took 122 s with the default against
    33 s with one thread per worker. An OMP_NUM_THREADS set by the caller is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_cores()

# torchvision beside a CPU torch: its CUDA-built extension cannot load and ``import torchvision``
# fails on two missing op schemas; fastnote.compat defines them (the examples use it too).
torchvision_op_schemas()


# ------------------------------------------------------------------------------------------------
# Kernel launches, recorded. A parity test that silently takes the reference path compares the
# reference with itself and passes, so under CI (CI=1, true or yes, any case) the run fails unless
# the kernels ran. Under pytest-xdist each worker records its own launches and test files and hands
# them to the controller (``workeroutput``), which judges the whole run: one file's tests may be
# spread over several workers, and some of them launch nothing on purpose.
# ------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHES = []           # (module, kernel, grid) of the current test's launches
LAUNCH_COUNTS = {}      # kernel module -> launches over the whole run
_ran_test_files = set()


def _record_launches() -> None:
    # Through the kernels' own launch helper, which every launch goes through (tests/test_launch.py
    # checks it): on a GPU its direct path skips Triton's kernel[grid] after a kernel's first launch.
    try:
        from fastnote.triton_kernels import utils
    except ImportError:
        return

    def recording(kernel, grid):
        fn = getattr(kernel, "fn", None)
        module = getattr(fn, "__module__", "?")
        LAUNCHES.append((module, getattr(fn, "__name__", "?"), grid))
        LAUNCH_COUNTS[module] = LAUNCH_COUNTS.get(module, 0) + 1

    utils.LAUNCH_OBSERVERS.append(recording)


_record_launches()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _is_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionstart(session):
    """Under CI: the run must exercise the kernels, whatever the environment says."""
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
        raise pytest.UsageError(f"CI={os.environ.get('CI')} but the kernels would not run: " + "; ".join(problems))


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
        pytest.fail("CI: this test uses the kernels' device but launched no kernel (it would compare "
                    "the reference with itself); mark it no_kernel if it launches none on purpose")


@pytest.fixture
def launches():
    """The kernel launches made so far by the current test: (module, kernel name, grid)."""
    return LAUNCHES


def _files_without_launches(ran_files, launch_counts):
    """The kernel modules whose test files ran while none of their kernels was launched."""
    return sorted({m for f in ran_files if (m := _kernel_module(f)) and not launch_counts.get(m)})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: a worker finished; add what it ran and launched to the run's totals."""
    out = getattr(node, "workeroutput", None) or {}
    for module, count in out.get("fastnote_launch_counts", {}).items():
        LAUNCH_COUNTS[module] = LAUNCH_COUNTS.get(module, 0) + count
    _ran_test_files.update(out.get("fastnote_ran_files", ()))


def pytest_sessionfinish(session, exitstatus):
    if not _in_ci():
        return
    config = session.config
    if _is_xdist_worker(config):
        # the controller judges the run, from every worker's share (pytest_testnodedown)
        config.workeroutput["fastnote_launch_counts"] = dict(LAUNCH_COUNTS)
        config.workeroutput["fastnote_ran_files"] = sorted(_ran_test_files)
        return
    missing = _files_without_launches(_ran_test_files, LAUNCH_COUNTS)
    if missing:
        message = (f"CI={os.environ.get('CI')}: tests ran for {', '.join(missing)} but none of their kernels "
                   "was launched")
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line(message, red=True, bold=True)
        else:
            print("\n" + message, file=sys.stderr)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
def _backend_settings():
    """fastnote reads FASTNOTE_BACKEND and FASTNOTE_POISON_ALLOC once; a test that changes them
    calls ``fastnote.backend.refresh()``, and after every test (monkeypatch has restored the
    environment by then) they are read again."""
    yield
    from fastnote import backend
    backend.refresh()


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


# ------------------------------------------------------------------------------------------------
# TF32 off for fp32 comparisons. On Ampere and later, cuDNN convolutions use TF32 by default (and
# matmuls when asked), so torch's own fp32 result is off by ~1e-3 relative: an fp32 parity test of
# a module, a model or an example against torch must compare against true fp32.
# ------------------------------------------------------------------------------------------------
# torch's newer API (2.9+): one precision per backend and operation
_FP32_PRECISION = (("fp32_precision",), ("cuda", "matmul", "fp32_precision"), ("cudnn", "fp32_precision"),
                   ("cudnn", "conv", "fp32_precision"), ("cudnn", "rnn", "fp32_precision"))
_FP32_PRECISION_OFF = (("cuda", "matmul", "fp32_precision"), ("cudnn", "conv", "fp32_precision"),
                       ("cudnn", "rnn", "fp32_precision"))
_ALLOW_TF32 = (("cuda", "matmul", "allow_tf32"), ("cudnn", "allow_tf32"))


def _backend_attr(path):
    """torch.backends.<path>, or None where this torch has no such setting, or (the legacy flags,
    after the new API set them otherwise) will not tell it."""
    obj = torch.backends
    try:
        for name in path:
            obj = getattr(obj, name)
    except (AttributeError, RuntimeError):
        return None
    return obj


def _set_backend_attr(path, value):
    obj = torch.backends
    for name in path[:-1]:
        obj = getattr(obj, name, None)
        if obj is None:
            return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's advice to move to the new API
        setattr(obj, path[-1], value)


def tf32_settings() -> dict:
    """The TF32 settings ``tf32_disabled`` changes: "cuda.matmul.allow_tf32" etc. -> value (None
    where absent or unreadable)."""
    return {".".join(p): _backend_attr(p) for p in _ALLOW_TF32 + _FP32_PRECISION}


@contextlib.contextmanager
def tf32_disabled():
    """cuDNN and cuBLAS in full fp32 inside, through both APIs (the legacy ``allow_tf32`` flags and,
    where this torch has it, ``fp32_precision``), so neither can turn TF32 on; every setting is
    put back on exit, the legacy flags first and the new API's values last, as they were."""
    legacy = {p: _backend_attr(p) for p in _ALLOW_TF32}
    new = {p: _backend_attr(p) for p in _FP32_PRECISION}
    try:
        for p in _ALLOW_TF32:
            _set_backend_attr(p, False)
        for p in _FP32_PRECISION_OFF:
            if new[p] is not None:
                _set_backend_attr(p, "ieee")
        yield
    finally:
        for p in _ALLOW_TF32:
            if legacy[p] is not None:
                _set_backend_attr(p, legacy[p])
        for p in _FP32_PRECISION:
            if new[p] is not None:
                _set_backend_attr(p, new[p])


@pytest.fixture(params=[torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.gpu)], ids=["bf16", "fp16"])
def autocast_dtype(request):
    """The autocast dtypes of the patched-model autocast tests: bf16 everywhere (CPU autocast on the
    CPU), fp16 only on a GPU (CPU autocast's fp16 support is partial)."""
    return request.param


@pytest.fixture
def no_tf32():
    """For fp32 parity tests of modules, whole models and examples: TF32 off (``tf32_disabled``)."""
    with tf32_disabled():
        yield


# ------------------------------------------------------------------------------------------------
# Processes started by a test (torch.multiprocessing.spawn). A spawned child imports the test
# module, so fastnote and triton, before any of the worker's code runs, and triton decides at import
# whether its kernels are interpreted: TRITON_INTERPRET must be in the environment the child
# inherits. Setting it inside the worker is too late (on a GPU machine the worker then has compiled
# kernels, which cannot take the CPU tensors that gloo workers use).
# ------------------------------------------------------------------------------------------------
CHILD_ENV = {"TRITON_INTERPRET": "1", "FASTNOTE_POISON_ALLOC": "1"}


def _interpreted_children():
    from fastnote.testing import environ

    return environ(CHILD_ENV)


@pytest.fixture
def interpreted_children():
    """A context manager: processes started inside it run fastnote's kernels under the Triton
    interpreter (CHILD_ENV is in their environment from the start). Keep it around the start only:
    on a GPU machine this process's own kernels are compiled, and a ``fastnote.backend.refresh()``
    while it is set would take the interpreter's settings."""
    return _interpreted_children
