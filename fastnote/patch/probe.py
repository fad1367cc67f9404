"""What the family converters share: building a replacement without memory or random draws, and
the probe that checks a candidate's forward is the formula fastnote computes."""
from __future__ import annotations

import copy
import functools
import itertools
from typing import Callable, Optional

import torch
from torch import nn

# The probe recognises structure; it is not a parity test: a module computing another function is
# off the formula by O(1), one computing the same function in another order by rounding (~1e-6 in
# fp32). (atol = rtol) by the dtype of the candidate's weights: ten times the parity tolerance of
# a single reduction (docs/design.md section 3.1).
PROBE_TOLERANCE = {torch.float32: 2e-3, torch.float64: 2e-3, torch.float16: 1e-1, torch.bfloat16: 2e-1}


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Construct on the meta device (no memory, no random draws); the caller then hands it the
    original's parameters and buffers."""
    with torch.device("meta"):
        return build()


def _no_meta_left(new: nn.Module, what: str) -> nn.Module:
    for name, t in itertools.chain(new.named_parameters(), new.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"fastnote.patch: {what} kept no tensor for {name!r} (internal error)")
    return new


def _mode_of(old: nn.Module, new: nn.Module) -> nn.Module:
    return new.train(old.training)


def _is_fastnote(m) -> bool:
    return type(m).__module__.startswith("fastnote.")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` itself holds a forward or backward hook or pre-hook."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _hooked(m: nn.Module, own: bool = True) -> Optional[str]:
    """The name of the first of ``m`` (``""``; skipped unless ``own``) and its submodules holding
    a forward or backward hook or pre-hook (pruning, ``weight_norm``, spectral norm, a user's
    feature hook), or None. A replacement that does not call a submodule would silently stop
    running that submodule's hooks, so a converter leaves such a module."""
    for name, sub in m.named_modules():
        if (own or sub is not m) and _has_hooks(sub):
            return name
    return None


def _hook_reason(m: nn.Module, what: str, why: str, own: bool = True) -> Optional[str]:
    """The reason to leave ``m`` when ``_hooked(m, own)`` finds a hook, else None; ``why``: what
    the replacement would do to it."""
    name = _hooked(m, own)
    if name is None:
        return None
    where = f"its submodule {name!r}" if name else "it"
    return f"{what}, but {where} holds a forward or backward hook (pruning, weight_norm, a user's hook): {why}"


def _uncalled_hook_reason(m: nn.Module, what: str, called) -> Optional[str]:
    """The reason to leave ``m`` when a submodule its replacement does not call holds a hook (an
    attention-map hook on ``softmax``), else None. ``called``: the children the replacement runs
    as modules (their hooks, and those of everything inside them, keep running)."""
    for name, sub in m.named_modules():
        if name and name.split(".", 1)[0] not in called and _has_hooks(sub):
            return (f"{what}, but its submodule {name!r} holds a forward or backward hook: the fused op "
                    "computes what it does and never calls it, so the hook would stop running")
    return None


def _forward_is(cls: type, module: str, qualname: str) -> bool:
    """Whether ``cls.forward`` is the function ``qualname`` of module ``module`` (a library's own,
    not a subclass's override)."""
    forward = getattr(cls, "forward", None)
    return (getattr(forward, "__module__", None), getattr(forward, "__qualname__", None)) == (module, qualname)


def _bypassed_forward_reason(m: nn.Module, expected) -> Optional[str]:
    """The reason to leave ``m`` when a submodule that its fused replacement reads the parameters
    of, without calling it, has another forward than the one the fused maths is written from, else
    None. ``expected``: (path in ``m``, forward) pairs, where the forward is a function (torch's
    ``nn.Linear.forward``) or a (module, qualified name) pair naming a library's. A Linear subclass
    with a forward of its own (a quantised layer, loralib's LoRA ``Linear``) computes more than its
    ``weight``, and an attention subclass may compute anything: fused, it would silently be dropped."""
    for path, want in expected:
        cls = type(m.get_submodule(path))
        plain = getattr(cls, "forward", None) is want if callable(want) else _forward_is(cls, *want)
        if not plain:
            return (f"{path!r} ({cls.__name__} from {cls.__module__}) has a forward of its own: the fused path "
                    f"reads its parameters and does not call it, so what that forward adds would be lost")
    return None


def _linears_reason(m: nn.Module, *paths: str) -> Optional[str]:
    """``_bypassed_forward_reason`` for Linear children read by weight only."""
    return _bypassed_forward_reason(m, [(p, nn.Linear.forward) for p in paths])


def _unhooked(m: nn.Module) -> nn.Module:
    """``m`` (a copy made for a probe) with every hook of it and its submodules removed: the probe
    runs forwards on a made-up input, which a user's hooks (a feature logger) must not see."""
    for sub in m.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(sub, attr, None)
            if hooks:
                hooks.clear()
    return m


def _probe_copy(old: nn.Module, what: str):
    """A copy of ``old`` to probe (its forward run on a made-up input, its state changed at will;
    no hooks, so a user's do not see the probe), or the reason it cannot be made: a module holding
    a tensor computed with gradient (an attention map kept from the last training forward) does
    not deep-copy."""
    try:
        return _unhooked(copy.deepcopy(old))
    except Exception as e:  # noqa: BLE001
        return f"{what}, but it could not be copied to probe ({type(e).__name__}: {e})"


def _leave_if_hooked(convert):
    """A converter whose replacement reads its submodules' parameters instead of calling them (a
    fused attention): a module whose submodules hold hooks (an attention-map hook on ``softmax``,
    a user's on ``qkv``) is left with the reason instead; its own hooks go to the replacement."""
    @functools.wraps(convert)
    def converter(old: nn.Module, site=None):
        result = convert(old, site)
        if isinstance(result, tuple) and not isinstance(result[0], type):
            reason = _hook_reason(old, type(old).__name__, "the fused op reads its submodules' parameters and "
                                  "calls none of them, so the hook would stop running", own=False)
            if reason is not None:
                return reason
        return result
    return converter


def _meta_reason(weight: torch.Tensor, what: str) -> Optional[str]:
    """The reason to leave a module whose parameters have no values (the meta device), else None:
    the probe that recognises it runs its forward."""
    if weight.is_meta:
        return (f"{what}, but its parameters are on the meta device: the probe that recognises it needs "
                "values (patch after to_empty and loading the weights)")
    return None


def _transfer_hooks(old: nn.Module, new: nn.Module) -> None:
    """Hand ``old``'s own forward and backward hooks to ``new`` (the same dicts: the handles the
    user holds still remove them, and an undo gives them back with the original)."""
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            if getattr(new, attr):
                raise RuntimeError(f"fastnote.patch: the replacement already holds {attr} (internal error)")
            setattr(new, attr, hooks)
    if old._backward_hooks or old._backward_pre_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _probe_input(shape, like: torch.Tensor) -> torch.Tensor:
    # A private generator: the probe draws nothing from the global ones.
    gen = torch.Generator(device=like.device).manual_seed(1234)
    return torch.randn(shape, generator=gen, device=like.device, dtype=torch.float32).to(like.dtype)


def _probe_close(actual, expected, dtype) -> bool:
    tol = PROBE_TOLERANCE.get(dtype)
    if tol is None:
        raise ValueError(f"no tolerance for dtype {dtype}")
    return isinstance(actual, torch.Tensor) and actual.shape == expected.shape and torch.allclose(
        actual.float(), expected.float(), atol=tol, rtol=tol)
