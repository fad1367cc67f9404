"""Squeeze-excitation drop-ins, each with its library's state_dict keys: torchvision's
``SqueezeExcitation`` (``fc1.*``, ``fc2.*``), timm's ``SqueezeExcite`` (``conv_reduce.*``,
``conv_expand.*``), and the fused h-swish + SE block (``fastnote.hswish_se``) under either layout,
for an SE whose input is ``hard_swish(u)``: it takes ``u`` and never writes ``hard_swish(u)``."""
from __future__ import annotations

from torch import nn

from ..ops.squeeze_excitation import hswish_se, squeeze_excitation
from ._reads import CONV_REDUCE_EXPAND, FC1_FC2, check_intact

_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hard_swish"}
_GATES = {nn.Hardsigmoid: "hard_sigmoid", nn.Sigmoid: "sigmoid"}


def _module(activation) -> nn.Module:
    """An activation given as a class (torchvision's convention) or an instance, as a module."""
    return activation() if isinstance(activation, type) else activation


def _name(kind: str, activation, table) -> str:
    """The op's name for an activation given as a class (torchvision's convention) or instance."""
    cls = activation if isinstance(activation, type) else type(activation)
    for base, name in table.items():
        if issubclass(cls, base):
            return name
    names = ", ".join(f"nn.{b.__name__}" for b in table if b.__module__.startswith("torch"))
    raise ValueError(f"{kind} must be one of ({names}), got {activation!r}")


class SqueezeExcitation(nn.Module):
    """``x * scale_activation(fc2(activation(fc1(avgpool(x)))))``, as torchvision's
    ``SqueezeExcitation`` with ``fc1``/``fc2`` 1x1 convs, so its state_dicts load as they are.

    Defaults follow MobileNetV3 (``scale_activation=nn.Hardsigmoid``); torchvision's own default is
    ``nn.Sigmoid``: pass it explicitly when replacing a default-built torchvision module.

    The submodules are torchvision's (``avgpool``, ``fc1``, ``fc2``, ``activation``,
    ``scale_activation``), but the kernel computes the pool and the activations given at
    construction (``activation_name``, ``gate_name``) and reads only the convs' parameters:
    hooks on the pool and the activations do not run, and replacing one changes nothing
    (``fastnote.patch`` leaves an SE whose submodules hold hooks). A conv replaced (a LoRA
    adapter), or hooked after construction, raises a ``ValueError``, rather than be dropped.
    """

    def __init__(self, input_channels: int, squeeze_channels: int, activation=nn.ReLU,
                 scale_activation=nn.Hardsigmoid):
        super().__init__()
        self.activation_name = _name("activation", activation, _ACTIVATIONS)
        self.gate_name = _name("scale_activation", scale_activation, _GATES)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = _module(activation)
        self.scale_activation = _module(scale_activation)

    def forward(self, x):
        check_intact(self, FC1_FC2)
        return squeeze_excitation(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                  activation=self.activation_name, gate=self.gate_name)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name}, gate={self.gate_name}"


class SqueezeExcite(nn.Module):
    """``x * gate(conv_expand(act1(conv_reduce(mean_hw(x)))))`` with timm's names, so a timm
    ``SqueezeExcite`` state_dict loads as it is. ``act_layer`` / ``gate_layer``: a class or an
    instance among ReLU, SiLU, Hardswish / Hardsigmoid, Sigmoid (timm's default gate is Sigmoid,
    MobileNetV3's Hardsigmoid). ``hardswish_input=True``: the module receives the pre-activation
    ``u`` and computes ``SE(hard_swish(u))`` fused. The submodules are timm's (``conv_reduce``,
    ``act1``, ``conv_expand``, ``gate``); as in ``SqueezeExcitation``, the kernel computes the
    activations, hooks on ``act1`` and ``gate`` do not run, and a conv replaced or hooked raises.

    >>> import torch, fastnote
    >>> from fastnote.nn import SqueezeExcite
    >>> se = SqueezeExcite(16, 8, gate_layer=torch.nn.Hardsigmoid)
    >>> sorted(se.state_dict())
    ['conv_expand.bias', 'conv_expand.weight', 'conv_reduce.bias', 'conv_reduce.weight']
    >>> se(torch.randn(2, 16, 5, 5)).shape
    torch.Size([2, 16, 5, 5])
    """

    def __init__(self, in_chs: int, rd_channels: int, act_layer=nn.ReLU, gate_layer=nn.Sigmoid, *,
                 hardswish_input: bool = False):
        super().__init__()
        self.activation_name = _name("act_layer", act_layer, _ACTIVATIONS)
        self.gate_name = _name("gate_layer", gate_layer, _GATES)
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1)
        self.act1 = _module(act_layer)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1)
        self.gate = _module(gate_layer)
        self.hardswish_input = bool(hardswish_input)

    def forward(self, x):
        check_intact(self, CONV_REDUCE_EXPAND)
        fn = hswish_se if self.hardswish_input else squeeze_excitation
        return fn(x, self.conv_reduce.weight, self.conv_reduce.bias, self.conv_expand.weight,
                  self.conv_expand.bias, activation=self.activation_name, gate=self.gate_name)

    def extra_repr(self) -> str:
        return (f"activation={self.activation_name}, gate={self.gate_name}"
                + (", hardswish_input=True" if self.hardswish_input else ""))


class HardswishSqueezeExcitation(SqueezeExcitation):
    """``SqueezeExcitation(hard_swish(u))`` on the pre-activation ``u``, fused
    (``fastnote.hswish_se``), with torchvision's names ``fc1``, ``fc2``: what a MobileNetV3 block's
    depthwise h-swish followed by its SE computes, in one module.

    >>> import torch, fastnote
    >>> from fastnote.nn import HardswishSqueezeExcitation
    >>> se = HardswishSqueezeExcitation(16, 8)
    >>> u = torch.randn(2, 16, 5, 5)
    >>> torch.allclose(se(u), fastnote.nn.SqueezeExcitation.forward(se, torch.nn.functional.hardswish(u)),
    ...                atol=1e-5)
    True
    """

    def forward(self, u):
        check_intact(self, FC1_FC2)
        return hswish_se(u, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                         activation=self.activation_name, gate=self.gate_name)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", hardswish_input=True"
