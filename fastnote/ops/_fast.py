"""One definition per kernel op, two ways to call it.

Every Triton op is a ``torch.library`` custom op (``fastnote::<op>``) with a fake and an autograd
registration, which is what ``torch.compile`` traces (there the op costs nothing per call) and what
``torch.ops.fastnote.*`` users call. In eager mode that machinery costs more host time per call
than the kernels themselves on small and medium tensors: the dispatcher (~20 us) and the autograd
wrapper of ``register_autograd`` (~60 us on an H200 host, forward and backward). ``kernel_op``
therefore gives, from the same Python pieces, a second way in:

- ``op = kernel_op("fastnote::name")(body)`` registers ``body`` (the function that launches the
  kernels) as the custom op, and ``op.register_fake`` / ``op.register_autograd(backward,
  setup_context=...)`` register the fake and the autograd formula as ``torch.library`` does;
- ``op(*args)`` is what the public functions call. In eager mode, with plain tensors, it runs
  ``body`` directly when no gradient is wanted, and otherwise a ``torch.autograd.Function``
  built from ``body``, ``setup_context`` and ``backward``; the backward ops are ``KernelOp`` too,
  so the backward also calls its body without the dispatcher. While compiling or tracing (fake
  tensors, a torch function or dispatch mode, functorch transforms), for tensor subclasses, under
  ``create_graph`` for ops without autograd, or with ``FORCE_CUSTOM_OP`` set, it calls the custom
  op instead.

Both ways run the same body, ``setup_context`` and ``backward``, so they give bitwise-identical
results (``tests/test_overhead.py`` checks it for every op). Outputs after the first
``differentiable_outputs`` of a multi-output op are statistics saved for backward: they never
require grad, no zero gradients are made for them, and ``backward`` sees ``None`` in their
places (a ``None`` gradient of a differentiable output is still given as zeros, as
``torch.library``'s autograd does). The custom op marks them non-differentiable; the eager
``autograd.Function`` does not return them at all (``_autograd_function``).
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import checks

# Module switch for tests: True sends every call through the custom op (the dispatcher path).
FORCE_CUSTOM_OP = False

_PLAIN_TYPES = checks.PLAIN_TENSORS
_is_compiling = torch.compiler.is_compiling
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad
# autograd.Function.apply without the Python wrapper of torch.autograd.Function.apply, which binds
# default arguments through inspect.signature (setup_context style only) and unwraps functorch
# wrappers (no transform is active where this is used).
_function_apply = torch._C._FunctionBase.__dict__["apply"]


def eager_call(args: Sequence) -> bool:
    """True when ``args`` may go to the bodies directly: eager mode, plain tensors, no mode active."""
    if FORCE_CUSTOM_OP or _is_compiling() or _torch_function_mode() or _dispatch_modes() or _functorch_active():
        return False
    for a in args:
        if isinstance(a, Tensor) and type(a) not in _PLAIN_TYPES:
            return False
    return True


class _TritonKernels:
    """The kernel modules, ``kernels.<name>`` for ``fastnote.triton_kernels.<name>``: imported at
    first use (importing fastnote imports no triton: ``TRITON_INTERPRET`` may still be set after
    it), then held as a plain attribute. An ``import`` statement in each op body cost 0.37 us a
    call (the import machinery's fromlist handling), the attribute 0.03."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        import importlib

        module = importlib.import_module(f"fastnote.triton_kernels.{name}")
        setattr(self, name, module)
        return module


kernels = _TritonKernels()


class KernelOp:
    """A custom op and its eager twin; see the module docstring."""

    def __init__(self, qualname: str, body: Callable, mutates_args=()) -> None:
        self.body = body
        self.custom_op = torch.library.custom_op(qualname, body, mutates_args=mutates_args)
        self.__name__ = getattr(body, "__name__", qualname)
        self.__doc__ = body.__doc__
        returns = self.custom_op._opoverload._schema.returns
        self._list_output = len(returns) == 1 and isinstance(returns[0].type, torch._C.ListType)
        self._autograd: Optional[Callable] = None

    def __repr__(self) -> str:
        return f"KernelOp({self.custom_op._qualname})"

    def register_fake(self, fn: Callable) -> Callable:
        self.custom_op.register_fake(fn)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable,
                          differentiable_outputs: int = 1) -> None:
        """``torch.library``'s ``register_autograd`` for the custom op, and the eager
        ``autograd.Function`` from the same ``backward`` and ``setup_context``. For a list output,
        its first ``differentiable_outputs`` tensors carry gradients, the others are saved
        statistics."""
        n_diff = differentiable_outputs if self._list_output else None
        if self._list_output:
            custom_setup, custom_backward = _statistics_outputs(setup_context, backward, differentiable_outputs)
        else:
            custom_setup, custom_backward = setup_context, backward
        self.custom_op.register_autograd(custom_backward, setup_context=custom_setup)
        self._autograd = _autograd_function(self.custom_op._name, self.body, backward, setup_context, n_diff)

    def __call__(self, *args):
        if _backward_state.eager and not _grad_enabled():
            # inside the eager autograd.Function's backward: known eager, plain tensors (the
            # tensors it saved); skips eager_call's checks on the backward op's many arguments
            return self.body(*args)
        if eager_call(args):
            if not (_grad_enabled() and _any_requires_grad(*args)):
                return self.body(*args)
            autograd = self._autograd
            if autograd is not None:
                return autograd(*args)
        return self.custom_op(*args)


