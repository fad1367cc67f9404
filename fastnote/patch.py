"""Swap eager modules in an existing model for fastnote ones, in place.

>>> import torch, fastnote
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Hardswish())
>>> fastnote.patch(model)
['1: Hardswish -> fastnote.nn.Hardswish']

Every replacement keeps the module's parameters and buffers (its state_dict loads strictly into
the new module), device and dtype, and is listed in the returned report, so a patch that stops
applying (a renamed class upstream) shows as an empty or shorter list instead of passing
silently: pass ``expect`` to turn that into an error.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from . import nn as fnn

Converter = Callable[[nn.Module], Optional[nn.Module]]


def _same_state(old: nn.Module, new: nn.Module) -> nn.Module:
    new.load_state_dict(old.state_dict(), strict=True)
    ref = next(iter(old.parameters()), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    return new


def _activation(old: nn.Module, new_cls) -> nn.Module:
    return new_cls(getattr(old, "inplace", False))


def _squeeze_excitation(old: nn.Module) -> Optional[nn.Module]:
    # torchvision.ops.SqueezeExcitation (matched by name and structure: torchvision is optional).
    if not all(isinstance(getattr(old, a, None), nn.Conv2d) for a in ("fc1", "fc2")):
        return None
    try:
        new = fnn.SqueezeExcitation(old.fc1.in_channels, old.fc1.out_channels,
                                    activation=type(old.activation), scale_activation=type(old.scale_activation))
    except (AttributeError, ValueError):
        return None  # an activation fastnote has no kernel for: leave the module alone
    return _same_state(old, new)


# Class name -> converter. A converter returns None when the module does not fit after all.
CONVERTERS: Dict[str, Tuple[type, Converter]] = {
    "Hardswish": (nn.Hardswish, lambda m: _activation(m, fnn.Hardswish)),
    "Hardsigmoid": (nn.Hardsigmoid, lambda m: _activation(m, fnn.Hardsigmoid)),
    "SqueezeExcitation": (nn.Module, _squeeze_excitation),
}


def patch(model: nn.Module, *, include: Optional[List[str]] = None, expect: Optional[int] = None) -> List[str]:
    """Replace, in place, every submodule of ``model`` that fastnote has a drop-in for.

    include: class names to replace (default: all of ``CONVERTERS``). expect: raise RuntimeError
    unless exactly this many modules were replaced. Returns ``["<path>: Old -> fastnote.nn.New"]``.
    """
    wanted = set(CONVERTERS if include is None else include)
    unknown = wanted - set(CONVERTERS)
    if unknown:
        raise ValueError(f"include must name classes among {sorted(CONVERTERS)}, got {sorted(unknown)}")
    report: List[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            cls = type(child)
            entry = CONVERTERS.get(cls.__name__) if cls.__name__ in wanted else None
            new = None
            if entry is not None and not cls.__module__.startswith("fastnote.") and isinstance(child, entry[0]):
                new = entry[1](child)
            if new is None:
                visit(child, path)  # only modules left in place are searched further
                continue
            setattr(parent, name, new)
            report.append(f"{path}: {cls.__name__} -> fastnote.nn.{type(new).__name__}")

    visit(model, "")
    if expect is not None and len(report) != expect:
        raise RuntimeError(f"patch expected to replace {expect} modules, replaced {len(report)}: {report}")
    return report
