"""Drop-in for ``torch.nn.utils.spectral_norm`` / ``remove_spectral_norm`` (the forward-pre-hook
version), with the power iteration in the fastnote kernel (docs/ops.md section 6.3).

Same parameters and buffers (``weight_orig``, ``weight_u``, ``weight_v``), the same
``spectral_norm`` version entry in the state-dict metadata and the same load-time conversion of
version-0 checkpoints, so checkpoints move between torch's hook and this one in both directions.
Semantics as torch's: v then u with the ``max`` rule; iterations only in training mode, on the
buffers in place (DataParallel replicas share them); eval uses the stored u and v.

The hook class derives from torch's ``SpectralNorm``, so torch's own ``remove_spectral_norm`` and
its "two spectral_norm hooks on one parameter" check recognise it, and vice versa.
"""
from __future__ import annotations

import importlib
from typing import Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ... import checks
from ...ops import power_iteration as _pi

# the module, not the function torch.nn.utils re-exports under the same name
_torch_sn = importlib.import_module("torch.nn.utils.spectral_norm")

__all__ = ["SpectralNorm", "spectral_norm", "remove_spectral_norm"]

T_module = TypeVar("T_module", bound=nn.Module)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class SpectralNorm(_torch_sn.SpectralNorm):
    """torch's spectral-norm hook with the iteration and ``W / sigma`` from fastnote."""

    def __init__(self, name: str = "weight", n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12) -> None:
        super().__init__(name, n_power_iterations, dim, eps)
        self._pool = _pi.OutputPool()

    def _tensors(self, module: nn.Module):
        # straight from the module's dicts (what Module.__getattr__ would find, several times
        # cheaper per call); getattr covers anything unusual, e.g. a subclass's property
        name = self.name
        try:
            return (module._parameters[name + "_orig"], module._buffers[name + "_u"],
                    module._buffers[name + "_v"])
        except KeyError:
            return getattr(module, name + "_orig"), getattr(module, name + "_u"), getattr(module, name + "_v")

    def _weight(self, module: nn.Module, do_power_iteration: bool, pool) -> torch.Tensor:
        weight, u, v = self._tensors(module)
        if weight.is_complex():
            # torch's hook iterates with W^T and an unconjugated dot here, unlike the
            # parametrization (W^H): its own code keeps its numbers
            return super().compute_weight(module, do_power_iteration)
        return _pi.spectral_weight(weight, u, v, self.dim, self.n_power_iterations if do_power_iteration else 0,
                                   self.eps, False, False, pool)

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> torch.Tensor:
        # a fresh tensor: callers other than the hook (remove, user code) keep what they get
        return self._weight(module, do_power_iteration, None)

    def __call__(self, module: nn.Module, inputs) -> None:
        # What Module.__setattr__ does for a plain tensor attribute, without its checks (setattr
        # costs ~2.5 us a call here, a tenth of a small layer's whole forward). The module's
        # reference to the last result is dropped first, so the pool can reuse its buffer. Item
        # assignments only: torch.compile traces them on torch 2.11 too, whose dynamo cannot trace
        # ``module.__dict__.pop`` or ``del module.__dict__[k]``.
        attrs = module.__dict__
        attrs[self.name] = None
        attrs[self.name] = self._weight(module, module.training, self._pool)

    @staticmethod
    def apply(module: nn.Module, name: str, n_power_iterations: int, dim: int, eps: float) -> "SpectralNorm":
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, _torch_sn.SpectralNorm) and hook.name == name:
                raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name}")
        fn = SpectralNorm(name, n_power_iterations, dim, eps)
        weight = module._parameters.get(name)
        if weight is None:
            raise ValueError(f"spectral_norm: module {type(module).__name__} has no parameter {name!r} "
                             "(or it is None)")
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError("spectral_norm: the module has uninitialized parameters; run a dummy forward "
                             "through it before applying spectral normalization")
        with torch.no_grad():
            h, w = fn.reshape_weight_to_matrix(weight).shape
            # the same draws, in the same order, as torch's hook: equal seeds give equal u and v
            u = F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=fn.eps)
            v = F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=fn.eps)
        delattr(module, fn.name)
        module.register_parameter(fn.name + "_orig", weight)
        setattr(module, fn.name, weight.data)
        module.register_buffer(fn.name + "_u", u)
        module.register_buffer(fn.name + "_v", v)
        module.register_forward_pre_hook(fn)
        module._register_state_dict_hook(_torch_sn.SpectralNormStateDictHook(fn))
        module._register_load_state_dict_pre_hook(_torch_sn.SpectralNormLoadStateDictPreHook(fn))
        return fn


def spectral_norm(module: T_module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: Optional[int] = None) -> T_module:
    """Spectral normalization of ``module.<name>`` as ``torch.nn.utils.spectral_norm`` does it:
    before every forward, ``weight = weight_orig / sigma(weight_orig)``, sigma from
    ``n_power_iterations`` of power iteration (training mode only) on the buffers ``weight_u``,
    ``weight_v``. ``dim`` defaults to 1 for ConvTranspose and 0 otherwise. Returns the module.

    >>> import torch, fastnote
    >>> m = fastnote.nn.utils.spectral_norm(torch.nn.Linear(20, 40))
    >>> sorted(k for k, _ in m.named_buffers())
    ['weight_u', 'weight_v']
    """
    checks.module("module", module)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    checks.integer("n_power_iterations", n_power_iterations, minimum=1)
    eps = checks.real("eps", eps, nonnegative=True)
    if dim is None:
        dim = 1 if isinstance(module, _TRANSPOSED) else 0
    elif isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    SpectralNorm.apply(module, name, n_power_iterations, dim, eps)
    return module


def remove_spectral_norm(module: T_module, name: str = "weight") -> T_module:
    """Undo ``spectral_norm`` (this one or torch's): ``module.<name>`` becomes a plain parameter
    holding the current normalised weight (computed from the stored u and v, no iteration)."""
    return _torch_sn.remove_spectral_norm(module, name)
