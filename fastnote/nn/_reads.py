"""The submodules a fused forward reads the parameters of without calling them.

A fused Swin block (timm's, spandrel's, Hugging Face's, fastnote's own shifted window attention)
passes ``attn.qkv.weight`` and the like to one kernel: it never calls ``attn``, ``attn.qkv`` or
``attn.proj``. That computes what those modules compute only while each still has the forward the
fused maths is written from (``nn.Linear.forward``, the library's attention) and holds no hook.
``fastnote.patch`` checks this when it patches; ``intact`` checks it again on every call, because a
model is often changed after patching: peft's ``get_peft_model`` puts a LoRA layer in place of
``qkv`` (its ``weight`` is still the frozen base weight, so a fused path reading it would drop the
adapter and give its parameters no gradient), a quantisation pass swaps the Linear layers, a user
registers an attention-map hook. Where ``intact`` is False the library's own forward runs (or
fastnote's own module raises), and the model computes what it would unpatched.

A read is ``(path, forward)``: the dotted path of the submodule from the fused module, and the
forward it must have, a function (``nn.Linear.forward``) or ``(module, qualified name)`` naming a
library's (``("timm.models.swin_transformer", "WindowAttention.forward")``), resolved once.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Sequence, Tuple, Union

from torch import nn

Forward = Union[Callable, Tuple[str, str]]
Read = Tuple[str, Forward]
Compiled = Tuple[Tuple[Tuple[str, ...], Callable], ...]

LINEAR = nn.Linear.forward


def resolve(forward: Forward) -> Callable:
    """The function a ``(module, qualified name)`` pair names (a function as it is)."""
    if callable(forward):
        return forward
    module, qualname = forward
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def compile_reads(reads: Sequence[Read]) -> Compiled:
    """``reads`` with paths split and forwards resolved, for ``intact``."""
    return tuple((tuple(path.split(".")), resolve(forward)) for path, forward in reads)


def changed(module: nn.Module, reads: Compiled) -> Optional[str]:
    """None when every submodule in ``reads`` is there, has its class's forward the one named, and
    holds no forward or backward hook or pre-hook (then a fused forward that reads their parameters
    computes what calling them would); else which one does not, and why, in words. Dict and
    attribute lookups only, the checks torch's own module call makes: 1.4-2.1 us for timm's three
    reads on a 2-core development VM."""
    for path, forward in reads:
        m = module
        for name in path:
            m = m._modules.get(name)
            if m is None:
                return f"{'.'.join(path)!r} is missing"
        cls = type(m)
        if cls.forward is not forward:
            return (f"{'.'.join(path)!r} is a {cls.__module__}.{cls.__qualname__}, whose forward is not "
                    f"{forward.__module__}.{forward.__qualname__}")
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return f"{'.'.join(path)!r} holds a forward or backward hook"
    return None


def intact(module: nn.Module, reads: Compiled) -> bool:
    """Whether ``changed`` finds nothing: the fused forward may read these submodules' parameters."""
    return changed(module, reads) is None


def check_intact(module: nn.Module, reads: Compiled, instead: str = "") -> None:
    """For fastnote's own fused modules, which have no library path to fall back on: raise where
    ``intact`` is False, rather than compute without what the changed submodule adds.
    ``instead``: what to use where that submodule must stay as it is."""
    what = changed(module, reads)
    if what is not None:
        raise ValueError(
            f"{type(module).__name__}'s fused path reads the weights of {', '.join('.'.join(p) for p, _ in reads)} "
            f"without calling them, but {what}: what it adds (a LoRA adapter, a quantised "
            "layer's maths, a hook) would be silently dropped. Wrap or hook these modules before fastnote.patch, "
            f"which then leaves the module on the library's path{instead}")


# fastnote's own fused modules: shifted window attention (V1, V2, torchvision's layout) and SE
QKV_PROJ = compile_reads((("qkv", LINEAR), ("proj", LINEAR)))
CALLS_QKV = ", or fastnote.nn.WindowAttention (the core op), which calls qkv and proj"
FC1_FC2 = compile_reads((("fc1", nn.Conv2d.forward), ("fc2", nn.Conv2d.forward)))
CONV_REDUCE_EXPAND = compile_reads((("conv_reduce", nn.Conv2d.forward), ("conv_expand", nn.Conv2d.forward)))
