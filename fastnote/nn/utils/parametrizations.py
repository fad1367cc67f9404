"""Drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` with the power iteration in the
fastnote kernel (docs/ops.md section 6.3).

Same state-dict keys (``parametrizations.weight.original``, ``parametrizations.weight.0._u``,
``..._v``) and semantics as torch's: u then v with the ``max`` rule, 15 warm-up iterations at
registration, iterations in training mode only (on the buffers in place), sigma from the stored
u and v in eval; a 1-D weight is simply L2-normalised.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ... import checks
from ...ops import power_iteration as _pi

__all__ = ["spectral_norm"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_WARMUP_ITERATIONS = 15


class _SpectralNorm(nn.Module):
    def __init__(self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12) -> None:
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(f"dim out of range: expected a value in [-{ndim}, {ndim - 1}], got {dim}")
        checks.integer("n_power_iterations", n_power_iterations, minimum=1)
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = checks.real("eps", eps, nonnegative=True)
        self._pool = _pi.OutputPool()
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            with torch.no_grad():
                mat = _pi.as_matrix(weight.detach(), self.dim)
                h, w = mat.shape
                # the same draws, in the same order, as torch's: equal seeds give equal u and v
                u = mat.new_empty(h).normal_(0, 1)
                v = mat.new_empty(w).normal_(0, 1)
                self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
                self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
                _pi.iterate_(mat, self._u, self._v, _WARMUP_ITERATIONS, self.eps, False, True)

    @classmethod
    def taking_over(cls, old: nn.Module) -> "_SpectralNorm":
        """This parametrization in the place of ``old`` (torch's ``_SpectralNorm``): the same
        settings and the same ``_u``/``_v`` tensors (not copies), nothing drawn or iterated."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim = old.dim
        new.eps = checks.real("eps", old.eps, nonnegative=True)
        new._pool = _pi.OutputPool()
        if hasattr(old, "n_power_iterations"):  # a weight of 2 or more dims
            new.n_power_iterations = checks.integer("n_power_iterations", old.n_power_iterations, minimum=1)
            new._buffers["_u"] = old._buffers["_u"]
            new._buffers["_v"] = old._buffers["_v"]
        return new

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        n = self.n_power_iterations if self.training else 0
        return _pi.spectral_weight(weight, self._u, self._v, self.dim, n, self.eps,
                                   add_rule=False, u_first=True, pool=self._pool)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}" + (
            f", n_power_iterations={self.n_power_iterations}" if hasattr(self, "n_power_iterations") else "")


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: Optional[int] = None) -> nn.Module:
    """Spectral normalization of ``module.<name>`` as a parametrization, as
    ``torch.nn.utils.parametrizations.spectral_norm`` does it. ``dim`` defaults to 1 for
    ConvTranspose and 0 otherwise. Returns the module.

    >>> import torch, fastnote
    >>> m = fastnote.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(20, 40))
    >>> m.parametrizations.weight[0]._u.shape
    torch.Size([40])
    """
    checks.module("module", module)
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"module {type(module).__name__} has no parameter or buffer named {name!r}")
    if dim is None:
        dim = 1 if isinstance(module, _TRANSPOSED) else 0
    elif isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    parametrize.register_parametrization(module, name, _SpectralNorm(weight, n_power_iterations, dim, eps))
    return module
