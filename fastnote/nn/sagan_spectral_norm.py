"""SAGAN's ``SpectralNorm`` wrapper module (docs/ops.md section 6.3), with the power iteration in the
fastnote kernel.

Same parameters as SAGAN's spectral.py: the wrapped module gets ``<name>_u``, ``<name>_v``
(Parameters with requires_grad=False) and ``<name>_bar`` (the raw weight), and loses
``<name>``; a state dict therefore holds ``module.weight_u``, ``module.weight_v``,
``module.weight_bar``. Every forward, in training and eval alike, runs ``power_iterations`` of
``v = l2normalize(W^T u)``, ``u = l2normalize(W v)`` with ``l2normalize(a) = a / (||a|| + 1e-12)``
on the matrix ``W = weight_bar.view(h, -1)`` (h = size of dim 0, ConvTranspose included), then
sets ``module.<name> = weight_bar / sigma`` with ``sigma = u . (W v)`` and calls
``module.forward`` (not ``module(...)``: the wrapped module's own hooks do not run, as in SAGAN).

One deliberate difference: SAGAN replaces ``u.data``/``v.data``, so when two forwards share one
backward (``D(real) - D(fake)``) its first forward's gradient silently uses the second forward's
u and v. Here each forward's gradient uses the u and v that forward computed (as torch's hooks
do); a single forward and backward gives identical results. When ``<name>_u`` or ``<name>_v``
requires grad (a training loop that sets requires_grad on every parameter), SAGAN's sigma gives
them gradients: then the wrapper takes SAGAN's own steps, ``.data`` replacement included.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..ops import power_iteration as _pi

__all__ = ["SpectralNorm"]

_EPS = 1e-12


def _l2normalize(a: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    return a / (a.norm() + eps)


class SpectralNorm(nn.Module):
    """SAGAN's ``SpectralNorm(module, name="weight", power_iterations=1)``: wraps ``module`` so that
    every forward (training and eval) runs ``power_iterations`` of power iteration on
    ``<name>_u``/``<name>_v`` and calls ``module.forward`` with ``<name> = <name>_bar / sigma``.
    The parameters and state_dict keys are SAGAN's (``module.weight_u``, ``module.weight_v``,
    ``module.weight_bar``); a module that already has them is taken as it is (nothing drawn).

    >>> import torch, fastnote
    >>> conv = fastnote.nn.SpectralNorm(torch.nn.Conv2d(3, 8, 3))
    >>> sorted(conv.state_dict())
    ['module.bias', 'module.weight_bar', 'module.weight_u', 'module.weight_v']
    >>> conv(torch.randn(1, 3, 5, 5)).shape
    torch.Size([1, 8, 3, 3])
    """

    def __init__(self, module: nn.Module, name: str = "weight", power_iterations: int = 1) -> None:
        super().__init__()
        checks.module("module", module)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.module = module
        self.name = name
        self.power_iterations = checks.integer("power_iterations", power_iterations, minimum=0)
        self._pool = _pi.OutputPool()
        if not self._made_params():
            self._make_params()

    def _made_params(self) -> bool:
        return all(hasattr(self.module, self.name + s) for s in ("_u", "_v", "_bar"))

    def _make_params(self) -> None:
        w = getattr(self.module, self.name, None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"module {type(self.module).__name__} has no parameter named {self.name!r}")
        height = w.shape[0]
        width = w.reshape(height, -1).shape[1]
        with torch.no_grad():
            # SAGAN's draws, in its order: u then v, N(0, 1), then l2normalize
            u = nn.Parameter(_l2normalize(w.detach().new_empty(height).normal_(0, 1)), requires_grad=False)
            v = nn.Parameter(_l2normalize(w.detach().new_empty(width).normal_(0, 1)), requires_grad=False)
        w_bar = nn.Parameter(w.detach())
        del self.module._parameters[self.name]
        self.module.register_parameter(self.name + "_u", u)
        self.module.register_parameter(self.name + "_v", v)
        self.module.register_parameter(self.name + "_bar", w_bar)

    def _update_u_v(self) -> None:
        # What Module.__setattr__ does for a plain tensor attribute, without its checks. The
        # module's reference to the last result is dropped first, so the pool can reuse its
        # buffer. Item assignments only: torch.compile traces them on torch 2.11 too, whose dynamo
        # cannot trace ``module.__dict__.pop``.
        attrs = self.module.__dict__
        attrs[self.name] = None
        w = getattr(self.module, self.name + "_bar")
        u = getattr(self.module, self.name + "_u")
        v = getattr(self.module, self.name + "_v")
        if (u.requires_grad or v.requires_grad) and torch.is_grad_enabled():
            attrs[self.name] = self._weight_differentiating_u_v(w, u, v)
            return
        attrs[self.name] = _pi.spectral_weight(w, u, v, 0, self.power_iterations, _EPS,
                                               add_rule=True, u_first=False, pool=self._pool)

    def _weight_differentiating_u_v(self, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # A training loop that turns requires_grad on for every parameter (pix2pix's
        # set_requires_grad) makes SAGAN's sigma = u . (W v) give u and v gradients, which its
        # optimiser then applies: SAGAN's own steps, its ``.data`` replacements included.
        height = w.shape[0]
        with torch.no_grad():
            u_new = u.detach().clone(memory_format=torch.contiguous_format)
            v_new = v.detach().clone(memory_format=torch.contiguous_format)
            _pi.iterate_(w.detach().reshape(height, -1), u_new, v_new, self.power_iterations, _EPS,
                         add_rule=True, u_first=False)
        u.data = u_new
        v.data = v_new
        return w / u.dot(w.reshape(height, -1).mv(v))

    def forward(self, *args, **kwargs):
        self._update_u_v()
        return self.module.forward(*args, **kwargs)
