"""Swap eager modules in an existing model for fastnote ones, in place, and back.

>>> import torch, fastnote
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Hardswish())
>>> report = fastnote.patch(model)
>>> list(report)
['1: Hardswish -> fastnote.nn.Hardswish']
>>> print(report)
fastnote.patch: 1 replaced, 0 left
  1 x Hardswish -> fastnote.nn.Hardswish  (1)
>>> fastnote.unpatch(model)
['1: fastnote.nn.Hardswish -> Hardswish']
>>> type(model[1]).__name__
'Hardswish'

What is recognised, by structure rather than by class name (so copies of the published code are
found too), with the family name ``include`` takes:

- ``Hardswish``, ``Hardsigmoid``: ``nn.Hardswish`` / ``nn.Hardsigmoid``.
- ``SqueezeExcitation``: a module made of two 1x1 convs (C -> Cr -> C), an activation, a gate and
  at most an average pool, whose forward is ``x * gate(conv2(act(conv1(mean(x)))))`` (checked on a
  small probe input): torchvision's ``SqueezeExcitation`` (``fc1``, ``fc2``), timm's
  ``SqueezeExcite`` (``conv_reduce``, ``conv_expand``) and copies using either pair of names.
- ``hswish_se``: in an ``nn.Sequential``, an ``nn.Hardswish`` (or a Sequential ending in one, as
  torchvision's ``Conv2dNormActivation``) directly followed by such an SE: the h-swish becomes an
  ``nn.Identity`` and the SE the fused ``hswish_se`` module. Where the order is not given by a
  Sequential (timm's ``InvertedResidual``), the pair is reported as left, and each part is
  replaced alone.
- ``WindowAttention``: Swin's / timm's ``WindowAttention`` (``qkv``, ``proj``,
  ``relative_position_bias_table``, an ``[N, N]`` ``relative_position_index``) -> the core op
  module ``fastnote.nn.WindowAttention``, inside a block that keeps its own shift, pad and
  partition code (the original Swin code's blocks; timm's where the fused path below is not used).
- ``ShiftedWindowAttention``: the fused path (shift, pad, partition and their reverse done by the
  attention kernel's index arithmetic). torchvision's ``ShiftedWindowAttention`` (flat ``[N*N]``
  index, ``[B, H, W, C]`` input) -> fastnote's, in torchvision's order (pad, then roll) with its
  shift rule; timm's ``SwinTransformerBlock`` -> the same block object's class switched to
  ``fastnote.nn.timm_swin.FusedSwinTransformerBlock``, in timm's order (roll, then pad), its
  ``attn`` left as it is (the fused ``_attn`` reads its parameters).
- ``SelfAttention``: SAGAN-shaped attention (``query_conv``, ``key_conv``, ``value_conv``,
  ``gamma``; query/key width C // 8) returning ``(out, attention)`` -> ``fastnote.nn.SelfAttention``
  with ``return_attention=True``, the same return convention (set the module's
  ``return_attention = False`` to get ``(out, None)`` and O(N) memory); and BigGAN's non-local
  block (``theta``, ``phi``, ``g``, ``o``, ``gamma``; keys and values 2x2 max-pooled) ->
  ``fastnote.nn.BigGANAttention``, its convs (spectral-norm ones included) kept as they are.
- ``spectral_norm``: torch's hook (``torch.nn.utils.spectral_norm``) and parametrization
  versions, and SAGAN's ``SpectralNorm`` wrapper (``module``, ``name``, ``power_iterations``,
  ``<name>_u/_v/_bar``) -> fastnote's, on the same u and v tensors, so training continues exactly.

A replacement reuses the original's parameter and buffer objects (an optimiser built before
patching keeps working), and keeps device, dtype, train/eval mode and the state_dict keys, so
checkpoints load before and after patching. ``fastnote.unpatch`` puts the originals back, with
any parameter or buffer object the model holds now (``model.to`` replaces buffers). Nothing is
drawn from the random generators.

The report lists what was replaced, in the ``"<path>: Old -> New"`` form (``list(report)``,
``len(report)``), and, in ``report.left``, what looked like a candidate but was left, with the
reason: a patch that stops applying shows there instead of passing silently; ``expect`` turns a
count mismatch into an error.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import nn as fnn
from .. import reference, testing
from ..nn.squeeze_excite import HardswishSqueezeExcitation, SqueezeExcite
from ..nn.timm_swin import TimmWindowAttention, fused_block_class
from ..nn.torchvision_swin import TorchvisionShiftedWindowAttention

__all__ = ["patch", "unpatch", "PatchReport", "Replaced", "Left", "KINDS"]

KINDS = ("Hardswish", "Hardsigmoid", "SqueezeExcitation", "hswish_se", "WindowAttention",
         "ShiftedWindowAttention", "SelfAttention", "spectral_norm")

_UNDO_ATTR = "_fastnote_patches"
_ORDER = itertools.count()


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Building replacements without touching the random generators
# ------------------------------------------------------------------------------------------------

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


def _display(cls: type) -> str:
    if cls is nn.Identity:
        return "torch.nn.Identity"
    if getattr(fnn, cls.__name__, None) is cls:
        return f"fastnote.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_fastnote(m) -> bool:
    return type(m).__module__.startswith("fastnote.")


def _probe_input(shape, like: torch.Tensor) -> torch.Tensor:
    # A private generator: the probe draws nothing from the global ones.
    gen = torch.Generator(device=like.device).manual_seed(1234)
    return torch.randn(shape, generator=gen, device=like.device, dtype=torch.float32).to(like.dtype)


def _probe_close(actual, expected, dtype) -> bool:
    # Structure recognition, not parity: another forward differs at O(1), rounding at ~1e-6.
    atol, rtol = testing.tolerance(dtype, "reduction")
    return isinstance(actual, torch.Tensor) and actual.shape == expected.shape and torch.allclose(
        actual.float(), expected.float(), atol=10 * atol, rtol=10 * rtol)


# ------------------------------------------------------------------------------------------------
# Converters: each returns (new module, note), (class, note) to switch the module itself to (a
# subclass of its own class), a Left reason (str), or None (not a candidate)
# ------------------------------------------------------------------------------------------------
Result = Union[None, str, Tuple[Union[nn.Module, type], str]]


def _activation(old: nn.Module, new_cls) -> Result:
    return _mode_of(old, new_cls(getattr(old, "inplace", False))), ""


_POOLS = (nn.AdaptiveAvgPool2d, nn.Identity)
_SE_NAMES = {("fc1", "fc2"): "torchvision", ("conv_reduce", "conv_expand"): "timm"}


def _se_parts(m: nn.Module):
    """(conv names, convs, act, gate) when ``m`` is shaped like an SE block, else None."""
    if _is_fastnote(m) or m._buffers or m._parameters:
        return None
    convs, acts = [], []
    for name, child in m.named_children():
        if isinstance(child, nn.Conv2d):
            convs.append((name, child))
        elif isinstance(child, _POOLS):
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size not in (1, (1, 1)):
                return None
        elif len(list(child.parameters())) == 0 and len(list(child.children())) == 0:
            acts.append(child)
        else:
            return None
    if len(convs) != 2 or len(acts) != 2:
        return None
    (n1, c1), (n2, c2) = convs
    for c in (c1, c2):
        if c.kernel_size != (1, 1) or c.stride != (1, 1) or c.padding != (0, 0) or c.groups != 1 \
                or c.dilation != (1, 1) or c.padding_mode != "zeros":
            return None
    if c1.out_channels != c2.in_channels or c2.out_channels != c1.in_channels:
        return None
    return (n1, n2), (c1, c2), acts[0], acts[1]


def _squeeze_excitation(old: nn.Module, hardswish_input: bool = False) -> Result:
    parts = _se_parts(old)
    if parts is None:
        return None
    (n1, n2), (c1, c2), act, gate = parts
    layout = _SE_NAMES.get((n1, n2))
    C, Cr = c1.in_channels, c1.out_channels
    try:
        if layout == "torchvision":
            cls = HardswishSqueezeExcitation if hardswish_input else fnn.SqueezeExcitation
            new = _on_meta(lambda: cls(C, Cr, activation=type(act), scale_activation=type(gate)))
        elif layout == "timm":
            new = _on_meta(lambda: SqueezeExcite(C, Cr, act_layer=type(act), gate_layer=type(gate),
                                                 hardswish_input=hardswish_input))
        else:
            return (f"SE-shaped, but its convs are named {n1!r}, {n2!r}: fastnote's SE modules keep "
                    "torchvision's (fc1, fc2) or timm's (conv_reduce, conv_expand) state_dict keys")
    except ValueError as e:
        return f"unsupported activation or gate: {e}"
    # The probe: the module's own forward must be the SE formula.
    w = c1.weight
    x = _probe_input((2, C, 3, 2), w)
    with torch.no_grad():
        want = reference.squeeze_excitation(x, c1.weight, c1.bias, c2.weight, c2.bias,
                                            activation=new.activation_name, gate=new.gate_name)
        try:
            got = old(x)
        except Exception as e:  # noqa: BLE001 - any failure means "not this structure"
            return f"SE-shaped, but its forward failed on a probe input ({type(e).__name__}: {e})"
    if not _probe_close(got, want, w.dtype):
        return "SE-shaped, but its forward is not x * gate(conv2(act(conv1(mean(x)))))"
    setattr(new, "fc1" if layout == "torchvision" else "conv_reduce", c1)
    setattr(new, "fc2" if layout == "torchvision" else "conv_expand", c2)
    return _mode_of(old, _no_meta_left(new, "SqueezeExcitation")), ""


def _window_pair(ws) -> Tuple[int, int]:
    return tuple(int(w) for w in ws) if isinstance(ws, (tuple, list)) else (int(ws), int(ws))


def _dropout_p(m, name) -> float:
    d = getattr(m, name, 0.0)
    return float(d.p if isinstance(d, nn.Dropout) else d or 0.0)


def _window_attention_like(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int) and hasattr(m, "window_size"))


def _v2_reason(m: nn.Module) -> Optional[str]:
    if hasattr(m, "cpb_mlp") or hasattr(m, "logit_scale"):
        return ("Swin V2 attention (cosine similarity, continuous position bias): fastnote has no kernel "
                "for it")
    return None


def _window_attention(old: nn.Module) -> Result:
    if not _window_attention_like(old) or _is_fastnote(old):
        return None
    table = getattr(old, "relative_position_bias_table", None)
    index = old._buffers.get("relative_position_index")
    if table is None or index is None:
        return _v2_reason(old)
    if index.dim() != 2:
        return None  # torchvision's layout: _shifted_window_attention
    wh, ww = _window_pair(old.window_size)
    heads = old.num_heads
    if tuple(table.shape) != ((2 * wh - 1) * (2 * ww - 1), heads) or tuple(index.shape) != (wh * ww, wh * ww):
        return "relative position table or index does not match window_size and num_heads"
    p = _dropout_p(old, "attn_drop")
    if p > 0:
        return f"attention dropout p={p} > 0: the kernels implement no dropout on the attention probabilities"
    attn_dim = old.qkv.out_features // 3
    if attn_dim % heads or old.proj.in_features != attn_dim or old.qkv.out_features != 3 * attn_dim:
        return "qkv / proj widths do not split into num_heads heads"
    head_dim = attn_dim // heads
    scale = float(getattr(old, "scale", head_dim ** -0.5))
    if "relative_position_index" in old._non_persistent_buffers_set:   # timm's layout
        if abs(scale - head_dim ** -0.5) > 1e-12 * scale:
            return f"scale {scale} is not head_dim ** -0.5 (timm's layout takes no qk_scale)"
        new = _on_meta(lambda: TimmWindowAttention(old.qkv.in_features, heads, head_dim=head_dim,
                                                   window_size=(wh, ww), qkv_bias=old.qkv.bias is not None))
    else:                                                               # Swin's: the index is saved
        new = _on_meta(lambda: fnn.WindowAttention(old.qkv.in_features, (wh, ww), heads,
                                                   qkv_bias=old.qkv.bias is not None, qk_scale=scale,
                                                   head_dim=head_dim))
    new.qkv, new.proj = old.qkv, old.proj
    new.relative_position_bias_table = table
    if isinstance(getattr(old, "proj_drop", None), nn.Module):
        new.proj_drop = old.proj_drop
    new._buffers["relative_position_index"] = index
    note = ("core op: the block around it keeps its own shift, pad and partition (timm rolls before "
            "padding, the fused path follows torchvision's order)")
    return _mode_of(old, _no_meta_left(new, "WindowAttention")), note


def _shifted_window_attention(old: nn.Module) -> Result:
    if not _window_attention_like(old) or _is_fastnote(old):
        return None
    table = getattr(old, "relative_position_bias_table", None)
    index = old._buffers.get("relative_position_index")
    if table is None or index is None:
        return _v2_reason(old) if hasattr(old, "shift_size") else None
    if index.dim() != 1:
        return None
    if not hasattr(old, "shift_size"):
        return "flat relative position index without shift_size: not torchvision's ShiftedWindowAttention"
    wh, ww = _window_pair(old.window_size)
    sh, sw = _window_pair(old.shift_size)
    if wh != ww:
        return f"rectangular window {old.window_size}: the fused path takes square windows"
    if sh != sw:
        return f"unequal shifts {old.shift_size}: the fused path takes one shift for both axes"
    p = _dropout_p(old, "attention_dropout")
    if p > 0:
        return f"attention dropout p={p} > 0: the kernels implement no dropout on the attention probabilities"
    C, heads = old.qkv.in_features, old.num_heads
    if old.qkv.out_features != 3 * C or old.proj.in_features != C or C % heads:
        return "qkv / proj widths do not match dim and num_heads"
    new = _on_meta(lambda: TorchvisionShiftedWindowAttention(
        C, [wh, ww], [sh, sw], heads, qkv_bias=old.qkv.bias is not None, proj_bias=old.proj.bias is not None,
        dropout=_dropout_p(old, "dropout")))
    new.qkv, new.proj = old.qkv, old.proj
    new.relative_position_bias_table = table
    new._buffers["relative_position_index"] = index
    note = "fused: pad, shift, partition, attention, reverse"
    return _mode_of(old, _no_meta_left(new, "ShiftedWindowAttention")), note


def _timm_swin_block(old: nn.Module) -> Result:
    """timm's ``SwinTransformerBlock`` (its class, not a look-alike: the fused path replaces the
    block's private ``_attn``) -> the same block on fastnote's fused path in timm's order."""
    cls = type(old)
    if cls.__name__ != "SwinTransformerBlock" or not cls.__module__.startswith("timm.") \
            or not callable(getattr(old, "_attn", None)):
        return None
    attn = getattr(old, "attn", None)
    ws, shift = tuple(getattr(old, "window_size", ())), tuple(getattr(old, "shift_size", ()))
    if attn is None or _is_fastnote(attn) or not _window_attention_like(attn) \
            or getattr(getattr(attn, "relative_position_index", None), "shape", None) != (ws[0] * ws[-1],) * 2:
        return ("timm Swin block whose attn is not timm's WindowAttention (or is already fastnote's core op): "
                "left on the block's own path")
    if len(ws) != 2 or ws[0] != ws[1] or len(shift) != 2 or shift[0] != shift[1]:
        return (f"timm Swin block with window {ws} and shift {shift}: the fused path takes square windows and "
                f"equal shifts (its attention core is still replaced)")
    dim = old.norm1.normalized_shape[-1] if hasattr(old.norm1, "normalized_shape") else attn.qkv.in_features
    if tuple(attn.qkv.weight.shape) != (3 * dim, dim) or tuple(attn.proj.weight.shape) != (dim, dim):
        return "timm Swin block whose attention width differs from the block's (head_dim set): fused path not used"
    if _dropout_p(attn, "attn_drop") > 0:
        return "timm Swin block with attention dropout: the fused path has none"
    # a class, not a module: the block itself is switched to it in place (_Patcher.reclass), so
    # what changes the block later (timm's set_input_size) changes what unpatch gives back
    return fused_block_class(cls), ("roll, pad, partition and their reverse fused into the attention (timm's "
                                    "order: roll, then pad)")


