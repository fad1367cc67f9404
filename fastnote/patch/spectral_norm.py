"""Spectral norm, three ways, each continuing on the same u and v tensors (training goes on
exactly where it was):

- SAGAN's ``SpectralNorm`` wrapper (``module``, ``name``, ``power_iterations``,
  ``<name>_u/_v/_bar`` on the wrapped module) -> ``fastnote.nn.SpectralNorm``.
- torch's hook (``torch.nn.utils.spectral_norm``): the module stays, its forward pre-hook (and the
  state_dict hooks holding it) becomes fastnote's.
- torch's parametrization (``torch.nn.utils.parametrizations.spectral_norm``): the entry in the
  module's parametrization list becomes fastnote's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import checks
from .. import nn as fnn
from .probe import _is_fastnote, _join, _mode_of
from .registry import Result, Site, register


def _sagan_spectral_norm(old: nn.Module, site: Optional[Site] = None) -> Result:
    inner, name, n = getattr(old, "module", None), getattr(old, "name", None), getattr(old, "power_iterations", None)
    if _is_fastnote(old) or not isinstance(inner, nn.Module) or not isinstance(name, str) \
            or isinstance(n, bool) or not isinstance(n, int):
        return None
    params = inner._parameters
    if not all(isinstance(params.get(name + s), torch.Tensor) for s in ("_u", "_v", "_bar")) or name in params:
        return None
    if set(old._parameters) or set(old._buffers) or set(old._modules) != {"module"}:
        return "SAGAN SpectralNorm-shaped, but the wrapper holds more than the wrapped module"
    new = fnn.SpectralNorm(inner, name, n)  # finds <name>_u/_v/_bar: draws nothing
    return _mode_of(old, new), ""


def _torch_sn_hook_module():
    import importlib

    return importlib.import_module("torch.nn.utils.spectral_norm")


def _patch_spectral_norm_in(module: nn.Module, path: str, patcher) -> None:
    import importlib

    tsn = _torch_sn_hook_module()
    fsn_hook = importlib.import_module("fastnote.nn.utils.spectral_norm")

    for hid, hook in list(module._forward_pre_hooks.items()):
        if type(hook) is tsn.SpectralNorm:
            reason = _unsupported(hook)
            if reason:
                patcher.left(_join(path, hook.name), "spectral_norm", reason)
                continue
            new = fsn_hook.SpectralNorm(hook.name, hook.n_power_iterations, hook.dim, hook.eps)
            holders = [h for h in module._state_dict_hooks.values() if getattr(h, "fn", None) is hook]
            holders += [getattr(h, "hook", h) for h in module._load_state_dict_pre_hooks.values()
                        if getattr(getattr(h, "hook", h), "fn", None) is hook]
            patcher.swap_hook(module, hid, new, holders, _join(path, hook.name),
                              "torch.nn.utils.spectral_norm", "fastnote.nn.utils.spectral_norm")
    plists = getattr(module, "parametrizations", None)
    if not isinstance(plists, nn.ModuleDict):
        return
    from torch.nn.utils import parametrizations as tp

    from ..nn.utils import parametrizations as fp

    for tensor_name, plist in plists.items():
        for i, p in enumerate(list(plist)):
            if type(p) is not tp._SpectralNorm:
                continue
            entry = _join(path, f"parametrizations.{tensor_name}.{i}")
            reason = _unsupported(p)
            if reason:
                patcher.left(entry, "spectral_norm", reason)
                continue
            # the same u and v tensors, nothing drawn: also where the list holds no single
            # ``original`` (a parametrization before it, e.g. weight_norm, returns several tensors)
            new = _mode_of(p, fp._SpectralNorm.taking_over(p))
            patcher.swap_in_list(plist, i, new, entry, "torch.nn.utils.parametrizations.spectral_norm",
                                 "fastnote.nn.utils.parametrizations.spectral_norm")


def _unsupported(sn) -> str:
    """Why torch's spectral norm ``sn`` (hook or parametrization) stays torch's, or ""."""
    eps = getattr(sn, "eps", None)
    try:
        checks.real("eps", eps, nonnegative=True)
    except (TypeError, ValueError) as e:
        return f"eps={eps!r}: fastnote's power iteration refuses it ({e})"
    return ""


register("spectral_norm", (_sagan_spectral_norm,), before_children=_patch_spectral_norm_in)
