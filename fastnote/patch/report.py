"""What ``fastnote.patch`` returns: ``PatchReport``, a sequence of ``Replaced`` entries with the
``Left`` ones beside it."""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Dict, Iterator, List, Sequence, Tuple

from torch import nn

from .. import nn as fnn


@dataclasses.dataclass(frozen=True)
class Replaced:
    path: str
    old: str
    new: str
    note: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.old} -> {self.new}"


@dataclasses.dataclass(frozen=True)
class Left:
    path: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.kind}): {self.reason}"


def _paths(paths: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... (+{len(paths) - limit})" if len(paths) > limit else "")


def _display(cls: type) -> str:
    """A class as the report names it: ``fastnote.nn.X`` for fastnote's public modules."""
    if cls is nn.Identity:
        return "torch.nn.Identity"
    if getattr(fnn, cls.__name__, None) is cls:
        return f"fastnote.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


class PatchReport(Sequence[str]):
    """What ``patch`` did. As a sequence: the replaced entries as ``"<path>: Old -> New"``
    strings (so ``report == [...]`` and ``len(report)`` work as they did on the plain list).
    ``replaced``: the entries as ``Replaced`` records (with a note where one applies); ``left``:
    ``Left`` records of candidates not replaced, each with its reason. ``print(report)`` groups
    both."""

    def __init__(self, replaced: Sequence[Replaced] = (), left: Sequence[Left] = ()):
        self.replaced: List[Replaced] = list(replaced)
        self.left: List[Left] = list(left)

    def __len__(self) -> int:
        return len(self.replaced)

    def __getitem__(self, i):
        lines = [str(r) for r in self.replaced]
        return lines[i]

    def __iter__(self) -> Iterator[str]:
        return (str(r) for r in self.replaced)

    def __eq__(self, other) -> bool:
        if isinstance(other, PatchReport):
            return self.replaced == other.replaced and self.left == other.left
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def counts(self) -> Dict[str, int]:
        """``{"Old -> New": number of replacements}``."""
        return dict(Counter(f"{r.old} -> {r.new}" for r in self.replaced))

    def __repr__(self) -> str:
        return f"PatchReport(replaced={len(self.replaced)}, left={len(self.left)})"

    def __str__(self) -> str:
        lines = [f"fastnote.patch: {len(self.replaced)} replaced, {len(self.left)} left"]
        groups: Dict[Tuple[str, str, str], List[str]] = {}
        for r in self.replaced:
            groups.setdefault((r.old, r.new, r.note), []).append(r.path)
        for (old, new, note), paths in groups.items():
            lines.append(f"  {len(paths)} x {old} -> {new}  ({_paths(paths)})")
            if note:
                lines.append(f"      note: {note}")
        left: Dict[Tuple[str, str], List[str]] = {}
        for e in self.left:
            left.setdefault((e.kind, e.reason), []).append(e.path)
        for (kind, reason), paths in left.items():
            lines.append(f"  left {len(paths)} x {kind} ({_paths(paths)}): {reason}")
        return "\n".join(lines)