def kernel_op(qualname: str, *, mutates_args=()) -> Callable[[Callable], KernelOp]:
    """Decorator: ``@kernel_op("fastnote::name")`` on the body, as ``torch.library.custom_op``."""
    def wrap(body: Callable) -> KernelOp:
        return KernelOp(qualname, body, mutates_args)
    return wrap


class _BackwardState(threading.local):
    eager = False     # this thread runs the backward of an eager autograd.Function


_backward_state = _BackwardState()


def _eager_backward(backward: Callable, ctx, grads):
    """``backward(ctx, grads)`` with the backward ops going straight to their bodies."""
    if _backward_state.eager:
        return backward(ctx, grads)
    _backward_state.eager = True
    try:
        return backward(ctx, grads)
    finally:
        _backward_state.eager = False


def _statistics_outputs(setup_context: Callable, backward: Callable, n_diff: int):
    """``setup_context`` and ``backward`` for a list output whose tensors after the first ``n_diff``
    are statistics saved for backward: marked non-differentiable, and no zero gradients made for
    them (autograd would otherwise allocate one per statistic for every backward: SAGAN's saved
    fp32 O, 128 MiB of a 418 MiB peak at B=8, C=256, 128x128). A missing gradient of a
    differentiable output is still given as zeros, as ``torch.library``'s autograd gives it.
    The same wrappers serve the custom op and the eager ``autograd.Function``."""
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        if len(output) > n_diff:
            ctx.mark_non_differentiable(*output[n_diff:])
            ctx.set_materialize_grads(False)
            if n_diff == 1:   # the common case, without a generator: host time is per call
                out = output[0]
                ctx.differentiable_outputs = ((out.shape, out.dtype, out.device),)
            else:
                ctx.differentiable_outputs = tuple((o.shape, o.dtype, o.device) for o in output[:n_diff])

    def backward_(ctx, grads):
        kept = getattr(ctx, "differentiable_outputs", None)
        if kept is not None and (grads[0] is None if n_diff == 1 else any(g is None for g in grads[:n_diff])):
            grads = tuple(torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                          for g, (shape, dtype, device) in zip(grads, kept)) + tuple(grads[n_diff:])
        return backward(ctx, grads)

    return setup, backward_


class _Statistics(threading.local):
    outputs = None    # the whole output list of the eager forward that just ran on this thread


_statistics = _Statistics()


def _autograd_function(name: str, body: Callable, backward: Callable, setup_context: Callable,
                       n_diff: Optional[int]) -> Callable:
    """The eager twin of the custom op's autograd: a function calling a ``torch.autograd.Function``
    that runs ``body`` forward and ``backward`` backward, with the conventions of
    ``torch.library.register_autograd``: ``setup_context(ctx, inputs, output)``, and
    ``backward(ctx, grad)`` for one output, ``backward(ctx, grads)`` for a list output (a tuple
    here). ``n_diff`` is None for one tensor out, else the number of differentiable tensors at the
    head of the list.

    The statistics after them (saved for backward only) are not outputs of the
    ``autograd.Function``: its forward returns the differentiable tensors and hands the whole list
    back beside autograd, through a thread-local. The custom op returns them as outputs marked
    non-differentiable, which costs autograd an output each, the marking, and the bookkeeping of
    their missing gradients: ~1.9 us per call on the host (measured on CPU for SAGAN's three
    outputs: 8.9 us for the ``apply`` against 7.0). What the caller gets is the same list, the
    statistics not requiring grad either way; ``backward`` sees ``None`` for their gradients, as
    on the custom op's path."""
    if n_diff is None:
        def forward(ctx, *args):
            out = body(*args)
            setup_context(ctx, args, out)
            return out

        def backward_(ctx, grad):
            return _eager_backward(backward, ctx, grad)

        return _apply_of(name, forward, backward_)

    def forward(ctx, *args):
        out = body(*args)
        setup_context(ctx, args, out)
        ctx.statistics = len(out) - n_diff
        _statistics.outputs = out
        return out[0] if n_diff == 1 else tuple(out[:n_diff])

    def backward_(ctx, *grads):
        return _eager_backward(backward, ctx, grads + (None,) * ctx.statistics)

    apply = _apply_of(name, forward, backward_)

    def call(*args):
        head = apply(*args)
        out = _statistics.outputs
        _statistics.outputs = None
        return [head, *out[1:]] if n_diff == 1 else [*head, *out[n_diff:]]
    return call


def _apply_of(name: str, forward: Callable, backward: Callable) -> Callable:
    """``apply`` of a new ``torch.autograd.Function`` class with these static methods."""
    return _function_apply.__get__(None, type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)}))
