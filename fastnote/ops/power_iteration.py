"""Spectral-norm power iteration (docs/ops.md section 6).

The iteration is the ``fastnote::spectral_power_iteration_`` op of the C++/CUDA extension
``fastnote._C`` (csrc/power_iteration.cpp, csrc/power_iteration_cuda.cu). It updates ``u`` and
``v`` in place as a constant for autograd (like ``torch.no_grad``) and returns sigma's value,
``u . (W v)``, taken from the last normalisation, so no third pass over W is needed; plus copies
of u and v for the backward.

sigma and ``W / sigma`` stay differentiable, twice:

- eager, with the extension: one C++ call, ``_C.spectral_weight`` (csrc/spectral_weight.cpp): the
  op, then a C++ autograd function for ``W / sigma`` (computed as ``W * (1 / sigma)``) with
  ``dL/dW = G / sigma - (<G, W> / sigma^2) u v^T``; under ``create_graph`` its backward recomputes
  sigma as ``u . (W v)`` with ATen ops, so double backward (gradient penalties) is exact.
  ``_DivideBySigma`` below is the same function in Python, for the path without the extension.
- under ``torch.compile``: the op (traced through its fake registration below), then sigma and
  ``W / sigma`` as plain torch ops that the compiler differentiates itself.

Without ``fastnote._C`` (a source checkout never built, an unsupported platform) ``import
fastnote`` still works and the same maths runs as torch ops, after one ``RuntimeWarning`` saying
so: results agree within the fp32 tolerances, only slower. ``FASTNOTE_BACKEND=reference`` picks
that path on purpose, without the warning.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend, checks

try:
    from .. import _C
except ImportError as _err:  # pragma: no cover - depends on how fastnote was installed
    _C = None
    _C_IMPORT_ERROR: Optional[BaseException] = _err
    _OP = None
else:
    _C_IMPORT_ERROR = None
    _OP = torch.ops.fastnote.spectral_power_iteration_.default

    @torch.library.register_fake("fastnote::spectral_power_iteration_")
    def _(weight, u, v, n_power_iterations, eps, add_rule, u_first):
        return weight.new_empty(()), u.new_empty(u.shape), v.new_empty(v.shape)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_RULES = ("max", "add")
_warned = set()
# Below this many bytes a fresh W / sigma costs less than checking whether a pooled one is free.
_POOL_MIN_BYTES = 1 << 17  # glibc's default mmap threshold


def extension_available() -> bool:
    """True when the compiled ``fastnote._C`` loaded."""
    return _C is not None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _use_kernel(weight: Tensor) -> bool:
    if weight.dtype not in KERNEL_DTYPES:
        return False
    if backend.requested() == "reference":
        return False
    if _OP is None:
        _warn_once("missing", "fastnote._C is not built, so spectral-norm power iteration runs as plain "
                   f"torch ops (same results, slower); rebuild with `pip install -e .` ({_C_IMPORT_ERROR})")
        return False
    if weight.is_cpu:
        return True
    if weight.is_cuda:
        if _C.with_cuda:
            return True
        _warn_once("cuda", "fastnote._C was built without CUDA, so spectral-norm power iteration on CUDA "
                   "tensors runs as plain torch ops; rebuild on a machine with the CUDA toolkit")
    return False


def _normalize_into(a: Tensor, out: Tensor, eps: float, add_rule: bool) -> Tensor:
    if add_rule:
        return torch.div(a, a.norm() + eps, out=out)
    return F.normalize(a, dim=0, eps=eps, out=out)


def _iterate_torch_(weight_mat, u, v, n_power_iterations, eps, add_rule, u_first):
    """The op's semantics as torch ops (fallback and complex weights)."""
    with torch.no_grad():
        w = weight_mat.detach()
        for _ in range(n_power_iterations):
            if u_first:
                _normalize_into(torch.mv(w, v), u, eps, add_rule)
                _normalize_into(torch.mv(w.mH, u), v, eps, add_rule)
            else:
                _normalize_into(torch.mv(w.mH, u), v, eps, add_rule)
                _normalize_into(torch.mv(w, v), u, eps, add_rule)
        u_c = u.clone(memory_format=torch.contiguous_format)
        v_c = v.clone(memory_format=torch.contiguous_format)
        sigma = torch.vdot(u_c, torch.mv(w, v_c))
    return sigma, u_c, v_c


