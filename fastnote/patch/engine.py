"""The walk and the undo records of ``fastnote.patch`` / ``fastnote.unpatch``.

``patch`` visits every module of the model, depth first. On each module it runs the ``before_children``
pass of every wanted family (hooks and parametrizations the module holds, siblings fused into
one), then, on each child that is not already fastnote's, the wanted families' converters in
registration order (``registry``): the first that claims the child replaces it, switches its
class, or leaves it with a reason. A child no converter claims goes to the reporters (modules that
look like a candidate, reported as left). Then the walk goes on into the child (or its
replacement), except into the children a fused block reads itself (``_fastnote_fused_children``).

Every change leaves an undo record on the model (``_UNDO_ATTR``), numbered in the order made;
``unpatch`` undoes them in reverse order. This module names no family.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import FrozenSet, List, Optional, Sequence, Tuple

from torch import nn

from . import registry
from .probe import _hooked, _is_fastnote, _join, _transfer_hooks
from .registry import Site
from .report import Left, PatchReport, Replaced, _display

__all__ = ["patch", "unpatch"]

_UNDO_ATTR = "_fastnote_patches"
_ORDER = itertools.count()


# ------------------------------------------------------------------------------------------------
# Undo records
# ------------------------------------------------------------------------------------------------

def _adopt_state(original: nn.Module, current: nn.Module) -> None:
    """Give ``original`` the parameter and buffer objects ``current`` holds under the same names
    (the same objects unless ``model.to`` or a load replaced some since patching)."""
    now = dict(current.named_parameters(remove_duplicate=False))
    now_buffers = dict(current.named_buffers(remove_duplicate=False))
    for name, p in list(original.named_parameters(remove_duplicate=False)):
        q = now.get(name)
        if q is not None and q is not p:
            owner, _, leaf = name.rpartition(".")
            original.get_submodule(owner)._parameters[leaf] = q
    for name, b in list(original.named_buffers(remove_duplicate=False)):
        c = now_buffers.get(name)
        if c is not None and c is not b:
            owner, _, leaf = name.rpartition(".")
            original.get_submodule(owner)._buffers[leaf] = c


@dataclasses.dataclass
class _ChildSwap:
    parent: nn.Module
    name: str
    original: nn.Module
    new: nn.Module
    path: str

    def undo(self) -> Optional[str]:
        if self.parent._modules.get(self.name) is not self.new:
            return None  # replaced again since: leave it
        _adopt_state(self.original, self.new)
        self.original.train(self.new.training)
        self.parent._modules[self.name] = self.original
        return f"{self.path}: {_display(type(self.new))} -> {type(self.original).__name__}"


@dataclasses.dataclass
class _ClassSwap:
    module: nn.Module
    original: type
    new: type
    path: str

    def undo(self) -> Optional[str]:
        if type(self.module) is not self.new:
            return None  # switched again since: leave it
        self.module.__class__ = self.original   # the same object: its state and plain attributes as they are now
        return f"{self.path}: {_display(self.new)} -> {self.original.__name__}"


@dataclasses.dataclass
class _HookSwap:
    module: nn.Module
    hook_id: int
    original: object
    new: object
    holders: list          # objects holding the hook as their ``fn`` (torch's state_dict hooks)
    path: str
    old_name: str
    new_name: str

    def undo(self) -> Optional[str]:
        if self.module._forward_pre_hooks.get(self.hook_id) is not self.new:
            return None
        self.module._forward_pre_hooks[self.hook_id] = self.original
        for h in self.holders:
            h.fn = self.original
        return f"{self.path}: {self.new_name} -> {self.old_name}"


@dataclasses.dataclass
class _ListSwap:
    plist: nn.ModuleList
    index: int
    original: nn.Module
    new: nn.Module
    path: str
    old_name: str
    new_name: str

    def undo(self) -> Optional[str]:
        if self.plist[self.index] is not self.new:
            return None
        _adopt_state(self.original, self.new)
        self.original.train(self.new.training)
        self.plist[self.index] = self.original
        return f"{self.path}: {self.new_name} -> {self.old_name}"


# ------------------------------------------------------------------------------------------------
# The walk
# ------------------------------------------------------------------------------------------------

def _fused_children_hooked(module: nn.Module, cls: type) -> Optional[str]:
    """Why ``module`` cannot be switched to the fused ``cls``, whose forward reads the children
    named in ``_fastnote_fused_children`` instead of calling them: one of them, or a module in
    one, holds a hook that would stop running. None when none does."""
    for name in getattr(cls, "_fastnote_fused_children", ()):
        child = getattr(module, name, None)
        hooked = _hooked(child) if isinstance(child, nn.Module) else None
        if hooked is not None:
            where = f"{name}.{hooked}" if hooked else name
            return (f"{where!r} holds a forward or backward hook (an attention-map hook, a user's): the "
                    f"fused path reads {name}'s parameters and calls none of its modules, so the hook would stop "
                    "running")
    return None


class _Patcher:
    """One ``patch`` call: the families wanted, the report, the undo records. The families'
    ``before_children`` passes and converters act on the model only through its methods."""

    def __init__(self, wanted):
        self.wanted = wanted
        self.report = PatchReport()
        self.records: list = []

    def wants(self, kind: str) -> bool:
        return kind in self.wanted

    def undo(self) -> None:
        """Undo this call's changes, newest first (patch failed or found the wrong count)."""
        for _, rec in reversed(self.records):
            rec.undo()
        self.records.clear()

    def record(self, rec) -> None:
        self.records.append((next(_ORDER), rec))

    def replaced(self, entry: Replaced) -> None:
        self.report.replaced.append(entry)

    def left(self, path: str, kind: str, reason: str) -> None:
        self.report.left.append(Left(path, kind, reason))

    def swap(self, parent: nn.Module, name: str, new: nn.Module, path: str, note: str = "") -> None:
        """Put ``new`` in the place of ``parent``'s child ``name``; the child's own forward and
        backward hooks go with it (the converters leave modules whose submodules hold hooks)."""
        old = parent._modules[name]
        _transfer_hooks(old, new)
        parent._modules[name] = new
        self.record(_ChildSwap(parent, name, old, new, path))
        self.replaced(Replaced(path, type(old).__name__, _display(type(new)), note))

    def reclass(self, module: nn.Module, cls: type, path: str, note: str = "") -> nn.Module:
        """Switch ``module``'s class to ``cls`` (a subclass of its own) in place: no copy, so
        whatever changes the module later (timm's ``set_input_size``) changes what unpatch restores."""
        old = type(module)
        module.__class__ = cls
        self.record(_ClassSwap(module, old, cls, path))
        self.replaced(Replaced(path, old.__name__, _display(cls), note))
        return module

    def swap_hook(self, module: nn.Module, hook_id: int, new, holders: list, path: str, old_name: str,
                  new_name: str) -> None:
        """Put ``new`` in the place of ``module``'s forward pre-hook ``hook_id``, and in the
        ``holders`` that refer to that hook as their ``fn``."""
        old = module._forward_pre_hooks[hook_id]
        module._forward_pre_hooks[hook_id] = new
        for h in holders:
            h.fn = new
        self.record(_HookSwap(module, hook_id, old, new, holders, path, old_name, new_name))
        self.replaced(Replaced(path, old_name, new_name))

    def swap_in_list(self, modules: nn.ModuleList, index: int, new: nn.Module, path: str, old_name: str,
                     new_name: str) -> None:
        """Put ``new`` in the place of ``modules[index]`` (an entry of a parametrization list)."""
        old = modules[index]
        modules[index] = new
        self.record(_ListSwap(modules, index, old, new, path, old_name, new_name))
        self.replaced(Replaced(path, old_name, new_name))

    def convert(self, parent: nn.Module, name: str, child: nn.Module, path: str
                ) -> Tuple[Optional[nn.Module], bool]:
        """(the child's replacement or None, whether a wanted converter claimed the child)."""
        site = Site(parent, name, path, self)
        for family in registry.families():
            if family.kind not in self.wanted:
                continue
            for convert in family.converters:
                result = convert(child, site)
                if isinstance(result, str):
                    self.left(path, family.kind, result)
                    return None, True
                if result is not None:
                    new, note = result
                    if isinstance(new, type):   # the same module, its class switched
                        reason = _fused_children_hooked(child, new)
                        if reason is not None:
                            self.left(path, family.kind, reason)
                            return None, True
                        return self.reclass(child, new, path, note), True
                    self.swap(parent, name, new, path, note)
                    return new, True
        return None, False

    def report_unclaimed(self, parent: nn.Module, name: str, child: nn.Module, path: str, claimed: bool,
                         quiet: FrozenSet[str]) -> FrozenSet[str]:
        """Run the reporters on a child left in place; returns the reporters that stay quiet
        inside it (one entry per module: its descendants are not reported by the same one)."""
        site = Site(parent, name, path, self)
        for reporter in registry.reporters():
            if not any(k in self.wanted for k in reporter.families):
                continue
            reason = reporter.check(child)
            if reason is None:
                continue
            if not claimed and reporter.kind not in quiet and not self._claimed_by_unwanted(child, site, reporter):
                self.left(path, reporter.kind, reason)
            quiet = quiet | {reporter.kind}
        return quiet

    def _claimed_by_unwanted(self, child: nn.Module, site: Site, reporter: registry.Reporter) -> bool:
        # Recognised by a family that ``include`` leaves out: excluded, not unrecognised.
        return any(convert(child, site) is not None for family in registry.families()
                   if family.kind in reporter.families and family.kind not in self.wanted
                   for convert in family.converters)

    def visit(self, parent: nn.Module, prefix: str, quiet: FrozenSet[str] = frozenset()) -> None:
        for family in registry.families():
            if family.before_children is not None and family.kind in self.wanted:
                family.before_children(parent, prefix, self)
        used_by_parent = getattr(parent, "_fastnote_fused_children", ())   # a fused block reads these itself
        for name, child in list(parent._modules.items()):
            if child is None or name in used_by_parent:
                continue
            path = _join(prefix, name)
            new, inner_quiet = None, quiet
            if not _is_fastnote(child):
                new, claimed = self.convert(parent, name, child, path)
                if new is None:
                    inner_quiet = self.report_unclaimed(parent, name, child, path, claimed, quiet)
            self.visit(new if new is not None else child, path, inner_quiet)


