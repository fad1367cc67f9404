"""Peak memory of forward + backward at real sizes, counted exactly on a CPU without a GPU.

How: every input is a fake tensor (``FakeTensorMode``: shapes, dtypes and strides, no data), so a
SAGAN attention over 256x256 tokens or a CLIP loss over 2^20 pairs "runs" in milliseconds. A
``TorchDispatchMode`` stacked inside the fake mode (``MemoryTracker``) sees every op's outputs,
counts each new storage once (keyed by its storage, freed by a weakref finaliser on that storage)
rounded up to 512-byte blocks as CUDA's caching allocator rounds, and keeps the maximum of the live
bytes. ``added`` = peak - the inputs' bytes: what forward and backward add.

fastnote takes its kernel path (``backend.use_triton`` on the CPU: ``TRITON_INTERPRET=1`` and
``FASTNOTE_BACKEND=triton`` for the duration), and its ``torch.library`` custom ops run their fake
registrations. The eager fast path of ``fastnote/ops/_fast.py`` never sees a fake tensor: its
``eager_call`` sends tensor subclasses (a ``FakeTensor`` is one) and calls made while a dispatch
mode is active (the fake mode, this tracker) to the custom op. ``FORCE_CUSTOM_OP`` is set as well,
so this holds whatever that check becomes.

fastnote is measured four ways:
  fastnote               the custom ops' fake registrations: outputs as declared (what the
                         dispatcher path and torch.compile allocate, workspaces aside)
  fastnote+workspaces    the same custom ops, with each op's real Python body (the launchers of
                         ``fastnote.triton_kernels``) run on the fake tensors and the Triton launch
                         stubbed: adds the scratch the launchers allocate (split-K partials, casts)
  fastnote eager path    the ``autograd.Function`` of ``_fast.py`` that eager training calls on a
                         GPU (bodies run, launches stubbed, as above)
  fastnote aux fix       what-if: the custom ops with the outputs after the first (statistics
                         saved for backward) marked non-differentiable, so autograd makes no zero
                         gradient for them (``aux_outputs_nondifferentiable``)

What it cannot see (said beside every table): workspaces inside one op (an aten kernel's or a
Triton kernel's own scratch), cuBLAS/cuDNN workspaces, the allocator's fragmentation and cached
free blocks, the CUDA context. Sizes are logical storage sizes rounded to 512 bytes.

The protocol of every op case: inputs (and an upstream gradient for ops with a tensor output) are
made first and count as inputs; the forward runs, its output is handed to a sink that returns the
upstream gradient in backward (so the output is freed once the forward has made it, as when the
next layer consumes it), then ``torch.autograd.grad`` with respect to the differentiable inputs.
Loss ops (CLIP, PatchNCE, style) return a scalar and backward starts from it. "eager" is the code
fastnote replaces (SAGAN's Self_Attn, CUT's PatchNCELoss and the seed's gram from
tests/transcriptions.py, the original Swin code's window attention with CUDA autocast's casts
written out, torchvision's SqueezeExcitation, CLIP's symmetric cross-entropy on s * img @ txt^T);
"reference" is ``fastnote.reference``.

Whole training steps (``measure_step``): each example in examples/ at its ``--full`` size, eager
and patched, built and patched for real on the CPU, then every tensor it holds swapped for a fake
one. Examples trained under bf16 autocast run under CPU autocast, whose lower-precision list is
CUDA's, with CUDA's fp32 list (softmax, layer_norm, norms, ...) applied by ``CudaAutocastFp32``.

``launchers`` checks the fake registrations against the launchers: every case at small sizes on
real CPU tensors, each op's body run with the Triton launch stubbed.

    python benchmarks/memory.py                # everything: memory.csv, steps.csv, memory.png, tables
    python benchmarks/memory.py --only sagan   # some of: sagan, clip, patch_nce, style, window,
                                               # hswish_se, steps, launchers
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import importlib.util
import math
import os
import sys
import time
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "memory")
MiB = 2 ** 20
BLOCK = 512      # CUDA's caching allocator rounds every block up to a multiple of 512 bytes

LIMITS = ("Counted with fake tensors: every storage an op returns, rounded up to 512-byte blocks. "
          "Not seen: workspaces inside one op (an aten or Triton kernel's own scratch), cuBLAS/cuDNN "
          "workspaces, allocator fragmentation and cached free blocks, the CUDA context.")


def _load_by_path(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# The tracker
# ------------------------------------------------------------------------------------------------

def blocks(nbytes: int) -> int:
    """Bytes as the caching allocator hands them out: rounded up to 512 (0 stays 0)."""
    return -(-nbytes // BLOCK) * BLOCK


def _describe(func, t: torch.Tensor) -> str:
    name = str(func).replace("aten.", "").replace(".default", "")
    dtype = str(t.dtype).replace("torch.", "")
    return f"{name} {list(t.shape)} {dtype}"


def custom_op_body(func) -> Optional[Callable]:
    """The Python function a fastnote custom op runs (the launchers), or None for other ops."""
    if getattr(func, "namespace", None) != "fastnote":
        return None
    opdef = torch._library.custom_ops._maybe_get_opdef(func)
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


@dataclasses.dataclass
class OpCall:
    op: str
    entry: int      # live bytes when the op is called
    inner: int      # the most live while it runs (its body counted from inside), else ``exit``
    exit: int       # live bytes once its outputs exist

    @property
    def scratch(self) -> int:
        """Bytes the body held at its peak beyond what it returned."""
        return self.inner - self.exit


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the storages that ops return while it is active.

    ``track(t)`` counts a tensor made before (an input). A storage counts once, however many
    views share it, from the op that returns it first until it is freed. ``inside=True`` runs a
    fastnote custom op's Python body under the tracker instead of the op itself, so what the
    launchers allocate and free inside the op counts too. ``ops``: every fastnote op call, with
    the live bytes at entry, the most inside (with ``inside``) and at exit."""

    def __init__(self, inside: bool = False):
        super().__init__()
        self.inside = inside
        self.live = 0
        self.peak = 0
        self.sizes: Dict[int, int] = {}
        self.labels: Dict[int, str] = {}
        self.at_peak: List[Tuple[str, int]] = []
        self.ops: List[OpCall] = []
        self._snapshot_peak = -1
        self.on_peak: Optional[Callable[[], None]] = None

    # -- counting
    def track(self, t: torch.Tensor, label: str = "input") -> int:
        storage = t.untyped_storage()
        key = storage._cdata
        n = blocks(storage.nbytes())
        old = self.sizes.get(key)
        if old is not None:
            if n > old:           # resized in place
                self.sizes[key] = n
                self._grow(n - old)
            return 0
        self.sizes[key] = n
        self.labels[key] = label
        weakref.finalize(storage, self._free, key)
        self._grow(n)
        return n

    def _grow(self, n: int) -> None:
        self.live += n
        if self.live > self.peak:
            self.peak = self.live

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)
        self.labels.pop(key, None)

    def snapshot(self) -> List[Tuple[str, int]]:
        """(label, bytes) of every live storage, largest first."""
        return sorted(((self.labels[k], n) for k, n in self.sizes.items()), key=lambda x: -x[1])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = custom_op_body(func)
        entry = self.live
        if body is not None and self.inside:
            before = self.peak
            self.peak = self.live
            with self:
                out = body(*args, **kwargs)
            inner = self.peak
            self.peak = max(before, inner)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, _describe(func, t))
        if body is not None:
            self.ops.append(OpCall(str(func), entry, inner if self.inside else self.live, self.live))
        if self.peak > self._snapshot_peak and self.peak == self.live:
            self._snapshot_peak = self.peak
            self.at_peak = self.snapshot()
            if self.on_peak is not None:
                self.on_peak()
        return out


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


