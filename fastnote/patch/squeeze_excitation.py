"""Squeeze-excitation, and an h-swish feeding one (``hswish_se``).

- ``SqueezeExcitation``: a module made of two 1x1 convs (C -> Cr -> C), an activation, a gate and
  at most an average pool, whose forward is ``x * gate(conv2(act(conv1(mean(x)))))`` (checked on
  a probe input), with torchvision's (``fc1``, ``fc2``) or timm's (``conv_reduce``,
  ``conv_expand``) names -> ``fastnote.nn.SqueezeExcitation`` or fastnote's timm-layout
  ``SqueezeExcite``.
- ``hswish_se``: before the children of an ``nn.Sequential`` are visited, each ``nn.Hardswish``
  (or Sequential ending in one) directly followed by such an SE becomes an ``nn.Identity`` and the
  SE the fused module taking the h-swish's input; in timm's MobileNetV3 / EfficientNet blocks,
  the same with the h-swish that is the ``act`` of the norm before the SE (the block's forward
  checked on a probe). An SE replaced elsewhere whose previous sibling ends in an h-swish is
  reported as a left ``hswish_se`` pair: the order of a ``forward`` is not known from structure.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import nn as fnn
from .. import reference
from ..nn.squeeze_excitation import _ACTIVATIONS, _GATES
from .probe import (_bypassed_forward_reason, _has_hooks, _hook_reason, _hooked, _is_fastnote, _join, _meta_reason,
                    _mode_of, _no_meta_left, _on_meta, _probe_close, _probe_copy, _probe_input)
from .registry import Result, Site, register

_POOLS = (nn.AdaptiveAvgPool2d, nn.Identity)
_SE_NAMES = {("fc1", "fc2"): "torchvision", ("conv_reduce", "conv_expand"): "timm"}


def _parameter_free_leaf(m: nn.Module) -> bool:
    """An activation or gate as far as structure tells: no parameters, no children."""
    return not m._modules and next(m.parameters(), None) is None


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
        elif _parameter_free_leaf(child):
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


def _as_known(act: nn.Module, table) -> type:
    """The class in ``table`` that ``act`` is, or computes the same function as: libraries carry
    their own classes for the same activation (timm's ``Sigmoid``, ``HardSigmoid``, ``Swish``),
    which ``create_act_layer`` picks for RegNetY's and SE-ResNet's gates. ``type(act)`` when none
    matches (the constructor then names what it takes)."""
    if any(isinstance(act, base) for base in table):
        return type(act)
    x = torch.linspace(-8.0, 8.0, 161)
    try:
        with torch.no_grad():
            got = act(x.clone())    # a clone: the module may be in place
    except Exception:  # noqa: BLE001 - not a tensor function: leave it to the constructor's error
        return type(act)
    for base in table:
        if torch.is_tensor(got) and got.shape == x.shape and torch.allclose(got, base()(x), rtol=1e-6, atol=1e-6):
            return base
    return type(act)


def _convs_reason(m: nn.Module, n1: str, n2: str) -> Optional[str]:
    """``_bypassed_forward_reason`` for an SE's two convs, which the fused op reads by weight."""
    return _bypassed_forward_reason(m, ((n1, nn.Conv2d.forward), (n2, nn.Conv2d.forward)))


def _near_se_reason(m: nn.Module):
    """The reason to report ``m`` as left when it has an SE's two convs under torchvision's or
    timm's names and a gate, but more than ``_se_parts`` takes (RexNet's SE holds a BatchNorm
    between them), else None: a model's report then says its SEs stayed eager."""
    if _is_fastnote(m):
        return None
    children = m._modules
    for (n1, n2), library in _SE_NAMES.items():
        # a conv, or a module wrapping one in its place (peft's LoRA lora.Conv2d, a quantised conv)
        if not all(isinstance(children.get(n), nn.Module)
                   and any(isinstance(c, nn.Conv2d) for c in children[n].modules()) for n in (n1, n2)):
            continue
        gated = any(c is not None and _parameter_free_leaf(c) and _as_known(c, _GATES) in _GATES
                    for c in children.values())
        if not (isinstance(children[n1], nn.Conv2d) and isinstance(children[n2], nn.Conv2d)):
            reason = _convs_reason(m, n1, n2)
            if gated and reason is not None:
                return f"SE-shaped ({library}'s {n1}, {n2} and a gate), but {reason}"
            continue
        if gated:
            others = [f"{name} ({type(c).__name__})" for name, c in children.items() if name not in (n1, n2)]
            own = sorted(set(m._parameters) | set(m._buffers))
            return (f"SE-shaped ({library}'s {n1}, {n2} and a gate), but fastnote's SE is two 1x1 convs, "
                    f"an activation, a gate and a pool; this one holds {', '.join(others + own)}")
    return None


def _squeeze_excitation(old: nn.Module, hardswish_input: bool = False) -> Result:
    parts = _se_parts(old)
    if parts is None:
        return _near_se_reason(old)
    (n1, n2), (c1, c2), act, gate = parts
    act, gate = _as_known(act, _ACTIVATIONS), _as_known(gate, _GATES)
    layout = _SE_NAMES.get((n1, n2))
    C, Cr = c1.in_channels, c1.out_channels
    try:
        if layout == "torchvision":
            cls = fnn.HardswishSqueezeExcitation if hardswish_input else fnn.SqueezeExcitation
            new = _on_meta(lambda: cls(C, Cr, activation=act, scale_activation=gate))
        elif layout == "timm":
            new = _on_meta(lambda: fnn.SqueezeExcite(C, Cr, act_layer=act, gate_layer=gate,
                                                           hardswish_input=hardswish_input))
        else:
            return (f"SE-shaped, but its convs are named {n1!r}, {n2!r}: fastnote's SE modules keep "
                    "torchvision's (fc1, fc2) or timm's (conv_reduce, conv_expand) state_dict keys")
    except ValueError as e:
        return f"unsupported activation or gate: {e}"
    # The fused op reads the convs' weights and calls none of the submodules: their hooks (a
    # pruning mask, weight_norm, spectral norm) would stop running. The module's own hooks go to
    # its replacement (``_Patcher.swap``).
    reason = (_hook_reason(old, "SE-shaped", "the fused op reads the convs' weights and calls no submodule, so "
                           "the hook would stop running", own=False)
              or _convs_reason(old, n1, n2)
              or _meta_reason(c1.weight, "SE-shaped"))
    if reason is not None:
        return reason
    # The probe: the module's own forward (its hooks not run) must be the SE formula.
    w = c1.weight
    x = _probe_input((2, C, 3, 2), w)
    with torch.no_grad():
        want = reference.squeeze_excitation(x, c1.weight, c1.bias, c2.weight, c2.bias,
                                            activation=new.activation_name, gate=new.gate_name)
        try:
            got = old.forward(x)
        except Exception as e:  # noqa: BLE001 - any failure means "not this structure"
            return f"SE-shaped, but its forward failed on a probe input ({type(e).__name__}: {e})"
    if not _probe_close(got, want, w.dtype):
        return "SE-shaped, but its forward is not x * gate(conv2(act(conv1(mean(x)))))"
    # its own children, in its order: the convs (what the kernel reads), the pool and activations
    # under the names its library gives them (timm's SEModule: bn, act, gate)
    new._modules = type(old._modules)(old._modules)
    return _mode_of(old, _no_meta_left(new, "SqueezeExcitation")), ""


# ------------------------------------------------------------------------------------------------
# h-swish + SE
# ------------------------------------------------------------------------------------------------

def _plain_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` running its children in order: its class keeps Sequential's forward
    (a subclass with its own may use them in any other way)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _last_hardswish(m: nn.Module, parent: nn.Module, name: str):
    """(owner, name, relative path, [(relative path, module)] from ``m`` down to it) of the
    ``nn.Hardswish`` producing ``m``'s output, if ``m`` is one or a plain Sequential ending in one."""
    rel = name
    chain = [(rel, m)]
    while _plain_sequential(m) and len(m) > 0:
        parent, name = m, list(m._modules)[-1]
        m, rel = m._modules[name], f"{rel}.{name}"
        chain.append((rel, m))
    return (parent, name, rel, chain) if type(m) is nn.Hardswish else None


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
    return isinstance(previous, nn.Hardswish)


def _convert_se(old: nn.Module, site: Site) -> Result:
    result = _squeeze_excitation(old)
    if isinstance(result, tuple) and site.wants("hswish_se") and not isinstance(site.parent, nn.Sequential) \
            and _timm_block_pair(site.parent) is None and _previous_sibling_hardswish(site.parent, site.name):
        site.left("hswish_se",
                  f"an h-swish feeds this SE inside {type(site.parent).__name__}.forward, not in a "
                  "Sequential: the order is not known from structure, so only the SE is replaced "
                  "(the h-swish stays torch's)")
    return result


# timm's MobileNetV3 / EfficientNet / MnasNet blocks run ``... conv_dw, <norm>, aa, se ...`` in
# their forward, the norm a BatchNormAct2d (batch norm, drop, then its ``act``): with ``aa`` an
# Identity and ``act`` an h-swish, the SE's input is that h-swish's output.
_TIMM_BLOCK_NORM = {"InvertedResidual": "bn2", "DepthwiseSeparableConv": "bn1"}


def _timm_block_pair(block: nn.Module):
    """(norm name, norm, SE) when ``block`` is timm's own InvertedResidual or DepthwiseSeparableConv
    whose SE takes its norm's h-swish directly, else None."""
    cls = type(block)
    norm_name = _TIMM_BLOCK_NORM.get(cls.__name__)
    if norm_name is None or not cls.__module__.startswith("timm.models."):
        return None
    children = block._modules
    norm, aa, se = children.get(norm_name), children.get("aa"), children.get("se")
    if type(aa) is not nn.Identity or se is None or _is_fastnote(se) or _se_parts(se) is None:
        return None
    if type(norm).__name__ != "BatchNormAct2d" or not type(norm).__module__.startswith("timm.layers"):
        return None
    if type(norm._modules.get("act")) is not nn.Hardswish:
        return None
    return norm_name, norm, se


def _fused_block_probe(block: nn.Module, norm_name: str) -> Optional[str]:
    """None when ``block`` computes the same with its norm's h-swish moved in front of its SE
    (the input the fused SE takes), else the reason: its forward's order is checked on a probe
    copy in eval mode, not assumed."""
    twin = _probe_copy(block, f"{type(block).__name__} with an h-swish + SE pair")
    if isinstance(twin, str):
        return twin
    twin.eval()
    conv = next(m for m in twin.modules() if isinstance(m, nn.Conv2d))
    x = _probe_input((2, conv.in_channels, 4, 4), conv.weight)
    with torch.no_grad():
        try:
            want = twin(x)
            getattr(twin, norm_name).act = nn.Identity()
            twin.se = nn.Sequential(nn.Hardswish(), twin.se)
            got = twin(x)
        except Exception as e:  # noqa: BLE001
            return f"the block's forward failed on a probe input ({type(e).__name__}: {e})"
    if not _probe_close(got, want, conv.weight.dtype):
        return f"{type(block).__name__}.forward does not feed {norm_name}'s h-swish straight into the SE"
    return None


def _pair_hook_reason(prefix: str, chain, se_name: str, se: nn.Module) -> Optional[str]:
    """Fused, the h-swish's output never exists and the SE takes another input: the reason to
    leave the pair when a module on the way (``chain``: (relative path, module) pairs) or the SE
    holds a hook, which would see other tensors (the SE alone is still replaced), else None."""
    hooked = [path for path, m in chain if _has_hooks(m)]
    se_hook = _hooked(se)
    if se_hook is not None:
        hooked.append(_join(se_name, se_hook) if se_hook else se_name)
    if not hooked:
        return None
    return (f"{_join(prefix, hooked[0])} holds a forward or backward hook, which the fused h-swish + SE would "
            "show other tensors: the pair is not fused")


def _fuse_in_timm_block(block: nn.Module, prefix: str, patcher, norm_name: str, norm: nn.Module,
                        se: nn.Module) -> None:
    spath = _join(prefix, "se")
    chain = ((norm_name, norm), (f"{norm_name}.act", norm.act), ("aa", block.aa))
    reason = _pair_hook_reason(prefix, chain, "se", se) or _fused_block_probe(block, norm_name)
    if reason is not None:
        patcher.left(spath, "hswish_se", reason)
        return
    _fuse(patcher, norm, "act", _join(prefix, f"{norm_name}.act"), block, "se", spath)


def _fuse(patcher, act_owner: nn.Module, act_name: str, act_path: str, se_owner: nn.Module, se_name: str,
          se_path: str) -> None:
    """The h-swish ``act_owner.<act_name>`` becomes an Identity and the SE ``se_owner.<se_name>``
    the fused module taking its input; nothing when the SE is not recognised (reported when the
    SE itself is visited)."""
    result = _squeeze_excitation(se_owner._modules[se_name], hardswish_input=True)
    if isinstance(result, tuple):
        patcher.swap(act_owner, act_name, nn.Identity(), act_path, note="fused into the SE after it (hswish_se)")
        patcher.swap(se_owner, se_name, result[0], se_path, note="hswish_se: takes the h-swish's input")


def _fuse_hswish_se(parent: nn.Module, prefix: str, patcher) -> None:
    """In a plain Sequential, an h-swish (or a plain Sequential ending in one) followed by an SE:
    the h-swish becomes an Identity and the SE the fused module taking the h-swish's input.
    Where a module on the way holds a hook, the pair is left (the SE alone is then replaced when
    visited): the fusion would show the hook another tensor. In timm's blocks, the h-swish of the
    norm before the SE, the same way (the block's forward checked on a probe)."""
    pair = _timm_block_pair(parent)
    if pair is not None:
        _fuse_in_timm_block(parent, prefix, patcher, *pair)
        return
    if not _plain_sequential(parent):
        return
    names = list(parent._modules)
    for a, b in zip(names, names[1:]):
        producer = _last_hardswish(parent._modules[a], parent, a)
        se = parent._modules[b]
        if producer is None:
            continue
        spath = _join(prefix, b)
        if type(se) in (fnn.SqueezeExcitation, fnn.SqueezeExcite) and not getattr(se, "hardswish_input", False):
            patcher.left(spath, "hswish_se", "an h-swish feeds this SE, which an earlier patch replaced without "
                         "the h-swish: unpatch and patch again to fuse them")
            continue
        if _is_fastnote(se) or _se_parts(se) is None:
            continue
        owner, hname, rel, chain = producer
        reason = _pair_hook_reason(prefix, chain, b, se)
        if reason is not None:
            patcher.left(spath, "hswish_se", reason)
            continue
        _fuse(patcher, owner, hname, _join(prefix, rel), parent, b, spath)


register("SqueezeExcitation", (_convert_se,))
register("hswish_se", before_children=_fuse_hswish_se)
