"""What is timed for each mode: the gradient leaves of a case's inputs, the outputs a backward
starts from, and the callable ``fwd`` / ``bwd`` / ``both`` time for a provider."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence

import torch


class _NotApplicable(Exception):
    """A mode that does not exist for a provider (e.g. backward of an output without grad)."""


def grad_leaves(obj) -> List[torch.Tensor]:
    """Leaf tensors requiring grad in a nest of dicts/lists/tuples/modules."""
    found: List[torch.Tensor] = []
    seen = set()

    def visit(o):
        if isinstance(o, torch.Tensor):
            if o.requires_grad and o.is_leaf and id(o) not in seen:
                seen.add(id(o))
                found.append(o)
        elif isinstance(o, torch.nn.Module):
            for p in o.parameters():
                visit(p)
        elif isinstance(o, Mapping):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    visit(obj)
    return found


def _diff_outputs(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        outs = [out]
    elif isinstance(out, Mapping):
        outs = [v for v in out.values() if isinstance(v, torch.Tensor)]
    elif isinstance(out, (list, tuple)):
        outs = [v for v in out if isinstance(v, torch.Tensor)]
    else:
        outs = []
    outs = [t for t in outs if t.requires_grad]
    if not outs:
        raise _NotApplicable("no output requires grad")
    return outs


def _mode_callable(made, mode: str) -> Callable[[], Any]:
    """The callable to time for ``mode``; its untimed setup (a forward for bwd) runs here."""
    if isinstance(made, Mapping):
        if mode not in made:
            raise _NotApplicable(f"provider gives no {mode!r} callable")
        return made[mode]
    forward = made
    if mode == "fwd":
        return forward
    outs = _diff_outputs(forward())
    grads = [torch.randn_like(t) for t in outs]
    if mode == "bwd":
        return _retained_backward(outs, grads)
    del outs  # "both" runs its own forward on every call: free this graph
    return lambda: torch.autograd.backward(_diff_outputs(forward()), grads)


def _retained_backward(outs, grads) -> Callable[[], Any]:
    return lambda: torch.autograd.backward(outs, grads, retain_graph=True)


def _clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


@contextlib.contextmanager
def module_setting(module, name: str, value):
    """``module.name = value`` inside, the previous value restored after (a kernel module's
    launch-time switch, such as its tiles)."""
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def under_setting(setup, module, name: str, value, modes: Sequence[str] = ("bwd", "both"),
                  applies: Optional[Callable[[Any], bool]] = None):
    """A provider setup giving ``setup``'s callables for ``modes`` only, each run with
    ``module.name = value`` (their untimed setup too: the forward a bwd mode starts from). For
    timing a kernel configuration beside the default one on the same cases. ``applies(case)``
    False: no callable for that case (n/a), where the setting changes nothing."""
    def wrapped(inputs, case):
        if applies is not None and not applies(case):
            return {}
        made = setup(inputs, case)

        def run_with(fn):
            def run():
                with module_setting(module, name, value):
                    return fn()
            return run

        callables = {}
        for mode in modes:
            with module_setting(module, name, value):
                callables[mode] = run_with(_mode_callable(made, mode))
        return callables
    return wrapped