# ------------------------------------------------------------------------------------------------
# Switches: fastnote's kernel path on CPU tensors, launches stubbed, the eager path forced
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def backend_choice(choice: str):
    """``FASTNOTE_BACKEND=choice`` (and ``TRITON_INTERPRET=1``) for the duration, then as it was."""
    from fastnote import backend
    from fastnote.testing import environ

    try:
        with environ({"TRITON_INTERPRET": "1", "FASTNOTE_BACKEND": choice}):
            backend.refresh()
            yield
    finally:
        backend.refresh()   # once environ has put the variables back


@contextlib.contextmanager
def kernel_path():
    """fastnote takes its kernel path on CPU tensors, through its custom ops, for the duration."""
    from fastnote import backend

    fast = _fast_module()
    saved_force = getattr(fast, "FORCE_CUSTOM_OP", None)
    with backend_choice("triton"):
        if fast is not None and saved_force is not None:
            fast.FORCE_CUSTOM_OP = True
        try:
            if not backend.use_triton(torch.device("cpu")):
                raise RuntimeError("fastnote would not take its kernel path on CPU tensors")
            yield
        finally:
            if fast is not None and saved_force is not None:
                fast.FORCE_CUSTOM_OP = saved_force


def _fast_module():
    try:
        from fastnote.ops import _fast
    except ImportError:
        return None
    return _fast


def eager_path_available() -> bool:
    fast = _fast_module()
    return fast is not None and hasattr(fast, "eager_call") and hasattr(fast, "FORCE_CUSTOM_OP")


@contextlib.contextmanager
def eager_path():
    """The ``_fast.py`` autograd.Function path even on fake tensors under a dispatch mode (its
    bodies then run on the fake tensors: use with ``stubbed_launches``)."""
    fast = _fast_module()
    saved_call, saved_force = fast.eager_call, fast.FORCE_CUSTOM_OP
    fast.eager_call = lambda args: True
    fast.FORCE_CUSTOM_OP = False
    try:
        yield
    finally:
        fast.eager_call, fast.FORCE_CUSTOM_OP = saved_call, saved_force


@contextlib.contextmanager
def aux_outputs_nondifferentiable():
    """What-if: every fastnote custom op's ``setup_context`` also marks the outputs after the
    first non-differentiable and turns ``set_materialize_grads`` off, as ``_fast.py``'s
    autograd.Function does, so autograd stops making a zero gradient for each saved statistic."""
    from torch._library.custom_ops import OPDEFS

    saved = {}
    for name, opdef in OPDEFS.items():
        fn = getattr(opdef, "_setup_context_fn", None)
        if not name.startswith("fastnote::") or fn is None:
            continue

        def wrapped(ctx, inputs, output, fn=fn):
            fn(ctx, inputs, output)
            if isinstance(output, (list, tuple)) and len(output) > 1:
                ctx.mark_non_differentiable(*output[1:])
                ctx.set_materialize_grads(False)

        saved[name] = fn
        opdef._setup_context_fn = wrapped
    try:
        yield
    finally:
        for name, fn in saved.items():
            OPDEFS[name]._setup_context_fn = fn


if os.path.dirname(os.path.abspath(__file__)) not in sys.path:   # loaded by path (tests/test_memory.py)
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from overhead import eager_clip, eager_siglip, stubbed_launches  # noqa: E402  (benchmarks/overhead.py: the launchers run, their kernels do not)


# ------------------------------------------------------------------------------------------------
# One measurement
# ------------------------------------------------------------------------------------------------

class _Upstream(torch.autograd.Function):
    """Consumes an op's output (which is then free to go) and gives ``grad`` as its gradient."""

    @staticmethod
    def forward(ctx, out, grad):
        ctx.grad = grad
        return out.new_empty((0,))

    @staticmethod
    def backward(ctx, _):
        grad, ctx.grad = ctx.grad, None
        return grad, None


def backward_through(out: torch.Tensor, grad: Optional[torch.Tensor], wrt: Sequence[torch.Tensor]):
    """Backward of ``out`` (a scalar loss, or a tensor with upstream gradient ``grad``) to ``wrt``."""
    wrt = [t for t in wrt if t is not None and t.requires_grad]
    if grad is None:
        return torch.autograd.grad(out, wrt)
    sink = _Upstream.apply(out, grad)
    del out
    return torch.autograd.grad(sink, wrt, sink.new_empty((0,)))


@dataclasses.dataclass
class Measurement:
    peak: int            # bytes, inputs included
    inputs: int          # bytes of the inputs (and parameters) made before the step
    at_peak: List[Tuple[str, int]]
    ops: List[OpCall]

    @property
    def added(self) -> int:
        return self.peak - self.inputs


def measure(make: Callable[[], dict], step: Callable[[dict], object], *, fake: bool = True,
            inside: bool = False, stub: bool = False, eager: bool = False, aux_fix: bool = False) -> Measurement:
    """Peak bytes of ``step(inputs)``, ``inputs = make()`` made first (fake tensors unless
    ``fake=False``); ``inside``: fastnote ops' bodies counted from inside; ``stub``: Triton
    launches stubbed; ``eager``: fastnote's eager fast path instead of its custom ops;
    ``aux_fix``: ``aux_outputs_nondifferentiable``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with contextlib.ExitStack() as stack:
        stack.enter_context(kernel_path())
        if stub:
            stack.enter_context(stubbed_launches())
        if eager:
            stack.enter_context(eager_path())
        if aux_fix:
            stack.enter_context(aux_outputs_nondifferentiable())
        if fake:
            stack.enter_context(FakeTensorMode())
        inputs = make()
        tracker = MemoryTracker(inside=inside)
        for name, t in _tensors(inputs):
            tracker.track(t, f"input {name} {list(t.shape)} {str(t.dtype).replace('torch.', '')}")
        base = tracker.live
        tracker._snapshot_peak = tracker.peak = base
        tracker.at_peak = tracker.snapshot()
        with tracker, _no_gc():
            step(inputs)
        del inputs
        return Measurement(tracker.peak, base, tracker.at_peak, tracker.ops)


@contextlib.contextmanager
def _no_gc():
    """Storages freed by reference counting only, at the same points on every run."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _tensors(inputs) -> Iterable[Tuple[str, torch.Tensor]]:
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, torch.nn.Module):
            for pname, p in list(value.named_parameters()) + list(value.named_buffers()):
                yield f"{name}.{pname}", p
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, torch.Tensor):
                    yield f"{name}[{i}]", v


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------

