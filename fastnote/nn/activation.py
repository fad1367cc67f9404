"""``Hardswish`` and ``Hardsigmoid`` are torch's own modules (``fastnote.ops.hardswish`` says why a
standalone activation is left to torch); the names stay here so code written against
``fastnote.nn.Hardswish`` keeps working, ``inplace`` included."""
from torch.nn import Hardsigmoid, Hardswish

__all__ = ["Hardsigmoid", "Hardswish"]
