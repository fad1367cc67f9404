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

__all__ = ["torchvision_op_schemas", "import_timm", "import_torchvision_models"]

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
