"""Importing timm and torchvision beside a CPU-only torch.

A torchvision wheel built for CUDA, installed beside a CPU-only torch (as on a machine without a
GPU), has a C extension that cannot load. ``import torchvision`` (which ``import timm`` does) then
fails: its Python code registers fake kernels for two operators that the extension would have
defined (``torchvision::nms`` and ``torchvision::qnms``), and the registration finds no such
operator. ``torchvision_op_schemas()`` defines the two schemas (no kernels: the classification
models the examples and tests build never call them), after which both libraries import.

fastnote itself needs neither library; the examples (``examples/_common.py``), the test suite
(``tests/conftest.py``) and the memory benchmark use these helpers, so the shim is written once.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["torchvision_op_schemas", "import_timm", "import_torchvision_models", "interpreter_bf16_round_to_nearest"]

_LIBRARIES: list = []   # keeps the schema library alive: dropping it would remove the definitions


def torchvision_op_schemas() -> None:
    """Make ``import torchvision`` work beside a CPU-only torch (nothing to do when torchvision is
    absent, or when its extension loads)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
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
    _LIBRARIES.append(lib)


def import_timm():
    """``timm``, importable beside a CPU-only torch; ImportError when it is not installed."""
    if importlib.util.find_spec("timm") is None:
        raise ImportError("this example needs timm: pip install timm")
    torchvision_op_schemas()
    import timm

    return timm


def import_torchvision_models():
    """``torchvision.models``, importable beside a CPU-only torch; ImportError when absent."""
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("this example needs torchvision")
    torchvision_op_schemas()
    import torchvision.models

    return torchvision.models


def interpreter_bf16_round_to_nearest() -> bool:
    """Make Triton's interpreter convert fp32 to bf16 as the GPU does: round to nearest, ties to
    even (``cvt.rn.bf16.f32``, and torch's ``.to(torch.bfloat16)``). Triton 3.6 to 3.9's
    interpreter truncates instead (``InterpreterBuilder.cast_impl`` drops the low 16 bits: round
    toward zero), so every bf16 value a kernel writes under the interpreter is biased toward zero
    by half a unit of roundoff on average, and a gradient that sums many such values with
    cancellation (Swin V2's per-head ``logit_scale``) comes out several times further from fp32
    than it does on a GPU. fastnote's kernel modules call this when the interpreter is on
    (``triton_kernels/utils.py``); it changes that one conversion, for every kernel the
    interpreter runs. Idempotent; False where Triton's interpreter has no such method."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or not hasattr(interpreter, "TensorHandle"):
        return False
    if getattr(original, "_fastnote_round_to_nearest", False):
        return True

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = np.asarray(src.data, dtype=np.float32)
            bits = x.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
            return interpreter.TensorHandle(np.where(np.isnan(x), quiet_nan, rounded), tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._fastnote_round_to_nearest = True
    builder.cast_impl = cast_impl
    return True