PROVIDERS = ("eager", "reference", "fastnote", "fastnote+workspaces", "fastnote eager path", "fastnote aux fix")
FASTNOTE_VARIANTS = {  # provider -> measure() switches
    "fastnote": dict(),
    "fastnote+workspaces": dict(inside=True, stub=True),
    "fastnote eager path": dict(inside=True, stub=True, eager=True),
    "fastnote aux fix": dict(aux_fix=True),
}


@dataclasses.dataclass
class Case:
    op: str           # family: sagan_attention, clip_loss, ...
    case: str         # what is measured, in words
    size: int         # the size the scaling is about (tokens, rows, elements)
    dtype: str
    make: Callable[[], dict]                              # the inputs (called inside the fake mode)
    steps: Dict[str, Callable[[dict], object]]            # "eager" / "reference" / "fastnote" -> step

    def run(self, provider: str) -> Measurement:
        if provider in FASTNOTE_VARIANTS:
            return measure(self.make, self.steps["fastnote"], **FASTNOTE_VARIANTS[provider])
        return measure(self.make, self.steps[provider])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _leaf(*shape, dtype=torch.float32, grad=True):
    t = torch.randn(*shape, dtype=dtype)
    return t.requires_grad_() if grad else t


def transcriptions():
    """tests/transcriptions.py: the eager code fastnote replaces (SAGAN's Self_Attn, CUT's
    PatchNCELoss, the seed's gram, the original Swin code's WindowAttention)."""
    name = "fastnote_memory_transcriptions"
    if name in sys.modules:
        return sys.modules[name]
    return _load_by_path(name, os.path.join(ROOT, "tests", "transcriptions.py"))


# --- SAGAN ----------------------------------------------------------------------------------------

def sagan_eager(q, k, v, x, gamma):
    """SAGAN's Self_Attn.forward after its three 1x1 convs, line for line (tests/transcriptions.py):
    q [B, C/8, N], k [B, C/8, N], v [B, C, N] as the convs' outputs flattened."""
    m_batchsize, C, width, height = x.size()
    proj_query = q.view(m_batchsize, -1, width * height).permute(0, 2, 1)
    proj_key = k.view(m_batchsize, -1, width * height)
    energy = torch.bmm(proj_query, proj_key)
    attention = torch.softmax(energy, dim=-1)
    proj_value = v.view(m_batchsize, -1, width * height)
    out = torch.bmm(proj_value, attention.permute(0, 2, 1))
    out = out.view(m_batchsize, C, width, height)
    out = gamma * out + x
    return out, attention


