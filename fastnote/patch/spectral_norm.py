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
            new = _parametrization_like(p, plist.original, fp._SpectralNorm)
            patcher.swap_in_list(plist, i, new, _join(path, f"parametrizations.{tensor_name}.{i}"),
                                 "torch.nn.utils.parametrizations.spectral_norm",
                                 "fastnote.nn.utils.parametrizations.spectral_norm")


def _parametrization_like(old: nn.Module, original: torch.Tensor, cls) -> nn.Module:
    # Built on a scratch copy of the weight with the generators forked (its constructor draws u, v
    # and warms them up), then handed the original's u and v tensors.
    devices = [original.device] if original.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        new = cls(original.detach().clone(), getattr(old, "n_power_iterations", 1), old.dim, old.eps)
    for name in ("_u", "_v"):
        if name in old._buffers:
            new._buffers[name] = old._buffers[name]
    return _mode_of(old, new)


register("spectral_norm", (_sagan_spectral_norm,), before_children=_patch_spectral_norm_in)
