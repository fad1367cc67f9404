"""Parity tolerances (DESIGN.md, "Numerics") and a comparison helper used by the tests and the
parity report.

kind: ``elementwise`` (activations, gates), ``reduction`` (sums, means, single matmuls),
``two_matmul`` (ops that chain two matmuls: attention). The reference runs in fp32 on the same
inputs; bf16 gets twice the fp16 figures.
"""
from __future__ import annotations

import torch

_FP32 = {"elementwise": 1e-5, "reduction": 2e-4, "two_matmul": 2e-4}
_FP16 = {"elementwise": 1e-2, "reduction": 1e-2, "two_matmul": 3e-2}


def tolerance(dtype: torch.dtype, kind: str) -> tuple[float, float]:
    """(atol, rtol) for outputs of ``dtype`` compared with the fp32 reference."""
    if kind not in _FP32:
        raise ValueError(f"kind must be one of {tuple(_FP32)}, got {kind!r}")
    if dtype in (torch.float32, torch.float64):
        tol = _FP32[kind]
    elif dtype == torch.float16:
        tol = _FP16[kind]
    elif dtype == torch.bfloat16:
        tol = 2 * _FP16[kind]
    else:
        raise ValueError(f"no tolerance for dtype {dtype}")
    return tol, tol


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, dtype=None, msg: str = "") -> None:
    """Compare ``actual`` (any dtype) with the fp32 ``expected`` at the table's tolerance for
    ``dtype`` (default: ``actual.dtype``)."""
    atol, rtol = tolerance(dtype or actual.dtype, kind)
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )
