"""The families ``fastnote.patch`` knows, in one registry.

Each family module (``squeeze_excitation``, ``window_attention``,
``self_attention``, ``spectral_norm``) calls ``register`` when imported; the package imports them in
a fixed order, which is the order of ``KINDS`` and the order in which the walk tries the
converters on a module. The engine knows families only through this registry.

A family has:

- ``converters``: functions ``(module, site) -> Result`` tried on every module the walk reaches:
  ``None`` (not a candidate), a ``str`` (a candidate left as it is, for that reason), or
  ``(new, note)``: a module to put in its place, or a class (a subclass of the module's own) to
  switch the module itself to. ``site`` says where the module sits (``Site``).
- ``before_children``: ``(module, path, patcher)``, run on every module before its children are
  visited, for changes that are not a one-for-one module swap: hooks and parametrizations held by
  the module, or two siblings fused into one. ``patcher`` is the engine's ``_Patcher`` (its
  ``wants``, ``swap``, ``swap_hook``, ``swap_in_list``, ``left`` methods).

A ``Reporter`` reports modules that look like a candidate of some families but that no converter
claimed (``attention_like``): they go under "left" instead of being passed over silently.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, Union

from torch import nn

if TYPE_CHECKING:
    from .engine import _Patcher

Result = Union[None, str, Tuple[Union[nn.Module, type], str]]


@dataclasses.dataclass(frozen=True)
class Site:
    """Where the module a converter looks at sits: its parent, its name there, its path in the model."""
    parent: nn.Module
    name: str
    path: str
    patcher: "_Patcher"

    def wants(self, kind: str) -> bool:
        """Whether family ``kind`` is being patched (``include``)."""
        return self.patcher.wants(kind)

    def left(self, kind: str, reason: str) -> None:
        """Report something at this path as left (besides what the converter returns)."""
        self.patcher.left(self.path, kind, reason)


Converter = Callable[[nn.Module, Site], Result]
BeforeChildren = Callable[[nn.Module, str, "_Patcher"], None]


@dataclasses.dataclass(frozen=True)
class Family:
    kind: str
    converters: Tuple[Converter, ...] = ()
    before_children: Optional[BeforeChildren] = None


@dataclasses.dataclass(frozen=True)
class Reporter:
    """``check(module) -> reason or None``: a module that looks like a candidate of ``families``;
    reported under ``kind`` when one of them is patched and no family's converter claims it. The
    module's descendants are not reported again by the same reporter."""
    kind: str
    families: Tuple[str, ...]
    check: Callable[[nn.Module], Optional[str]]


_FAMILIES: List[Family] = []
_REPORTERS: List[Reporter] = []


def register(kind: str, converters: Tuple[Converter, ...] = (), before_children: Optional[BeforeChildren] = None
             ) -> None:
    if any(f.kind == kind for f in _FAMILIES):
        raise ValueError(f"fastnote.patch: family {kind!r} registered twice")
    _FAMILIES.append(Family(kind, tuple(converters), before_children))


def register_reporter(kind: str, families: Tuple[str, ...], check: Callable[[nn.Module], Optional[str]]) -> None:
    _REPORTERS.append(Reporter(kind, tuple(families), check))


def families() -> Tuple[Family, ...]:
    return tuple(_FAMILIES)


def reporters() -> Tuple[Reporter, ...]:
    return tuple(_REPORTERS)


def kinds() -> Tuple[str, ...]:
    """The family names, in registration order (``fastnote.patch.KINDS``)."""
    return tuple(f.kind for f in _FAMILIES)