def iterate_(weight_mat: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float,
             add_rule: bool, u_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Runs the iteration on ``u`` and ``v`` in place (no checks, no autograd) and returns
    ``(sigma, u_copy, v_copy)``: sigma = u . (W v) for the updated vectors, as a detached 0-dim
    tensor in weight_mat's dtype. ``u_first`` picks torch's parametrization order (u then v)."""
    if _use_kernel(weight_mat):
        return _OP(weight_mat, u, v, n_power_iterations, eps, add_rule, u_first)
    return _iterate_torch_(weight_mat, u, v, n_power_iterations, eps, add_rule, u_first)


# ------------------------------------------------------------------------------------------------
# Weight <-> matrix layout (torch's reshape_weight_to_matrix)
#
# csrc/spectral_weight.cpp has the same pair in C++ for ``_C.spectral_weight``, whose forward and
# backward never come back to Python; these serve every other path (no extension, torch.compile,
# tensor subclasses, the parametrization's warm-up). The two must agree: the u and v buffers carry
# over from one path to the other (tests/test_spectral_norm.py compares the paths).
# ------------------------------------------------------------------------------------------------
def as_matrix(weight: Tensor, dim: int) -> Tensor:
    """``weight`` with axis ``dim`` moved first, flattened to [h, w] (a view when it can be)."""
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.reshape(weight.shape[0], -1)


def _from_matrix(mat: Tensor, like: Tensor, dim: int) -> Tensor:
    if dim == 0:
        return mat.reshape(like.shape)
    shape = list(like.shape)
    shape.insert(0, shape.pop(dim))
    return mat.reshape(shape).movedim(0, dim)


# ------------------------------------------------------------------------------------------------
# W / sigma, with a reusable output buffer for large CPU weights
# ------------------------------------------------------------------------------------------------
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class OutputPool:
    """One reusable ``W / sigma`` buffer per spectral-normed weight (CPU, large weights).

    A fresh 85 MB tensor per call costs the CPU more than the division itself (the allocator
    returns big blocks to the OS, so every call page-faults them back in). The pooled buffer is
    reused only when nothing but the pool refers to its storage (no autograd graph saved it, no
    view, no user reference, checked with the storage's use count), so a pending backward, e.g.
    ``D(real) - D(fake)``, never sees it change; otherwise a new buffer is made and pooled.
    Copies and pickles of a module start with an empty pool.
    """

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf: Optional[Tensor] = None

    def __deepcopy__(self, memo):
        return OutputPool()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.buf = None

    @staticmethod
    def usable_for(weight: Tensor) -> bool:
        return (weight.numel() * weight.element_size() >= _POOL_MIN_BYTES and weight.device.type == "cpu"
                and _storage_use_count is not None and not torch.is_inference_mode_enabled())

    def take(self, like: Tensor) -> Tensor:
        b = self.buf
        if (b is not None and b.shape == like.shape and b.dtype == like.dtype and b.stride() == like.stride()
                # the pool's tensor plus the temporary storage object made here: 2 means no other user
                and _storage_use_count(b.untyped_storage()._cdata) == 2):
            return b.detach()
        b = torch.empty_like(like)
        self.buf = b
        return b.detach()


class _DivideBySigma(torch.autograd.Function):
    """weight / sigma, sigma = u . (W_mat v) with u, v constants and its value given (the path
    without the extension; csrc/spectral_weight.cpp holds its C++ twin)."""

    @staticmethod
    def forward(ctx, weight, sigma, u, v, dim, out):
        ctx.save_for_backward(weight, sigma, u, v)
        ctx.dim = dim
        return torch.div(weight, sigma) if out is None else torch.div(weight, sigma, out=out)

    @staticmethod
    def backward(ctx, grad):
        weight, sigma, u, v = ctx.saved_tensors
        dim = ctx.dim
        create_graph = torch.is_grad_enabled()
        if create_graph:
            # the second derivative needs sigma as a function of weight, not the saved value
            sigma = torch.dot(u, torch.mv(as_matrix(weight, dim), v))
        # dL/dW = G / sigma - (<G, W> / sigma^2) u v^T
        c = torch.dot(grad.reshape(-1), weight.reshape(-1)) / (sigma * sigma)
        g = as_matrix(grad, dim) / sigma
        g = torch.addr(g, u * -c, v) if create_graph else g.addr_(u * -c, v)
        return _from_matrix(g, weight, dim), None, None, None, None, None


class _Sigma(torch.autograd.Function):
    """sigma = u . (W v) with u, v constants and its value given: d sigma / dW = u v^T."""

    @staticmethod
    def forward(ctx, weight_mat, sigma, u, v):
        ctx.save_for_backward(u, v)
        return sigma.clone()

    @staticmethod
    def backward(ctx, grad):
        u, v = ctx.saved_tensors
        return grad * torch.outer(u, v), None, None, None


_PLAIN_TYPES = checks.PLAIN_TENSORS
_torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_functorch_active = torch._C._are_functorch_transforms_active


def _traced() -> bool:
    """Compiling, or under a torch.func transform (grad, vjp, jacrev, ...), whose wrapped tensors
    the C++ autograd function and the Python ones here (no ``setup_context``) cannot take: sigma
    and ``W / sigma`` are then plain torch ops that the compiler or the transform differentiates."""
    return torch.compiler.is_compiling() or _functorch_active()


def spectral_weight(weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float,
                    add_rule: bool, u_first: bool, pool: Optional[OutputPool] = None) -> Tensor:
    """The front ends' step: ``n_power_iterations`` on the buffers ``u``, ``v`` in place, then
    ``weight / sigma``, differentiable (twice) w.r.t. weight. No argument checks.

    Eager with the extension: one C++ call (``_C.spectral_weight``: the op, then the C++ twin of
    ``_DivideBySigma``). Under torch.compile or a torch.func transform: the op plus plain torch
    ops. Without the extension or for other dtypes: torch ops throughout."""
    if _traced() or weight.dtype not in KERNEL_DTYPES:
        mat = as_matrix(weight, dim)
        _, u_c, v_c = iterate_(mat, u, v, n_power_iterations, eps, add_rule, u_first)
        return weight / torch.vdot(u_c, torch.mv(mat, v_c))
    out = pool.take(weight) if pool is not None and OutputPool.usable_for(weight) else None
    # The C++ call skips Python-level __torch_function__ handling: plain tensors only. The cheap
    # tests come first: for a small weight this Python is a good part of the whole call.
    if (type(weight) in _PLAIN_TYPES and type(u) in _PLAIN_TYPES and type(v) in _PLAIN_TYPES
            and not _torch_function_mode_enabled() and _use_kernel(weight)):
        return _C.spectral_weight(weight, u, v, dim, n_power_iterations, eps, add_rule, u_first, out)
    sigma, u_c, v_c = iterate_(as_matrix(weight, dim), u, v, n_power_iterations, eps, add_rule, u_first)
    if weight.requires_grad and torch.is_grad_enabled():
        return _DivideBySigma.apply(weight, sigma, u_c, v_c, dim, out)
    return torch.div(weight, sigma) if out is None else torch.div(weight, sigma, out=out)


def power_iteration(weight_mat: Tensor, u: Tensor, v: Tensor, n_power_iterations: int = 1,
                    eps: float = 1e-12, rule: str = "max") -> Tuple[Tensor, Tensor, Tensor]:
    """Power iteration for the largest singular value of ``weight_mat`` [h, w] (docs/ops.md section 6.1).

    Each iteration: ``v = normalize(W^T u)``, then ``u = normalize(W v)``; rule ``"max"`` is torch's
    ``a / max(||a||, eps)``, ``"add"`` SAGAN's ``a / (||a|| + eps)``. Returns ``(sigma, u, v)``:
    ``sigma = u . (W v)`` (0-dim, weight_mat's dtype) is differentiable w.r.t. ``weight_mat`` with
    u, v held constant; the returned u [h] and v [w] are new tensors (the inputs are not modified).
    fp32/fp16/bf16/fp64, CPU (C++ kernel) or CUDA; u and v in weight_mat's dtype and device.

    >>> import torch, fastnote
    >>> W = torch.diag(torch.tensor([3.0, 1.0]))
    >>> sigma, u, v = fastnote.power_iteration(W, torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6]), 20)
    >>> round(sigma.item(), 4)
    3.0
    """
    checks.tensor("weight_mat", weight_mat, ndim=2, dtypes=KERNEL_DTYPES)
    checks.tensor("u", u, ndim=1, dtypes=KERNEL_DTYPES)
    checks.tensor("v", v, ndim=1, dtypes=KERNEL_DTYPES)
    checks.same_device(weight_mat=weight_mat, u=u, v=v)
    checks.same_dtype(weight_mat=weight_mat, u=u, v=v)
    checks.shape("u", u, [weight_mat.shape[0]])
    checks.shape("v", v, [weight_mat.shape[1]])
    n = checks.integer("n_power_iterations", n_power_iterations, minimum=0)
    eps = checks.real("eps", eps, nonnegative=True)
    checks.choice("rule", rule, _RULES)

    u_new = u.detach().clone(memory_format=torch.contiguous_format)
    v_new = v.detach().clone(memory_format=torch.contiguous_format)
    sigma, u_c, v_c = iterate_(weight_mat, u_new, v_new, n, eps, rule == "add", False)
    if weight_mat.requires_grad and torch.is_grad_enabled():
        if _traced():
            sigma = torch.dot(u_c, torch.mv(weight_mat, v_c))
        else:
            sigma = _Sigma.apply(weight_mat, sigma, u_c, v_c)
    return sigma, u_new, v_new
