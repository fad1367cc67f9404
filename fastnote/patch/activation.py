"""``Hardswish`` and ``Hardsigmoid``: ``nn.Hardswish`` / ``nn.Hardsigmoid`` (the classes
themselves, not subclasses) -> ``fastnote.nn.Hardswish`` / ``fastnote.nn.Hardsigmoid``."""
from __future__ import annotations

from torch import nn

from .. import nn as fnn
from .probe import _mode_of
from .registry import Result, Site, register


def _activation(old: nn.Module, new_cls) -> Result:
    return _mode_of(old, new_cls(getattr(old, "inplace", False))), ""


def _hardswish(old: nn.Module, site: Site) -> Result:
    return _activation(old, fnn.Hardswish) if type(old) is nn.Hardswish else None


def _hardsigmoid(old: nn.Module, site: Site) -> Result:
    return _activation(old, fnn.Hardsigmoid) if type(old) is nn.Hardsigmoid else None


register("Hardswish", (_hardswish,))
register("Hardsigmoid", (_hardsigmoid,))