def patch(model: nn.Module, include: Optional[Sequence[str]] = None, expect: Optional[int] = None) -> PatchReport:
    """Replace, in place, every submodule of ``model`` that fastnote has a drop-in for (the
    docstring of the ``fastnote/patch/__init__.py`` module lists them), keeping parameters (the same objects),
    buffers, device, dtype, train/eval mode and state_dict keys.

    include: families to replace, among ``fastnote.patch.KINDS`` (default: all). expect: raise
    RuntimeError unless exactly this many replacements are found, leaving the model unpatched.
    Returns a ``PatchReport``. All or nothing: an error part way undoes what was done before it
    is raised. Patching twice replaces nothing more; ``fastnote.unpatch(model)`` undoes it.
    """
    kinds = registry.kinds()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if include is not None and (isinstance(include, str) or not all(isinstance(k, str) for k in include)):
        raise TypeError(f"include must be a list of family names, got {include!r}")
    wanted = set(kinds if include is None else include)
    unknown = wanted - set(kinds)
    if unknown:
        raise ValueError(f"include must name families among {list(kinds)}, got {sorted(unknown)}")
    if expect is not None and (isinstance(expect, bool) or not isinstance(expect, int)):
        raise TypeError(f"expect must be an int or None, got {type(expect).__name__}")
    patcher = _Patcher(wanted)
    try:
        patcher.visit(model, "")
    except BaseException:
        patcher.undo()   # all or nothing: a failure part way leaves the model as it was
        raise
    report = patcher.report
    if expect is not None and len(report) != expect:
        patcher.undo()
        raise RuntimeError(f"patch expected to replace {expect} modules, found {len(report)} (the model is left "
                           f"unpatched):\n{report}")
    if patcher.records:
        model.__dict__.setdefault(_UNDO_ATTR, []).extend(patcher.records)
    return report


def unpatch(model: nn.Module) -> List[str]:
    """Undo ``fastnote.patch`` on ``model`` (and on any submodule patched on its own): the original
    modules, hooks and parametrizations go back, holding the parameter and buffer objects the
    patched model holds now, so what was learned since patching is kept. Returns
    ``["<path>: New -> Old"]``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    records = []
    for m in list(model.modules()):
        records.extend(m.__dict__.pop(_UNDO_ATTR, []))
    done = []
    for _, rec in sorted(records, key=lambda r: r[0], reverse=True):
        line = rec.undo()
        if line is not None:
            done.append(line)
    return done[::-1]
