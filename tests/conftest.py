"""Test setup. Without a GPU the Triton interpreter is turned on here, before triton is imported,
so every kernel runs (on the CPU) in every CI run. Fresh kernel outputs are NaN-poisoned so a
kernel that leaves part of its output unwritten fails its parity test."""
import os

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
    """torchvision's wheel beside a CPU torch: its C extension (a CUDA build) cannot load, and
    importing torchvision then fails on the fake registrations of two ops whose schemas that
    extension would have defined (``torchvision::nms``, ``torchvision::qnms``). Where the
    extension loads, nothing is done; where it does not, the two schemas are defined (no kernel:
    the models under test never call them), so ``torchvision.models`` imports."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    folder = os.path.dirname(spec.origin)
    for name in os.listdir(folder):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(folder, name))
            except (OSError, RuntimeError):
                pass
    try:
        torch.ops.torchvision.nms.default
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)


_KEEP = []
_torchvision_op_schemas()


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