def _self_attention(old: nn.Module) -> Result:
    convs = [getattr(old, n, None) for n in ("query_conv", "key_conv", "value_conv")]
    gamma = getattr(old, "gamma", None)
    if _is_fastnote(old) or not all(isinstance(c, nn.Conv2d) for c in convs) or not isinstance(gamma, nn.Parameter):
        return None
    q, k, v = convs
    C = v.in_channels
    if any(c.kernel_size != (1, 1) or c.stride != (1, 1) or c.padding != (0, 0) or c.groups != 1
           or c.bias is None or c.in_channels != C for c in convs) or gamma.numel() != 1:
        return "SAGAN-shaped, but query/key/value are not 1x1 convs with bias on one input, or gamma is not a scalar"
    if q.out_channels != C // 8 or k.out_channels != C // 8 or v.out_channels != C or C < 8:
        return (f"SAGAN-shaped, but query/key have {q.out_channels}/{k.out_channels} channels and value "
                f"{v.out_channels} for in_dim {C}: fastnote.nn.SelfAttention has C // 8 and C")
    extra = [n for n, _ in old.named_parameters() if n not in ("gamma",) and not n.split(".")[0].endswith("_conv")]
    if extra:
        return f"SAGAN-shaped, but it has other parameters ({', '.join(extra)})"
    # The probe, on a copy with gamma != 0 (SAGAN starts at 0, where out == x says nothing).
    probe = copy.deepcopy(old)
    with torch.no_grad():
        probe.gamma.fill_(0.5)
        x = _probe_input((2, C, 3, 2), v.weight)
        qq, kk, vv = (c(x).flatten(2) for c in (probe.query_conv, probe.key_conv, probe.value_conv))
        want, want_attn = reference.sagan_attention(qq, kk, vv, x=x, gamma=probe.gamma, return_attention=True)
        try:
            got = probe(x)
        except Exception as e:  # noqa: BLE001
            return f"SAGAN-shaped, but its forward failed on a probe input ({type(e).__name__}: {e})"
    if not (isinstance(got, tuple) and len(got) == 2):
        return "SAGAN-shaped, but it does not return (out, attention) as SAGAN's Self_Attn does"
    if not (_probe_close(got[0], want, v.weight.dtype) and _probe_close(got[1], want_attn, v.weight.dtype)):
        return "SAGAN-shaped, but its forward is not SAGAN's gamma * (v @ softmax(q^T k)^T) + x"
    new = _on_meta(lambda: fnn.SelfAttention(C, getattr(old, "activation", None), return_attention=True))
    new.query_conv, new.key_conv, new.value_conv = q, k, v
    new.gamma = gamma
    return _mode_of(old, _no_meta_left(new, "SelfAttention")), "returns (out, attention) as the original"


