"""sagan_attention(q, k, v, x, gamma) = gamma * v softmax(q^T k)^T + x (docs/ops.md section 5.1), the
unscaled SAGAN self-attention with its residual, flash style: O(N) memory instead of the [B, N, N_k]
attention map. Backward recomputes the attention from q, k and the saved per-row log-sum-exp.

It also saves the attention output O = v softmax(q^T k)^T in fp32 (4 bytes per element of
``out``; not needed, hence not written, for fp32 inputs without a residual, where O is ``out``).
Backward needs r = sum_c dOut * O per query: gamma's gradient is sum(r), and flash attention's
D = rowsum(dO_attn * O) is gamma * r. Recovering O as (out - x) / gamma would fail at SAGAN's
initial gamma = 0; O rounded to bf16 would make D inconsistent with the recomputed attention, and
dS = P * (dP - D) cancels badly when the unscaled softmax is peaked (measured: 7% error in dk
for bf16 with logits ~ 250, against 0.7% with O in fp32)."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels


@kernel_op("fastnote::sagan_attention")
def _forward_op(q: Tensor, k: Tensor, v: Tensor, x: Optional[Tensor], gamma: Optional[Tensor]) -> List[Tensor]:
    """[out, O in fp32 (empty when out is O in fp32 already), lse [B, N] fp32]. x: [B, d_v, N], or
    [B, d_v, W, H] with W*H = N (then out has x's shape: no reshape outside the op, so none in the
    autograd graph)."""
    kernels = _kernels.sagan_attention

    plan = kernels.forward_plan(q, v)   # checks the sizes
    B, N, device = plan.B, plan.N, q.device
    o_shape = (B, plan.DV, N)
    if x is None:
        out = backend.empty(o_shape, q.dtype, device)
        store_o = q.dtype is not torch.float32
    else:
        x_shape = x.shape
        out = backend.empty(x_shape, reference.sagan_output_dtype(q, x, gamma), device)
        store_o = True
        # gamma is read as one element of its own dtype; a 4-D x is read through its strides when
        # its last two dimensions merge into one (else one copy), and out is written as [B, d_v, N]
        if len(x_shape) == 4 and x.stride(2) != x_shape[3] * x.stride(3):
            x = x.reshape(o_shape)
    o = backend.empty(o_shape if store_o else (0,), torch.float32, device)
    lse = backend.empty((B, N), torch.float32, device)
    kernels.forward(q=q, k=k, v=v, x=x, gamma=gamma, out=out, o=o if store_o else None, lse=lse, plan=plan)
    return [out, o, lse]


def _shapes(q, v, x):
    """out [B, d_v, N] (x's shape when x is given); the saved O in fp32 [B, d_v, N], or [0] when it
    is ``out`` itself (fp32 without a residual); lse [B, N]. (The fake; the op computes the same
    from its launch plan.)"""
    B, _, N = q.shape
    shape = (B, v.shape[1], N)
    if x is not None:
        return tuple(x.shape), shape, (B, N)
    return shape, shape if q.dtype != torch.float32 else (0,), (B, N)


@_forward_op.register_fake
def _(q, k, v, x, gamma):
    out_shape, o_shape, lse_shape = _shapes(q, v, x)
    return [q.new_empty(out_shape, dtype=reference.sagan_output_dtype(q, x, gamma)),
            q.new_empty(o_shape, dtype=torch.float32),
            q.new_empty(lse_shape, dtype=torch.float32)]


@kernel_op("fastnote::sagan_attention_backward")
def _backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                 gamma: Optional[Tensor]) -> List[Tensor]:
    """[dq, dk, dv, r] with r[b, n] = sum_c grad * O (fp32; gamma's gradient is sum(r))."""
    kernels = _kernels.sagan_attention

    if grad.dtype != q.dtype:
        grad = grad.to(q.dtype)
    dq = backend.empty_like(q)
    dk = backend.empty_like(k)
    dv = backend.empty_like(v)
    r = backend.empty((q.shape[0], q.shape[2]), torch.float32, q.device)
    kernels.backward(grad=grad, q=q, k=k, v=v, o=o.contiguous(), lse=lse.contiguous(), gamma=gamma,
                     dq=dq, dk=dk, dv=dv, r=r)
    return [dq, dk, dv, r]


@_backward_op.register_fake
def _(grad, q, k, v, o, lse, gamma):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    q, k, v, x, gamma = inputs
    out, o, lse = output
    ctx.has_residual = x is not None
    ctx.x_dtype = x.dtype if x is not None else None
    ctx.save_for_backward(q, k, v, o if o.dim() == 3 else out, lse, gamma)


def _backward(ctx, grads):
    grad = grads[0]
    q, k, v, o, lse, gamma = ctx.saved_tensors
    flat = grad if grad.dim() == 3 else grad.reshape(q.shape[0], v.shape[1], q.shape[2])
    dq, dk, dv, r = _backward_op(flat, q, k, v, o, lse, gamma)
    if not ctx.has_residual:
        return dq, dk, dv, None, None
    dgamma = r.sum().to(gamma.dtype).reshape(gamma.shape)
    return dq, dk, dv, grad if grad.dtype == ctx.x_dtype else grad.to(ctx.x_dtype), dgamma


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _attention_map(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q^T k) [B, N, N_k] in q's dtype, by plain torch ops in fp32 (differentiable)."""
    with torch.autocast(q.device.type, enabled=False):
        energy = torch.bmm(q.float().transpose(1, 2), k.float())
        return energy.softmax(dim=-1).to(q.dtype)




def _inputs_ok(q, k, v, x, gamma) -> bool:
    """The common case of ``_check`` in a few comparisons (False: let the checks decide)."""
    if not (type(q) in checks.PLAIN_TENSORS and type(k) in checks.PLAIN_TENSORS and type(v) in checks.PLAIN_TENSORS and q.dtype in checks.FLOAT_DTYPES
            and k.dtype in checks.FLOAT_DTYPES and v.dtype in checks.FLOAT_DTYPES
            and q.dim() == 3 and k.dim() == 3 and v.dim() == 3 and q.device == k.device == v.device):
        return False
    B, d_qk, N = q.shape
    N_k = k.shape[2]
    d_v = v.shape[1]
    if not (k.shape[0] == B and k.shape[1] == d_qk and v.shape[0] == B and v.shape[2] == N_k and d_qk and d_v
            and (N_k or not N)):
        return False
    if x is None:
        return gamma is None
    if not (type(x) in checks.PLAIN_TENSORS and type(gamma) in checks.PLAIN_TENSORS and x.dtype in checks.FLOAT_DTYPES
            and gamma.dtype in checks.FLOAT_DTYPES and gamma.numel() == 1 and x.device == q.device
            and gamma.device == q.device):
        return False
    shape = x.shape
    return (len(shape) == 3 and shape == (B, d_v, N)) or (
        len(shape) == 4 and shape[0] == B and shape[1] == d_v and shape[2] * shape[3] == N)


def _check(q, k, v, x, gamma):
    if _inputs_ok(q, k, v, x, gamma):
        return
    q = checks.tensor("q", q, ndim=3)
    k = checks.tensor("k", k, ndim=3)
    v = checks.tensor("v", v, ndim=3)
    B, d_qk, N = q.shape
    checks.shape("k", k, [B, d_qk, None])
    N_k = k.shape[2]
    checks.shape("v", v, [B, None, N_k])
    d_v = v.shape[1]
    checks.has_channels("q", q, what="d_qk >= 1")
    checks.has_channels("v", v, what="d_v >= 1")
    if N_k == 0 and N > 0:
        raise ValueError(f"k must have at least one position to attend to, got shape {list(k.shape)}")
    if (x is None) != (gamma is None):
        given, missing = ("x", "gamma") if gamma is None else ("gamma", "x")
        raise ValueError(f"{missing} must be given together with {given} (out = gamma * attention + x), "
                         f"got {given} without {missing}")
    if x is not None:
        checks.tensor("x", x, ndim=(3, 4))
        if x.dim() == 3:
            checks.shape("x", x, [B, d_v, N])
        elif list(x.shape[:2]) != [B, d_v] or x.shape[2] * x.shape[3] != N:
            raise ValueError(f"x must have shape [{B}, {d_v}, {N}] or [{B}, {d_v}, W, H] with W*H = {N}, "
                             f"got {list(x.shape)}")
        checks.scalar("gamma", gamma)
    checks.same_device(q=q, k=k, v=v, x=x, gamma=gamma)


def sagan_attention(q: Tensor, k: Tensor, v: Tensor, x: Optional[Tensor] = None, gamma: Optional[Tensor] = None,
                    return_attention: bool = False):
    """SAGAN self-attention: ``gamma * (v @ softmax(q^T @ k, -1)^T) + x`` with no 1/sqrt(d) scaling.

    q: [B, d_qk, N]; k: [B, d_qk, N_k]; v: [B, d_v, N_k] -- SAGAN's 1x1-conv outputs flattened,
    channels first (N_k < N when keys and values are pooled, as in BigGAN). x: [B, d_v, N] or
    [B, d_v, W, H] with W*H = N, and gamma (0-dim or one-element tensor) come together or not at
    all; without them the plain attention output [B, d_v, N] is returned, with them the result
    has x's shape. q, k, v share one dtype (fp32, fp16, bf16), the attention's; under autocast
    they are cast to the autocast dtype. x and gamma keep theirs, and the result has the dtype
    torch gives eager SAGAN's ``gamma * attention + x``: under bf16 autocast with an fp32 gamma
    parameter of shape [1] (SAGAN's), fp32, the residual added in fp32 and its gradient passed
    to x unrounded. Gradients flow to q, k, v, x and gamma.

    The fused kernel never stores the [B, N, N_k] attention. ``return_attention=True`` returns
    ``(out, attention)`` and additionally computes the attention map with plain torch ops
    (O(N * N_k) memory, differentiable); ``out`` and its gradients still come from the kernel.

    >>> import torch, fastnote
    >>> q, k, v = torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 64, 16)
    >>> fastnote.sagan_attention(q, k, v, x=torch.randn(2, 64, 4, 4), gamma=torch.zeros(1)).shape
    torch.Size([2, 64, 4, 4])
    """
    _check(q, k, v, x, gamma)
    q, k, v = checks.autocast(q, k, v)
    if not (k.dtype == q.dtype and v.dtype == q.dtype):
        checks.same_dtype(q=q, k=k, v=v)
    if not backend.kernels_for(q, x, gamma):
        return reference.sagan_attention(q, k, v, x=x, gamma=gamma, return_attention=return_attention)
    out = _forward_op(q, k, v, x, gamma)[0]
    if return_attention:
        return out, _attention_map(q, k)
    return out
