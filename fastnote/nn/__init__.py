"""Drop-in nn.Modules built on fastnote.ops, with the parameter names existing checkpoints use."""
from .activation import Hardsigmoid, Hardswish
from .squeeze_excitation import SqueezeExcitation

__all__ = ["Hardsigmoid", "Hardswish", "SqueezeExcitation"]
