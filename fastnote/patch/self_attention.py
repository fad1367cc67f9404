"""Attention over the whole map: SAGAN's and BigGAN's (two implementations).

- SAGAN's ``Self_Attn`` shape (``query_conv``, ``key_conv``, ``value_conv``, ``gamma``;
  query/key width C // 8) returning ``(out, attention)`` -> ``fastnote.nn.SelfAttention`` with
  ``return_attention=True``, the same return convention.
- BigGAN's non-local block (``theta``, ``phi``, ``g``, ``o``, ``gamma``; keys and values 2x2
  max-pooled) -> ``fastnote.nn.BigGANAttention``, its convs (spectral-norm ones included) kept.
- pytorch-pretrained-biggan's ``SelfAttn`` (``snconv1x1_theta``, ``snconv1x1_phi``,
  ``snconv1x1_g``, ``snconv1x1_o_conv``, a 2x2 ``maxpool``, ``gamma`` of shape [1]) -> the same
  block as ``fastnote.nn.PretrainedBigGANSelfAttn``, its spectral-norm convs kept (the
  spectral-norm family then replaces their hooks as anywhere else).

Both are checked on a probe input, on a copy with ``gamma != 0`` (SAGAN starts at 0, where the
output is the input whatever the attention computes).
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import nn

from .. import nn as fnn
from .. import reference
from .probe import (_is_fastnote, _meta_reason, _mode_of, _no_meta_left, _on_meta, _probe_close, _probe_copy,
                    _probe_input, _uncalled_hook_reason)
from .registry import Result, Site, register


def _self_attention(old: nn.Module, site: Optional[Site] = None) -> Result:
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
    reason = (_extra_state_reason(old, _SAGAN_CONVS, "SAGAN-shaped")
              or _uncalled_hook_reason(old, "SAGAN-shaped", _SAGAN_CONVS)
              or _meta_reason(v.weight, "SAGAN-shaped"))
    if reason is not None:
        return reason
    # The probe, on a copy with gamma != 0 (SAGAN starts at 0, where out == x says nothing).
    probe = _probe_copy(old, "SAGAN-shaped")
    if isinstance(probe, str):
        return probe
    with torch.no_grad():
        probe.gamma.fill_(0.5)
        x = _probe_input((2, C, 3, 2), v.weight)
        qq, kk, vv = (c(x).flatten(2) for c in (probe.query_conv, probe.key_conv, probe.value_conv))
        want, want_attn = reference.sagan_attention(qq, kk, vv, x=x, gamma=probe.gamma, return_attention=True)
        try:
            got = probe.forward(x)   # its own hooks (a user's) not run
        except Exception as e:  # noqa: BLE001
            return f"SAGAN-shaped, but its forward failed on a probe input ({type(e).__name__}: {e})"
    if not (isinstance(got, tuple) and len(got) == 2):
        return "SAGAN-shaped, but it does not return (out, attention) as SAGAN's Self_Attn does"
    if not (_probe_close(got[0], want, v.weight.dtype) and _probe_close(got[1], want_attn, v.weight.dtype)):
        return "SAGAN-shaped, but its forward is not SAGAN's gamma * (v @ softmax(q^T k)^T) + x"
    new = _on_meta(lambda: fnn.SelfAttention(C, getattr(old, "activation", None), return_attention=True))
    new._modules = type(old._modules)(old._modules)   # its convs and softmax, in its order
    new.gamma = gamma
    return _mode_of(old, _no_meta_left(new, "SelfAttention")), "returns (out, attention) as the original"


def _biggan_attention(old: nn.Module, site: Optional[Site] = None) -> Result:
    convs = [getattr(old, n, None) for n in ("theta", "phi", "g", "o")]
    gamma = getattr(old, "gamma", None)
    if _is_fastnote(old) or not all(isinstance(c, nn.Conv2d) for c in convs) or not isinstance(gamma, nn.Parameter):
        return None
    theta, phi, g, o = convs
    C = theta.in_channels
    reason = _non_local_convs_reason(convs, gamma, "BigGAN-shaped (theta, phi, g, o, gamma)", "BigGANAttention")
    if reason is not None:
        return reason
    names = ("theta", "phi", "g", "o")
    reason = (_extra_state_reason(old, names, "BigGAN-shaped")
              or _uncalled_hook_reason(old, "BigGAN-shaped", names))
    if reason is not None:
        return reason
    reason = _pooled_probe(old, C, theta.weight, ("theta", "phi", "g", "o"), "BigGAN-shaped")
    if reason is not None:
        return reason
    new = _on_meta(lambda: fnn.BigGANAttention(C))
    new.theta, new.phi, new.g, new.o = theta, phi, g, o
    new.gamma = gamma
    new.which_conv = getattr(old, "which_conv", nn.Conv2d)
    return _mode_of(old, _no_meta_left(new, "BigGANAttention")), "pooled keys/values; the [B, N, N/4] map is not stored"


_PRETRAINED_BIGGAN_CONVS = ("snconv1x1_theta", "snconv1x1_phi", "snconv1x1_g", "snconv1x1_o_conv")


def _pretrained_biggan_attention(old: nn.Module, site: Optional[Site] = None) -> Result:
    convs = [getattr(old, n, None) for n in _PRETRAINED_BIGGAN_CONVS]
    gamma, pool = getattr(old, "gamma", None), getattr(old, "maxpool", None)
    if _is_fastnote(old) or not all(isinstance(c, nn.Conv2d) for c in convs) or not isinstance(gamma, nn.Parameter):
        return None
    theta, phi, g, o = convs
    C = theta.in_channels
    reason = _non_local_convs_reason(convs, gamma, "BigGAN SelfAttn-shaped", "PretrainedBigGANSelfAttn")
    if reason is not None:
        return reason
    if not (isinstance(pool, nn.MaxPool2d) and _pair(pool.kernel_size) == (2, 2) and _pair(pool.stride) == (2, 2)
            and _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode):
        return "BigGAN SelfAttn-shaped, but its maxpool is not a 2x2 max pool of stride 2"
    reason = (_extra_state_reason(old, _PRETRAINED_BIGGAN_CONVS, "BigGAN SelfAttn-shaped")
              or _uncalled_hook_reason(old, "BigGAN SelfAttn-shaped", _PRETRAINED_BIGGAN_CONVS + ("maxpool",)))
    if reason is not None:
        return reason
    reason = _pooled_probe(old, C, theta.weight, _PRETRAINED_BIGGAN_CONVS, "BigGAN SelfAttn-shaped")
    if reason is not None:
        return reason
    return fnn.PretrainedBigGANSelfAttn.from_biggan(old), "pooled keys/values; the [B, N, N/4] map is not stored"


_SAGAN_CONVS = ("query_conv", "key_conv", "value_conv")


def _extra_state_reason(old: nn.Module, convs, what: str) -> Optional[str]:
    """The reason to leave ``old`` when it holds parameters or buffers besides ``gamma`` and those
    of its ``convs`` (a subclass's own state), which the replacement would drop, else None."""
    extra = [n for n, _ in itertools.chain(old.named_parameters(), old.named_buffers())
             if n != "gamma" and n.split(".", 1)[0] not in convs]
    if extra:
        return f"{what}, but it has other parameters or buffers ({', '.join(extra)}), which the replacement would drop"
    return None


def _non_local_convs_reason(convs, gamma: nn.Parameter, what: str, ours: str) -> Optional[str]:
    """None when BigGAN's theta, phi, g, o ``convs`` are bias-free 1x1 convs mapping C -> C // 8,
    C // 8, C // 2 and C // 2 -> C (C >= 8) and ``gamma`` is a scalar, else the reason."""
    C = convs[0].in_channels
    shapes = [(c.in_channels, c.out_channels) for c in convs]
    if shapes != [(C, C // 8), (C, C // 8), (C, C // 2), (C // 2, C)] or C < 8:
        return (f"{what}, but its convs map {shapes}: fastnote.nn.{ours} has C -> C // 8, C // 8, C // 2 and "
                f"C // 2 -> C")
    if any(c.kernel_size != (1, 1) or c.stride != (1, 1) or c.padding != (0, 0) or c.groups != 1 or c.bias is not None
           for c in convs) or gamma.numel() != 1:
        return f"{what}, but theta/phi/g/o are not bias-free 1x1 convs, or gamma is not a scalar"
    return None


def _pooled_probe(old: nn.Module, C: int, weight: torch.Tensor, convs, what: str) -> Optional[str]:
    """None when ``old`` computes x + gamma * o(g' softmax(theta^T phi')^T) with 2x2-pooled phi',
    g' (BigGAN's non-local block; ``convs``: the names of its theta, phi, g, o convs), else the
    reason. The probe runs on a copy in eval mode (a spectral-norm conv then leaves its vectors
    alone, so both passes see the same weights) with gamma != 0."""
    reason = _meta_reason(weight, what)
    if reason is not None:
        return reason
    probe = _probe_copy(old, what)
    if isinstance(probe, str):
        return probe
    probe.eval()
    theta, phi, g, o = (getattr(probe, n) for n in convs)
    with torch.no_grad():
        probe.gamma.fill_(0.5)
        x = _probe_input((2, C, 4, 2), weight)
        pool = torch.nn.functional.max_pool2d
        tt = theta(x).flatten(2)
        pp, gg = (pool(c(x), [2, 2]).flatten(2) for c in (phi, g))
        want = probe.gamma * o(reference.sagan_attention(tt, pp, gg).reshape(2, C // 2, 4, 2)) + x
        try:
            got = probe.forward(x)   # its own hooks (a user's) not run
        except Exception as e:  # noqa: BLE001
            return f"{what}, but its forward failed on a probe input ({type(e).__name__}: {e})"
    if not _probe_close(got, want, weight.dtype):
        return f"{what}, but its forward is not x + gamma * o(g' softmax(theta^T phi')^T) with 2x2-pooled phi', g'"
    return None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


register("SelfAttention", (_self_attention, _biggan_attention, _pretrained_biggan_attention))
