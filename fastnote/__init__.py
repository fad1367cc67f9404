"""fastnote: fused Triton and CUDA kernels for GAN and vision-transformer training.

The public API is flat: ``from fastnote import hard_swish``. Drop-in modules live in
``fastnote.nn``; the plain-PyTorch oracle in ``fastnote.reference``.
"""
from . import nn, reference
from .ops.hardswish import hard_sigmoid, hard_swish
from .ops.power_iteration import power_iteration
from .ops.sagan_attention import sagan_attention
from .ops.squeeze_excitation import hswish_se, squeeze_excitation
from .ops.window_attention import swin_window_attention, window_attention
from .patch import patch

__version__ = "0.1.0"

__all__ = [
    "hard_sigmoid",
    "hard_swish",
    "hswish_se",
    "power_iteration",
    "sagan_attention",
    "squeeze_excitation",
    "swin_window_attention",
    "window_attention",
    "nn",
    "patch",
    "reference",
]