def _biggan_attention(old: nn.Module) -> Result:
    convs = [getattr(old, n, None) for n in ("theta", "phi", "g", "o")]
    gamma = getattr(old, "gamma", None)
    if _is_fastnote(old) or not all(isinstance(c, nn.Conv2d) for c in convs) or not isinstance(gamma, nn.Parameter):
        return None
    theta, phi, g, o = convs
    C = theta.in_channels
    shapes = [(c.in_channels, c.out_channels) for c in convs]
    if shapes != [(C, C // 8), (C, C // 8), (C, C // 2), (C // 2, C)] or C < 8:
        return (f"BigGAN-shaped (theta, phi, g, o, gamma), but its convs map {shapes}: fastnote.nn.BigGANAttention "
                f"has C -> C // 8, C // 8, C // 2 and C // 2 -> C")
    if any(c.kernel_size != (1, 1) or c.stride != (1, 1) or c.padding != (0, 0) or c.groups != 1 or c.bias is not None
           for c in convs) or gamma.numel() != 1:
        return "BigGAN-shaped, but theta/phi/g/o are not bias-free 1x1 convs, or gamma is not a scalar"
    names = {"theta", "phi", "g", "o"}
    extra = [n for n, _ in old.named_parameters() if n != "gamma" and n.split(".")[0] not in names]
    if extra:
        return f"BigGAN-shaped, but it has other parameters ({', '.join(extra)})"
    # The probe, on a copy in eval mode (a spectral-norm conv then leaves its vectors alone, so
    # the two passes below see the same weights) with gamma != 0.
    probe = copy.deepcopy(old).eval()
    with torch.no_grad():
        probe.gamma.fill_(0.5)
        x = _probe_input((2, C, 4, 2), theta.weight)
        pool = torch.nn.functional.max_pool2d
        tt = probe.theta(x).flatten(2)
        pp, gg = (pool(c(x), [2, 2]).flatten(2) for c in (probe.phi, probe.g))
        want = probe.gamma * probe.o(reference.sagan_attention(tt, pp, gg).reshape(2, C // 2, 4, 2)) + x
        try:
            got = probe(x)
        except Exception as e:  # noqa: BLE001
            return f"BigGAN-shaped, but its forward failed on a probe input ({type(e).__name__}: {e})"
    if not _probe_close(got, want, theta.weight.dtype):
        return ("BigGAN-shaped, but its forward is not x + gamma * o(g' softmax(theta^T phi')^T) with 2x2-pooled "
                "phi', g'")
    new = _on_meta(lambda: fnn.BigGANAttention(C))
    new.theta, new.phi, new.g, new.o = theta, phi, g, o
    new.gamma = gamma
    new.which_conv = getattr(old, "which_conv", nn.Conv2d)
    return _mode_of(old, _no_meta_left(new, "BigGANAttention")), "pooled keys/values; the [B, N, N/4] map is not stored"


def _sagan_spectral_norm(old: nn.Module) -> Result:
    inner, name, n = getattr(old, "module", None), getattr(old, "name", None), getattr(old, "power_iterations", None)
    if _is_fastnote(old) or not isinstance(inner, nn.Module) or not isinstance(name, str) \
            or isinstance(n, bool) or not isinstance(n, int):
        return None
    params = inner._parameters
    if not all(isinstance(params.get(name + s), torch.Tensor) for s in ("_u", "_v", "_bar")) or name in params:
        return None
    if set(old._parameters) or set(old._buffers) or set(old._modules) != {"module"}:
        return "SAGAN SpectralNorm-shaped, but the wrapper holds more than the wrapped module"
    new = fnn.SpectralNorm(inner, name, n)  # finds <name>_u/_v/_bar: draws nothing
    return _mode_of(old, new), ""


# family -> converters tried on each module, in this order
CONVERTERS: Dict[str, Tuple[Callable[[nn.Module], Result], ...]] = {
    "Hardswish": (lambda m: _activation(m, fnn.Hardswish) if type(m) is nn.Hardswish else None,),
    "Hardsigmoid": (lambda m: _activation(m, fnn.Hardsigmoid) if type(m) is nn.Hardsigmoid else None,),
    "SqueezeExcitation": (_squeeze_excitation,),
    "WindowAttention": (_window_attention,),
    "ShiftedWindowAttention": (_shifted_window_attention, _timm_swin_block),
    "SelfAttention": (_self_attention, _biggan_attention),
    "spectral_norm": (_sagan_spectral_norm,),
}


# ------------------------------------------------------------------------------------------------
# Spectral-norm hooks and parametrizations (the module stays, its hook or parametrization changes)
# ------------------------------------------------------------------------------------------------

def _torch_sn_hook_module():
    import importlib

    return importlib.import_module("torch.nn.utils.spectral_norm")


def _patch_spectral_norm_in(module: nn.Module, path: str, patcher: "_Patcher") -> None:
    import importlib

    tsn = _torch_sn_hook_module()
    fsn_hook = importlib.import_module("fastnote.nn.utils.spectral_norm")

    for hid, hook in list(module._forward_pre_hooks.items()):
        if type(hook) is tsn.SpectralNorm:
            new = fsn_hook.SpectralNorm(hook.name, hook.n_power_iterations, hook.dim, hook.eps)
            holders = [h for h in module._state_dict_hooks.values() if getattr(h, "fn", None) is hook]
            holders += [getattr(h, "hook", h) for h in module._load_state_dict_pre_hooks.values()
                        if getattr(getattr(h, "hook", h), "fn", None) is hook]
            module._forward_pre_hooks[hid] = new
            for h in holders:
                h.fn = new
            where = _join(path, hook.name)
            patcher.record(_HookSwap(module, hid, hook, new, holders, where))
            patcher.replaced(Replaced(where, "torch.nn.utils.spectral_norm", "fastnote.nn.utils.spectral_norm"))
    plists = getattr(module, "parametrizations", None)
    if not isinstance(plists, nn.ModuleDict):
        return
    from torch.nn.utils import parametrizations as tp

    from ..nn.utils import parametrizations as fp

    for tensor_name, plist in plists.items():
        for i, p in enumerate(list(plist)):
            if type(p) is not tp._SpectralNorm:
                continue
            new = _parametrization_like(p, plist.original, fp._SpectralNorm)
            plist[i] = new
            where = _join(path, f"parametrizations.{tensor_name}.{i}")
            patcher.record(_ListSwap(plist, i, p, new, where))
            patcher.replaced(Replaced(where, "torch.nn.utils.parametrizations.spectral_norm",
                                      "fastnote.nn.utils.parametrizations.spectral_norm"))


def _parametrization_like(old: nn.Module, original: torch.Tensor, cls) -> nn.Module:
    # Built on a scratch copy of the weight with the generators forked (its constructor draws u, v
    # and warms them up), then handed the original's u and v tensors.
    devices = [original.device] if original.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        new = cls(original.detach().clone(), getattr(old, "n_power_iterations", 1), old.dim, old.eps)
    for name in ("_u", "_v"):
        if name in old._buffers:
            new._buffers[name] = old._buffers[name]
    return _mode_of(old, new)


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
    holders: list
    path: str

    def undo(self) -> Optional[str]:
        if self.module._forward_pre_hooks.get(self.hook_id) is not self.new:
            return None
        self.module._forward_pre_hooks[self.hook_id] = self.original
        for h in self.holders:
            h.fn = self.original
        return f"{self.path}: fastnote.nn.utils.spectral_norm -> torch.nn.utils.spectral_norm"


@dataclasses.dataclass
class _ListSwap:
    plist: nn.ModuleList
    index: int
    original: nn.Module
    new: nn.Module
    path: str

    def undo(self) -> Optional[str]:
        if self.plist[self.index] is not self.new:
            return None
        _adopt_state(self.original, self.new)
        self.original.train(self.new.training)
        self.plist[self.index] = self.original
        return (f"{self.path}: fastnote.nn.utils.parametrizations.spectral_norm -> "
                "torch.nn.utils.parametrizations.spectral_norm")


# ------------------------------------------------------------------------------------------------
# The walk
# ------------------------------------------------------------------------------------------------

def _last_hardswish(m: nn.Module, parent: nn.Module, name: str):
    """(owner, name, relative path) of the ``nn.Hardswish`` producing ``m``'s output, if ``m`` is
    one or a Sequential ending in one."""
    rel = name
    while isinstance(m, nn.Sequential) and len(m) > 0:
        parent, name = m, list(m._modules)[-1]
        m, rel = m._modules[name], f"{rel}.{name}"
    return (parent, name, rel) if type(m) is nn.Hardswish else None


def _previous_sibling_hardswish(parent: nn.Module, name: str) -> bool:
    """Whether the sibling registered just before ``name`` (Identities skipped) ends in an h-swish."""
    previous = None
    for n, child in parent.named_children():
        if n == name:
            break
        if not isinstance(child, nn.Identity):
            previous = child
    while previous is not None and len(previous._modules) > 0:
        previous = list(previous._modules.values())[-1]
    return isinstance(previous, (nn.Hardswish, fnn.Hardswish))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Patcher:
    def __init__(self, wanted):
        self.wanted = wanted
        self.report = PatchReport()
        self.records: list = []

    def record(self, rec) -> None:
        self.records.append((next(_ORDER), rec))

    def replaced(self, entry: Replaced) -> None:
        self.report.replaced.append(entry)

    def left(self, path: str, kind: str, reason: str) -> None:
        self.report.left.append(Left(path, kind, reason))

    def swap(self, parent: nn.Module, name: str, new: nn.Module, path: str, note: str = "") -> None:
        old = parent._modules[name]
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

    def fuse_hswish_se(self, parent: nn.Sequential, prefix: str) -> None:
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            producer = _last_hardswish(parent._modules[a], parent, a)
            se = parent._modules[b]
            if producer is None or _is_fastnote(se) or _se_parts(se) is None:
                continue
            result = _squeeze_excitation(se, hardswish_input=True)
            if not isinstance(result, tuple):
                continue  # reported when the SE itself is visited
            owner, hname, rel = producer
            hpath, spath = _join(prefix, rel), _join(prefix, b)
            self.swap(owner, hname, nn.Identity(), hpath, note=f"fused into the SE after it (hswish_se)")
            self.swap(parent, b, result[0], spath, note="hswish_se: takes the h-swish's input")

    def convert(self, parent: nn.Module, name: str, child: nn.Module, path: str) -> Optional[nn.Module]:
        for kind in KINDS:
            if kind not in self.wanted or kind not in CONVERTERS:
                continue
            for convert in CONVERTERS[kind]:
                result = convert(child)
                if isinstance(result, str):
                    self.left(path, kind, result)
                    return None
                if result is not None:
                    new, note = result
                    if isinstance(new, type):   # the same module, its class switched
                        return self.reclass(child, new, path, note)
                    self.swap(parent, name, new, path, note)
                    if kind == "SqueezeExcitation" and "hswish_se" in self.wanted \
                            and not isinstance(parent, nn.Sequential) and _previous_sibling_hardswish(parent, name):
                        self.left(path, "hswish_se",
                                  f"an h-swish feeds this SE inside {type(parent).__name__}.forward, not in a "
                                  "Sequential: the order is not known from structure, so the h-swish and the SE "
                                  "are replaced separately")
                    return new
        return None

    def visit(self, parent: nn.Module, prefix: str) -> None:
        if "spectral_norm" in self.wanted:
            _patch_spectral_norm_in(parent, prefix, self)
        if "hswish_se" in self.wanted and isinstance(parent, nn.Sequential):
            self.fuse_hswish_se(parent, prefix)
        used_by_parent = getattr(parent, "_fastnote_fused_children", ())   # a fused block reads these itself
        for name, child in list(parent._modules.items()):
            if child is None or name in used_by_parent:
                continue
            path = _join(prefix, name)
            new = None if _is_fastnote(child) else self.convert(parent, name, child, path)
            self.visit(new if new is not None else child, path)


def patch(model: nn.Module, include: Optional[Sequence[str]] = None, expect: Optional[int] = None) -> PatchReport:
    """Replace, in place, every submodule of ``model`` that fastnote has a drop-in for (the module
    docstring lists them), keeping parameters (the same objects), buffers, device, dtype,
    train/eval mode and state_dict keys.

    include: families to replace, among ``fastnote.patch.KINDS`` (default: all). expect: raise
    RuntimeError unless exactly this many replacements were made. Returns a ``PatchReport``.
    Patching twice replaces nothing more; ``fastnote.unpatch(model)`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if include is not None and (isinstance(include, str) or not all(isinstance(k, str) for k in include)):
        raise TypeError(f"include must be a list of family names, got {include!r}")
    wanted = set(KINDS if include is None else include)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"include must name families among {list(KINDS)}, got {sorted(unknown)}")
    if expect is not None and (isinstance(expect, bool) or not isinstance(expect, int)):
        raise TypeError(f"expect must be an int or None, got {type(expect).__name__}")
    patcher = _Patcher(wanted)
    patcher.visit(model, "")
    if patcher.records:
        model.__dict__.setdefault(_UNDO_ATTR, []).extend(patcher.records)
    report = patcher.report
    if expect is not None and len(report) != expect:
        raise RuntimeError(f"patch expected to replace {expect} modules, replaced {len(report)}:\n{report}")
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