def sagan_cases(sides=(32, 64, 128, 256), B=8, C=256, dtype="fp32") -> List[Case]:
    import fastnote

    dt = DTYPES[dtype]
    cases = []
    for s in sides:
        N = s * s

        def make(s=s, N=N):
            return dict(q=_leaf(B, C // 8, N, dtype=dt), k=_leaf(B, C // 8, N, dtype=dt),
                        v=_leaf(B, C, N, dtype=dt), x=_leaf(B, C, s, s, dtype=dt), gamma=_leaf(1),
                        grad=_leaf(B, C, s, s, dtype=dt, grad=False))

        def wrt(i):
            return [i["q"], i["k"], i["v"], i["x"], i["gamma"]]

        steps = {
            "eager": lambda i: backward_through(sagan_eager(i["q"], i["k"], i["v"], i["x"], i["gamma"])[0],
                                                i["grad"], wrt(i)),
            "reference": lambda i: backward_through(
                fastnote.reference.sagan_attention(i["q"], i["k"], i["v"], i["x"], i["gamma"]), i["grad"], wrt(i)),
            "fastnote": lambda i: backward_through(
                fastnote.sagan_attention(i["q"], i["k"], i["v"], i["x"], i["gamma"]), i["grad"], wrt(i)),
        }
        cases.append(Case("sagan_attention", f"B={B} C={C} {s}x{s}", N, dtype, make, steps))
    return cases


# --- CLIP -----------------------------------------------------------------------------------------

def _contrastive_cases(op, eager, ours, ref, scalars, ns, d, dtypes) -> List[Case]:
    """A contrastive loss on n pairs of [n, d] embeddings and its one-value ``scalars`` (name ->
    value), forward and backward to every input, for each n and dtype."""
    cases = []
    for dtype in dtypes:
        dt = DTYPES[dtype]
        for n in ns:
            def make(n=n, dt=dt):
                return dict(img=_leaf(n, d, dtype=dt), txt=_leaf(n, d, dtype=dt),
                            **{k: torch.full((), v).requires_grad_() for k, v in scalars.items()})

            def args(i):
                return [i["img"], i["txt"]] + [i[k] for k in scalars]

            steps = {name: (lambda i, fn=fn: backward_through(fn(*args(i)), None, args(i)))
                     for name, fn in (("eager", eager), ("reference", ref), ("fastnote", ours))}
            cases.append(Case(op, f"n={n} d={d}", n, dtype, make, steps))
    return cases


def clip_cases(ns=tuple(2 ** p for p in range(13, 21)), d=512, dtypes=("fp32", "bf16")) -> List[Case]:
    import fastnote

    return _contrastive_cases("clip_loss", eager_clip, fastnote.clip_loss,
                              lambda a, b, s: fastnote.reference.clip_loss(a, b, s, exponentiated=True),
                              {"scale": 14.3}, ns, d, dtypes)


# --- SigLIP ---------------------------------------------------------------------------------------

def siglip_cases(ns=tuple(2 ** p for p in range(13, 21)), d=768, dtypes=("fp32", "bf16")) -> List[Case]:
    import fastnote

    return _contrastive_cases("siglip_loss", eager_siglip, fastnote.siglip_loss, fastnote.reference.siglip_loss,
                              {"scale": 10.0, "bias": -10.0}, ns, d, dtypes)


# --- PatchNCE -------------------------------------------------------------------------------------

class _Opt:
    def __init__(self, all_negatives: bool, batch_size: int, nce_T: float = 0.07):
        self.nce_includes_all_negatives_from_minibatch = all_negatives
        self.batch_size = batch_size
        self.nce_T = nce_T


def patch_nce_cases(ms=tuple(2 ** p for p in range(12, 19)), d=256, dtype="fp32") -> List[Case]:
    import fastnote

    dt = DTYPES[dtype]
    T = transcriptions()
    cases = []
    for M in ms:
        def make(M=M):
            return dict(q=_leaf(M, d, dtype=dt), k=_leaf(M, d, dtype=dt, grad=False))

        def cut(i):
            return T.CUTPatchNCELoss(_Opt(True, 1))(i["q"], i["k"]).mean()

        steps = {
            "eager": lambda i: backward_through(cut(i), None, [i["q"]]),
            "reference": lambda i: backward_through(fastnote.reference.patch_nce_loss(
                i["q"], i["k"], include_all_negatives_from_minibatch=True).mean(), None, [i["q"]]),
            "fastnote": lambda i: backward_through(fastnote.patch_nce_loss(
                i["q"], i["k"], 1, include_all_negatives_from_minibatch=True, reduction="mean"), None, [i["q"]]),
        }
        cases.append(Case("patch_nce", f"all negatives M={M} d={d}", M, dtype, make, steps))

    # CUT's default: 5 layers, 256 patches each, batch 1 (negatives from the own image), summed
    layers, P = 5, 256

    def make_cut():
        return dict(q=[_leaf(P, d, dtype=dt) for _ in range(layers)],
                    k=[_leaf(P, d, dtype=dt, grad=False) for _ in range(layers)])

    def total(i, loss):
        return backward_through(sum(loss(q, k).mean() for q, k in zip(i["q"], i["k"])), None, i["q"])

    steps = {
        "eager": lambda i: total(i, lambda q, k: T.CUTPatchNCELoss(_Opt(False, 1))(q, k)),
        "reference": lambda i: total(i, lambda q, k: fastnote.reference.patch_nce_loss(q, k, batch_size=1)),
        "fastnote": lambda i: total(i, lambda q, k: fastnote.patch_nce_loss(q, k, 1)),
    }
    cases.append(Case("patch_nce", f"CUT default: {layers} layers x {P} patches, batch 1, d={d}",
                      layers * P, dtype, make_cut, steps))
    return cases


# --- style loss -----------------------------------------------------------------------------------

VGG16_LAYERS = (("relu1_2", 64, 1), ("relu2_2", 128, 2), ("relu3_3", 256, 4), ("relu4_3", 512, 8))


def style_cases(batch=16, image=256, dtype="fp32") -> List[Case]:
    """One case per VGG-16 layer and the four together. The eager target is the seed's (the style
    image's Gram repeated over the batch, [B, C, C]); fastnote and the reference take it [C, C]."""
    import fastnote

    dt = DTYPES[dtype]
    T = transcriptions()

    def shapes(names):
        return [(name, (batch, C, image // f, image // f)) for name, C, f in VGG16_LAYERS if name in names]

    groups = [(name,) for name, _, _ in VGG16_LAYERS] + [tuple(n for n, _, _ in VGG16_LAYERS)]
    cases = []
    for names in groups:
        def make(names=names):
            feats, per_batch, shared = [], [], []
            for _, shape in shapes(names):
                feats.append(_leaf(*shape, dtype=dt))
                C = shape[1]
                per_batch.append(_leaf(batch, C, C, dtype=dt, grad=False))
                shared.append(_leaf(C, C, dtype=dt, grad=False))
            return dict(x=feats, target_eager=per_batch, target=shared)

        def eager(i):
            loss = 0
            for f, t in zip(i["x"], i["target_eager"]):
                _, c, h, w = f.shape
                loss = loss + F.mse_loss(T.seed_gram(f), t, reduction="sum") / float(c * h * w)
            return backward_through(loss, None, i["x"])

        def ours(fn):
            return lambda i: backward_through(sum(fn(f, t) for f, t in zip(i["x"], i["target"])), None, i["x"])

        steps = {"eager": eager, "reference": ours(fastnote.reference.style_loss),
                 "fastnote": ours(fastnote.style_loss)}
        label = names[0] if len(names) == 1 else "relu1_2..relu4_3"
        elements = sum(math.prod(s) for _, s in shapes(names))
        cases.append(Case("style_loss", f"VGG-16 {label} at {image}x{image}, batch {batch}", elements, dtype, make,
                          steps))
    return cases


# --- window attention -----------------------------------------------------------------------------

SWIN_T_STAGES = ((1, 56, 3), (2, 28, 6), (3, 14, 12), (4, 7, 24))   # (stage, resolution, heads); d=32, 7x7


def window_eager(q, k, v, bias, mask, scale):
    """The original Swin code's WindowAttention between its qkv and proj (tests/transcriptions.py),
    with CUDA bf16 autocast's casts written out: the products in the inputs' dtype, the fp32
    relative-position bias (and fp32 mask) promote the logits to fp32, softmax in fp32, its
    result cast back for the product with v."""
    B_, heads, N, _ = q.shape
    q = q * scale
    attn = q @ k.transpose(-2, -1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, N, N)
    attn = torch.softmax(attn.float(), dim=-1)
    return attn.to(v.dtype) @ v


def window_cases(batch=128, dtype="bf16", window=7, d=32) -> List[Case]:
    import fastnote

    dt = DTYPES[dtype]
    N = window * window
    cases = []
    for stage, res, heads in SWIN_T_STAGES:
        nW = (res // window) ** 2
        masked = res > window          # the shifted blocks; the last stage's window covers the map
        B_ = batch * nW

        def make(B_=B_, heads=heads, nW=nW, masked=masked):
            return dict(q=_leaf(B_, heads, N, d, dtype=dt), k=_leaf(B_, heads, N, d, dtype=dt),
                        v=_leaf(B_, heads, N, d, dtype=dt), bias=_leaf(heads, N, N),
                        mask=torch.zeros(nW, N, N) if masked else None,
                        grad=_leaf(B_, heads, N, d, dtype=dt, grad=False))

        def run(fn):
            def step(i):
                out = fn(i["q"], i["k"], i["v"], i["bias"], i["mask"], d ** -0.5)
                return backward_through(out, i["grad"], [i["q"], i["k"], i["v"], i["bias"]])
            return step

        steps = {"eager": run(window_eager),
                 "reference": run(lambda q, k, v, b, m, s: fastnote.reference.window_attention(q, k, v, b, m, s)),
                 "fastnote": run(lambda q, k, v, b, m, s: fastnote.window_attention(q, k, v, b, m, s))}
        cases.append(Case("window_attention", f"Swin-T stage {stage}: {B_} windows x {heads} heads, 7x7"
                          + (", shift mask" if masked else ""), B_ * heads * N, dtype, make, steps))
    return cases


# --- h-swish and squeeze-excitation ---------------------------------------------------------------

# MobileNetV3-Large at 224 (Howard et al., table 1; torchvision's config): per block, the expanded
# channels, the resolution of the depthwise output, SE, h-swish. The expand conv's h-swish runs at
# the block's input resolution (twice the output's in a stride-2 block).
MOBILENETV3_L = (  # (block, expanded C, input res, output res, SE, h-swish)
    (1, 16, 112, 112, False, False), (2, 64, 112, 56, False, False), (3, 72, 56, 56, False, False),
    (4, 72, 56, 28, True, False), (5, 120, 28, 28, True, False), (6, 120, 28, 28, True, False),
    (7, 240, 28, 14, False, True), (8, 200, 14, 14, False, True), (9, 184, 14, 14, False, True),
    (10, 184, 14, 14, False, True), (11, 480, 14, 14, True, True), (12, 672, 14, 14, True, True),
    (13, 672, 14, 7, True, True), (14, 960, 7, 7, True, True), (15, 960, 7, 7, True, True),
)


def _make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def squeeze_excitation_module(C: int, Cr: int):
    """torchvision's SqueezeExcitation with MobileNetV3's hard-sigmoid gate (its own class when
    torchvision imports here, else the transcription in tests/transcriptions.py)."""
    try:
        from fastnote.compat import torchvision_op_schemas

        torchvision_op_schemas()
        from torchvision.ops.misc import SqueezeExcitation
    except Exception:
        SqueezeExcitation = transcriptions().TorchvisionSqueezeExcitation
    return SqueezeExcitation(C, Cr, scale_activation=torch.nn.Hardsigmoid)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` by replacing each parameter (``Module.to`` cannot swap fake parameters)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
    return module


def hswish_se_cases(batch=256, dtype="bf16") -> List[Case]:
    """MobileNetV3-L's SE blocks (the h-swish blocks' SE takes the h-swish's input: hswish_se, as
    fastnote.patch fuses them)."""
    import fastnote

    dt = DTYPES[dtype]
    cases = []
    for block, C, _, r, se, hs in MOBILENETV3_L:
        if not se:
            continue
        Cr = _make_divisible(C // 4)

        def make(C=C, r=r, Cr=Cr):
            return dict(x=_leaf(batch, C, r, r, dtype=dt), se=_cast(squeeze_excitation_module(C, Cr), dt),
                        grad=_leaf(batch, C, r, r, dtype=dt, grad=False))

        def weights(i):
            se = i["se"]
            return se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias

        def run(fn):
            return lambda i: backward_through(fn(i), i["grad"], [i["x"], *weights(i)])

        if hs:
            steps = {"eager": run(lambda i: i["se"](F.hardswish(i["x"]))),
                     "reference": run(lambda i: fastnote.reference.hswish_se(i["x"], *weights(i))),
                     "fastnote": run(lambda i: fastnote.hswish_se(i["x"], *weights(i)))}
            what = "h-swish + SE"
        else:
            steps = {"eager": run(lambda i: i["se"](i["x"])),
                     "reference": run(lambda i: fastnote.reference.squeeze_excitation(i["x"], *weights(i))),
                     "fastnote": run(lambda i: fastnote.squeeze_excitation(i["x"], *weights(i)))}
            what = "SE"
        cases.append(Case("hswish_se" if hs else "squeeze_excitation",
                          f"block {block} {what} [{batch}, {C}, {r}, {r}]", batch * C * r * r, dtype, make, steps))
    return cases


# ------------------------------------------------------------------------------------------------
# Whole training steps: every example at its --full size, eager against patched
# ------------------------------------------------------------------------------------------------

# label -> (example module, its training() keywords, dtype: "bf16" = the step under bf16 autocast)
STEP_MODELS = {
    "SAGAN 64x64": ("sagan", {}, "fp32"),
    "Swin-T 224 (timm)": ("swin_classifier", {"source": "timm"}, "bf16"),
    "Swin-T 224 (torchvision)": ("swin_classifier", {"source": "torchvision"}, "bf16"),
    "MobileNetV3-L 224": ("mobilenetv3", {}, "bf16"),
    "CUT PatchNCE 256": ("cut_patchnce", {}, "fp32"),
    "CLIP n=16384": ("clip_step", {}, "bf16"),
    "style transfer 256": ("style_transfer", {}, "fp32"),
}


class CudaAutocastFp32(torch.overrides.TorchFunctionMode):
    """The ops CUDA's autocast runs in fp32 and CPU's does not, cast as CUDA's autocast casts them
    while CPU autocast is on: softmax, layer_norm, group_norm, exp/log/pow, the losses get fp32
    copies of their half inputs; sums, products and norms get ``dtype=torch.float32`` (no copy),
    and ``F.normalize`` divides by an fp32 norm (an fp32 result, as on a GPU). Together with
    ``torch.autocast("cpu", bf16)``, whose lower-precision list (convolutions, linear, matmul,
    bmm, addmm, baddbmm, SDPA) is CUDA's, a step on fake CPU tensors keeps the dtypes it has on a
    GPU."""

    def __init__(self):
        super().__init__()
        T = torch.Tensor
        self.cast = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, T.softmax, T.log_softmax,
                     F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.cosine_similarity,
                     torch.exp, T.exp, torch.log, T.log, torch.pow, T.pow, T.__pow__, torch.rsqrt, T.rsqrt,
                     torch.reciprocal, T.reciprocal, torch.logsumexp, T.logsumexp, F.softplus, F.cross_entropy,
                     F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.binary_cross_entropy_with_logits,
                     F.kl_div}
        self.with_dtype = {torch.sum, T.sum, torch.prod, T.prod, torch.cumsum, T.cumsum, torch.cumprod, T.cumprod,
                           torch.norm, T.norm, torch.linalg.vector_norm}

    @staticmethod
    def _half(a) -> bool:
        return isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (torch.is_autocast_enabled("cpu") and any(map(self._half, list(args) + list(kwargs.values())))):
            return func(*args, **kwargs)
        if func in self.cast:
            args = tuple(a.float() if self._half(a) else a for a in args)
            kwargs = {k: v.float() if self._half(v) else v for k, v in kwargs.items()}
        elif func in self.with_dtype and kwargs.get("dtype") is None:
            kwargs = dict(kwargs, dtype=torch.float32)
        elif func is F.normalize:
            return _normalize_fp32_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _normalize_fp32_norm(input, p=2.0, dim=1, eps=1e-12, out=None):
    """``F.normalize`` as under CUDA autocast: the norm in fp32, so the quotient is fp32."""
    norm = torch.linalg.vector_norm(input, p, dim, keepdim=True, dtype=torch.float32)
    return input / norm.clamp_min(eps).expand_as(input)


@dataclasses.dataclass
class StepMeasurement:
    model: str
    provider: str
    dtype: str
    batch: int
    params_MiB: float        # parameters and buffers (every module the step uses)
    optimizer_MiB: float     # the optimisers' state, after a first step made it
    data_MiB: float          # the batch
    grads_MiB: float         # gradients alive at the peak
    activations_MiB: float   # everything else alive at the peak: saved activations, temporaries
    peak_MiB: float
    grads_after_MiB: float   # gradients alive once the step is over
    fastnote_ops: int        # fastnote op calls in the step


def _examples(name: str):
    from fastnote.testing import load_example

    return load_example(name)


class _Fakeify:
    """Replaces, in place, every real tensor a training step can reach (parameters and buffers of
    its modules, tensors held by its loss objects, the optimisers' parameter lists) by a fake one
    made by ``fake_mode.from_tensor`` (``Module.to`` cannot: it swaps tensors)."""

    def __init__(self, fake_mode):
        self.fake_mode = fake_mode
        self.memo: Dict[int, torch.Tensor] = {}
        self.seen = set()

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if _is_fake(t):
            return t
        f = self.memo.get(id(t))
        if f is None:
            f = self.fake_mode.from_tensor(t)
            if isinstance(t, torch.nn.Parameter) and not isinstance(f, torch.nn.Parameter):
                f = torch.nn.Parameter(f, requires_grad=t.requires_grad)
            self.memo[id(t)] = f
        return f

    def visit(self, obj, depth: int = 0) -> None:
        if depth > 8 or id(obj) in self.seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return
        self.seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            for m in obj.modules():
                for store in (m._parameters, m._buffers):
                    for k, v in list(store.items()):
                        if v is not None:
                            store[k] = self.tensor(v)
                for k, v in list(vars(m).items()):
                    if isinstance(v, torch.Tensor):
                        m.__dict__[k] = self.tensor(v)
                    elif not k.startswith("_"):
                        self.visit(v, depth + 1)
                for hook in list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values()):
                    self.visit(hook, depth + 1)
        elif isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                group["params"] = [self.tensor(p) for p in group["params"]]
        elif isinstance(obj, (list, dict)):
            items = enumerate(obj) if isinstance(obj, list) else list(obj.items())
            for k, v in items:
                if isinstance(v, torch.Tensor):
                    obj[k] = self.tensor(v)
                else:
                    self.visit(v, depth + 1)
        elif isinstance(obj, tuple):
            for v in obj:
                self.visit(v, depth + 1)
        elif callable(obj) and getattr(obj, "__closure__", None):
            for cell in obj.__closure__:
                try:
                    v = cell.cell_contents
                except ValueError:
                    continue
                if isinstance(v, torch.Tensor):
                    cell.cell_contents = self.tensor(v)
                else:
                    self.visit(v, depth + 1)
        elif hasattr(obj, "__dict__") and not type(obj).__module__.startswith(("torch", "builtins", "numpy")):
            for k, v in list(vars(obj).items()):
                if isinstance(v, torch.Tensor):
                    setattr(obj, k, self.tensor(v))
                else:
                    self.visit(v, depth + 1)


def _storages(tensors) -> Dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            out[st._cdata] = blocks(st.nbytes())
    return out


def measure_step(label: str, use_fastnote: bool) -> StepMeasurement:
    """One training step of an example at its --full size, as ``Training.step`` runs it, after a
    first step that made the optimisers' state. The model is built and patched for real on the
    CPU, then its tensors swapped for fake ones; bf16 examples run under CPU autocast with
    CUDA's fp32 list added (``CudaAutocastFp32``); optimisers use their foreach implementation,
    the default on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    example, kwargs, dtype = STEP_MODELS[label]
    module = _examples(example)
    with backend_choice("reference"):      # what the build computes for real (style Grams): no interpreter
        training = module.training(use_fastnote, full=True, device="cpu",
                                   amp=torch.bfloat16 if dtype == "bf16" else None, **kwargs)
    with kernel_path():
        fake_mode = FakeTensorMode()
        fakeify = _Fakeify(fake_mode)
        fakeify.visit(training.modules)
        for phase in training.phases:
            fakeify.visit(phase.loss)
            fakeify.visit(phase.optimizer)
            for group in phase.optimizer.param_groups:
                if "foreach" in group:
                    group["foreach"] = True
        optimizers = [phase.optimizer for phase in training.phases]
        with fake_mode, CudaAutocastFp32():
            batch = training.next_batch()
            training.step(batch)               # makes the optimisers' state
            training.zero_grad()
            held = list(fakeify.memo.values())
            state = [t for opt in optimizers for st in opt.state.values() for t in st.values()
                     if isinstance(t, torch.Tensor)]
            data = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
            tracker = MemoryTracker()
            parts = {name: sum(tracker.track(t, name) for t in tensors)
                     for name, tensors in (("params", held), ("optimizer", state), ("data", data))}
            trainable = [t for t in held if isinstance(t, torch.nn.Parameter) and t.requires_grad]

            def grad_bytes() -> int:
                return sum(_storages(p.grad for p in trainable if p.grad is not None).values())

            grads_at_peak = [0]
            tracker.on_peak = lambda: grads_at_peak.__setitem__(0, grad_bytes())
            with tracker, _no_gc():
                training.step(batch)
            grads_after = grad_bytes()
    grads = grads_at_peak[0]
    activations = tracker.peak - sum(parts.values()) - grads
    values = (parts["params"], parts["optimizer"], parts["data"], grads, activations, tracker.peak, grads_after)
    return StepMeasurement(label, "fastnote" if use_fastnote else "eager", dtype, module.FULL["batch"],
                           *(round(v / MiB, 1) for v in values), len(tracker.ops))


FAMILIES = {
    "sagan": sagan_cases,
    "clip": clip_cases,
    "patch_nce": patch_nce_cases,
    "style": style_cases,
    "window": window_cases,
    "hswish_se": hswish_se_cases,
    "siglip": siglip_cases,
}


# ------------------------------------------------------------------------------------------------
# The fake registrations against the launchers (real CPU tensors, small sizes, launches stubbed)
# ------------------------------------------------------------------------------------------------

def small_cases() -> List[Case]:
    """Every family at sizes that real CPU tensors hold in a few MB (odd sizes included, for the
    512-byte rounding)."""
    return (sagan_cases(sides=(8, 13), B=2, C=32) + clip_cases(ns=(48, 200), d=24)
            + patch_nce_cases(ms=(40, 130), d=16) + style_cases(batch=2, image=32)
            + window_cases(batch=2) + hswish_se_cases(batch=2) + siglip_cases(ns=(48, 200), d=24))


# What each op's launchers allocate beside their outputs and free before returning (the difference
# between the launchers' peak and the fake registrations'); an op not listed allocates none.
SCRATCH = {
    "fastnote.clip_loss.default": "the per-row cross-entropies of both directions (2 x [n] fp32), summed "
                                  "into the loss",
    "fastnote.clip_loss_backward.default": "r = the per-row terms of d logit_scale ([n] fp32), summed",
    "fastnote.siglip_loss.default": "each image row's sum of loss terms ([n] fp32), summed into the loss",
    "fastnote.siglip_loss_backward.default": "each image row's shares of d logit_scale and d logit_bias "
                                             "([2, n] fp32), summed",
    "fastnote.patch_nce_loss_backward.default": "the upstream gradient divided by its largest magnitude "
                                                "([R] fp32) and that maximum",
    "fastnote.style_loss.default": "split-K partial Gram tiles ([splits, B*T, BLOCK, BLOCK] fp32, T tiles on "
                                   "or above the diagonal) and the per-program partial losses",
    "fastnote.window_attention_backward.default": "the bias-gradient partials ([slots, heads, N, N] fp32) "
                                                  "before their sum, that sum in fp32 before its cast",
    "fastnote.squeeze_excitation.default": "the gate g ([B, C] fp32)",
    "fastnote.squeeze_excitation_backward.default": "g recomputed and dg ([B, C] fp32 each), the MLP's "
                                                    "activations and gradients ([B, Cr], [B, C] fp32) and "
                                                    "the fp32 weight gradients before their cast",
}


@dataclasses.dataclass
class LauncherCheck:
    """One case measured twice: fake tensors through the fake registrations, and real CPU tensors
    through the ops' bodies (the launchers) with the Triton launch stubbed."""
    case: Case
    fake: Measurement
    launchers: Measurement

    def timeline(self, m: Measurement):
        return [(o.op, o.entry, o.exit) for o in m.ops]

    @property
    def same_outputs(self) -> bool:
        """Every op call finds the same live bytes and leaves the same: the fake registrations
        declare exactly the bytes the launchers return, and nothing else differs."""
        return self.timeline(self.fake) == self.timeline(self.launchers)

    @property
    def explained_peak(self) -> int:
        """The launchers' peak as the fake run and the scratch inside each op predict it."""
        return max([self.fake.peak] + [o.inner for o in self.launchers.ops])

    def scratch(self) -> Dict[str, int]:
        """op -> the most scratch one call of it held (bytes beyond its outputs)."""
        out: Dict[str, int] = {}
        for o in self.launchers.ops:
            out[o.op] = max(out.get(o.op, 0), o.scratch)
        return out


def check_launchers(cases: Optional[Sequence[Case]] = None) -> List[LauncherCheck]:
    checks = []
    for case in cases if cases is not None else small_cases():
        fake = measure(case.make, case.steps["fastnote"])
        real = measure(case.make, case.steps["fastnote"], fake=False, inside=True, stub=True)
        checks.append(LauncherCheck(case, fake, real))
    return checks


# ------------------------------------------------------------------------------------------------
# Running, writing
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    op: str
    case: str
    provider: str
    dtype: str
    size: int
    peak_MiB: float
    inputs_MiB: float
    added_MiB: float
    fastnote_ops: int          # fastnote op calls the step made (0 for eager and the reference)
    largest_at_peak: str       # the three largest storages alive at the peak, inputs aside

    @classmethod
    def of(cls, case: Case, provider: str, m: Measurement) -> "Row":
        largest = [f"{label} {n / MiB:.1f}" for label, n in m.at_peak if not label.startswith("input")][:3]
        return cls(case.op, case.case, provider, case.dtype, case.size, round(m.peak / MiB, 3),
                   round(m.inputs / MiB, 3), round(m.added / MiB, 3), len(m.ops), "; ".join(largest))


def run_cases(cases: Sequence[Case], providers: Sequence[str] = PROVIDERS, verbose: bool = True) -> List[Row]:
    rows = []
    if "fastnote eager path" in providers and not eager_path_available():
        providers = [p for p in providers if p != "fastnote eager path"]
        print("memory: fastnote/ops/_fast.py has no eager path here; 'fastnote eager path' not measured")
    for case in cases:
        for provider in providers:
            row = Row.of(case, provider, case.run(provider))
            rows.append(row)
            if verbose:
                print(f"{row.op:<18} {row.case:<58} {row.dtype:<5} {provider:<20} {row.added_MiB:>13,.1f} MiB"
                      f"  (inputs {row.inputs_MiB:,.1f})", flush=True)
    return rows


def run_steps(labels: Sequence[str] = tuple(STEP_MODELS), verbose: bool = True) -> List[StepMeasurement]:
    out = []
    for label in labels:
        for use_fastnote in (False, True):
            m = measure_step(label, use_fastnote)
            out.append(m)
            if verbose:
                print(f"{m.model:<26} {m.provider:<9} {m.dtype:<5} peak {m.peak_MiB:>9,.1f} MiB: "
                      f"params {m.params_MiB:,.1f}, optimizer {m.optimizer_MiB:,.1f}, data {m.data_MiB:,.1f}, "
                      f"grads {m.grads_MiB:,.1f}, activations {m.activations_MiB:,.1f}", flush=True)
    return out


CSV_HEADER = [
    f"# {LIMITS}",
    "# peak_MiB: the most live at once, inputs included; added_MiB = peak_MiB - inputs_MiB (what forward and "
    "backward add); MiB = 2^20 bytes. Inputs include the upstream gradient of ops with a tensor output.",
    "# fastnote: the custom ops' fake registrations; fastnote+workspaces: the ops' launchers run on the fake "
    "tensors with the Triton launch stubbed; fastnote eager path: _fast.py's autograd.Function, likewise; "
    "fastnote aux fix: the custom ops with their saved statistics marked non-differentiable (what-if).",
]
STEPS_HEADER = [
    f"# {LIMITS}",
    "# One training step (examples/<name>.py --full, Training.step) after a first step made the optimiser "
    "state; MiB = 2^20 bytes. peak_MiB = params + optimizer + data + grads + activations, all alive at the "
    "peak (grads: gradients alive then; activations: everything else, saved tensors and temporaries).",
    "# bf16 rows: CPU autocast (whose lower-precision list is CUDA's) plus CUDA's fp32 list (softmax, "
    "layer_norm, norms, ...) cast by hand; optimisers in their foreach implementation, the GPU default.",
]


def write_csv(rows: Sequence, path: str, header: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = [f.name for f in dataclasses.fields(type(rows[0]))]
    with open(path, "w", newline="", encoding="utf-8") as f:
        for line in header:
            f.write(line + "\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow(dataclasses.asdict(r))


def read_csv(path: str, cls=None) -> list:
    cls = cls or Row
    with open(path, newline="", encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    out = []
    for d in csv.DictReader(lines):
        out.append(cls(**{k: (int(v) if types[k] in (int, "int") else float(v) if types[k] in (float, "float")
                             else v) for k, v in d.items()}))
    return out


def merged(rows: List[Row], path: str) -> List[Row]:
    """``rows`` after the rows of ``path`` that they do not measure again (a run of some families
    keeps the others' results)."""
    if not os.path.exists(path):
        return rows
    def key(r):
        return r.op, r.case, r.dtype, r.provider

    fresh = {key(r): r for r in rows}
    try:
        old = read_csv(path)
    except (TypeError, ValueError, KeyError):     # another layout: replaced
        return rows
    kept = [fresh.pop(key(r), r) for r in old]    # in their place
    return kept + [r for r in rows if key(r) in fresh]


def slope(rows: Sequence[Row]) -> float:
    """Least-squares exponent of added bytes against size on log-log axes."""
    pts = [(math.log(r.size), math.log(max(r.added_MiB, 1e-9))) for r in rows]
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def scaling_rows(rows: Sequence[Row], op: str, dtype: str, provider: str) -> List[Row]:
    return [r for r in rows if r.op == op and r.dtype == dtype and r.provider == provider
            and not r.case.startswith("CUT default")]


def find(rows: Sequence[Row], op: str, case: str, provider: str, dtype: Optional[str] = None) -> Optional[Row]:
    for r in rows:
        if r.op == op and r.case == case and r.provider == provider and (dtype is None or r.dtype == dtype):
            return r
    return None


# (what, op, case, dtype, the limit on fastnote's added bytes in MiB as a function of the rows)
TARGETS = (
    ("SAGAN B=8 C=256 128x128: <= 300 MiB above the inputs", "sagan_attention", "B=8 C=256 128x128", "fp32",
     lambda rows: 300.0),
    ("CLIP n=2^20 d=512 bf16: <= 1.15x its two embedding gradients", "clip_loss", "n=1048576 d=512", "bf16",
     lambda rows: 1.15 * 2 * 2 ** 20 * 512 * 2 / MiB),
    ("PatchNCE all negatives M=2^18: <= 300 MiB above the inputs", "patch_nce", "all negatives M=262144 d=256",
     "fp32", lambda rows: 300.0),
)
TARGET_PROVIDERS = ("fastnote", "fastnote+workspaces", "fastnote eager path", "fastnote aux fix")


def targets(rows: Sequence[Row]) -> List[Tuple[str, str, float, float, bool]]:
    """(target, provider, measured MiB, limit MiB, met) for every fastnote variant measured."""
    out = []
    for what, op, case, dtype, limit in TARGETS:
        for provider in TARGET_PROVIDERS:
            r = find(rows, op, case, provider, dtype)
            if r is not None:
                lim = limit(rows)
                out.append((what, provider, r.added_MiB, lim, r.added_MiB <= lim))
    return out


HEADLINES = (  # (op, case, dtype) of the README table
    ("sagan_attention", "B=8 C=256 128x128", "fp32"),
    ("sagan_attention", "B=8 C=256 256x256", "fp32"),
    ("clip_loss", "n=65536 d=512", "fp32"),
    ("clip_loss", "n=1048576 d=512", "bf16"),
    ("siglip_loss", "n=1048576 d=768", "bf16"),
    ("patch_nce", "all negatives M=262144 d=256", "fp32"),
    ("patch_nce", "CUT default: 5 layers x 256 patches, batch 1, d=256", "fp32"),
    ("style_loss", "VGG-16 relu1_2..relu4_3 at 256x256, batch 16", "fp32"),
    ("window_attention", "Swin-T stage 1: 8192 windows x 3 heads, 7x7, shift mask", "bf16"),
    ("hswish_se", "block 12 h-swish + SE [256, 672, 14, 14]", "bf16"),
)


def _mib(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    return f"{v / 1024:,.2f} GiB" if v >= 10 * 1024 else f"{v:,.1f}"


def markdown(rows: Sequence[Row], steps: Sequence[StepMeasurement] = ()) -> str:
    """The README's tables: headline cases, targets, whole steps."""
    out = ["| op | case | dtype | eager | reference | fastnote | + workspaces | eager path |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for op, case, dtype in HEADLINES:
        got = {p: find(rows, op, case, p, dtype) for p in PROVIDERS}
        if got["fastnote"] is None:
            continue
        cells = [_mib(got[p].added_MiB if got[p] else None) for p in
                 ("eager", "reference", "fastnote", "fastnote+workspaces", "fastnote eager path")]
        out.append(f"| {op} | {case} | {dtype} | " + " | ".join(cells) + " |")
    t = targets(rows)
    if t:
        out += ["", "| target | fastnote | + workspaces | eager path | aux fix |", "|---|---:|---:|---:|---:|"]
        for what, *_ in TARGETS:
            cells = []
            for provider in TARGET_PROVIDERS:
                hit = [x for x in t if x[0] == what and x[1] == provider]
                cells.append(f"{hit[0][2]:,.1f} {'met' if hit[0][4] else '**not met**'}" if hit else "n/a")
            limit = [x[3] for x in t if x[0] == what][:1]
            out.append(f"| {what} (limit {limit[0]:,.1f} MiB) | " + " | ".join(cells) + " |" if limit else "")
    if steps:
        out += ["", "| model | dtype | batch | provider | params | optimizer | data | grads | activations "
                    "| peak |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for m in steps:
            out.append(f"| {m.model} | {m.dtype} | {m.batch} | {m.provider} | {m.params_MiB:,.1f} | "
                       f"{m.optimizer_MiB:,.1f} | {m.data_MiB:,.1f} | {m.grads_MiB:,.1f} | "
                       f"{m.activations_MiB:,.1f} | {m.peak_MiB:,.1f} |")
    return "\n".join(out)


PLOTTED = (("sagan_attention", "fp32", "SAGAN attention, B=8 C=256", "tokens N = H*W"),
           ("clip_loss", "fp32", "CLIP loss, d=512, fp32", "pairs n"),
           ("clip_loss", "bf16", "CLIP loss, d=512, bf16", "pairs n"),
           ("patch_nce", "fp32", "PatchNCE, all negatives, d=256", "patches M"),
           ("siglip_loss", "bf16", "SigLIP loss, d=768, bf16", "pairs n"))


def plot(rows: Sequence[Row], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("memory: matplotlib is not installed, no plot")
        return None
    panels = [p for p in PLOTTED if scaling_rows(rows, p[0], p[1], "fastnote")]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    styles = {"eager": ("tab:red", "o", "-"), "reference": ("tab:orange", "s", "--"),
              "fastnote": ("tab:blue", "^", "-"), "fastnote+workspaces": ("tab:cyan", "v", "--")}
    for ax, (op, dtype, title, xlabel) in zip(axes[0], panels):
        for provider, (color, marker, line) in styles.items():
            pr = scaling_rows(rows, op, dtype, provider)
            if pr:
                ax.plot([r.size for r in pr], [r.added_MiB for r in pr], marker=marker, color=color,
                        linestyle=line, markersize=4, label=f"{provider} (slope {slope(pr):.2f})")
        base = scaling_rows(rows, op, dtype, "fastnote")
        eager = scaling_rows(rows, op, dtype, "eager") or base
        xs = [r.size for r in base]
        # both guides start between fastnote's first point and eager's, so neither hides a curve
        start = math.sqrt(base[0].added_MiB * eager[0].added_MiB)
        for power, label in ((1, "O(n) guide"), (2, "O(n²) guide")):
            ax.plot(xs, [start * (x / xs[0]) ** power for x in xs], color="grey",
                    linestyle=":" if power == 1 else "-.", linewidth=1, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak above inputs (MiB)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Forward + backward peak memory above the inputs (fake tensors, 512-byte blocks; "
                 "not seen: workspaces inside an op, cuBLAS/cuDNN, fragmentation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    families = FAMILIES
    p.add_argument("--only", help="comma list of: " + ", ".join(list(families) + ["steps", "launchers"]))
    p.add_argument("--out", default=RESULTS, help="folder for the CSVs and memory.png (default %(default)s)")
    args = p.parse_args(argv)
    known = list(families) + ["steps", "launchers"]
    names = known if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--only: unknown {unknown}; known: {known}")
    start = time.perf_counter()
    rows: List[Row] = []
    for name in names:
        if name in families:
            rows += run_cases(families[name]())
    written = []
    if rows:
        written.append(os.path.join(args.out, "memory.csv"))
        if args.only:
            rows = merged(rows, written[-1])
        write_csv(rows, written[-1], CSV_HEADER)
        png = plot(rows, os.path.join(args.out, "memory.png"))
        written += [png] if png else []
    steps: List[StepMeasurement] = []
    if "steps" in names:
        steps = run_steps()
        written.append(os.path.join(args.out, "steps.csv"))
        write_csv(steps, written[-1], STEPS_HEADER)
    if "launchers" in names:
        print("\nfake registrations against the launchers (real CPU tensors, small sizes, launches stubbed):")
        bad = 0
        for c in check_launchers():
            ok = c.same_outputs and c.explained_peak == c.launchers.peak
            bad += not ok
            scratch = {k.replace("fastnote.", "").replace(".default", ""): v for k, v in c.scratch().items() if v}
            print(f"  {'ok ' if ok else 'BAD'} {c.case.op:<18} {c.case.case:<56} fake {c.fake.peak:>9} B, "
                  f"launchers {c.launchers.peak:>9} B; scratch {scratch}")
        if bad:
            print(f"memory: {bad} case(s) where the fake registrations and the launchers disagree")
    print(f"\n{LIMITS}\nMiB above the inputs (op tables), MiB in all (steps):\n")
    print(markdown(rows, steps))
    print(f"\nmemory: {len(rows)} op rows, {len(steps)} step rows -> {', '.join(written)} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
