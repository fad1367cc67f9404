"""Drop-in for torchvision.ops.SqueezeExcitation (same state_dict keys: fc1.*, fc2.*)."""
from __future__ import annotations

from torch import nn

from ..ops.squeeze_excitation import squeeze_excitation
from .activation import Hardsigmoid, Hardswish

_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hard_swish", Hardswish: "hard_swish"}
_GATES = {nn.Hardsigmoid: "hard_sigmoid", Hardsigmoid: "hard_sigmoid", nn.Sigmoid: "sigmoid"}


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
    """

    def __init__(self, input_channels: int, squeeze_channels: int, activation=nn.ReLU,
                 scale_activation=nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation_name = _name("activation", activation, _ACTIVATIONS)
        self.gate_name = _name("scale_activation", scale_activation, _GATES)

    def forward(self, x):
        return squeeze_excitation(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                  activation=self.activation_name, gate=self.gate_name)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name}, gate={self.gate_name}"
