"""Drop-ins for torch.nn.Hardswish / Hardsigmoid."""
from torch import nn

from ..ops.hardswish import hard_sigmoid, hard_swish


class Hardswish(nn.Module):
    """Like ``torch.nn.Hardswish``. ``inplace`` is accepted for compatibility and ignored: the
    kernel writes a new tensor (in-place writes corrupt tensors saved for backward)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return hard_swish(x)


class Hardsigmoid(nn.Module):
    """Like ``torch.nn.Hardsigmoid`` (``inplace`` accepted and ignored, as for Hardswish)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return hard_sigmoid(x)
