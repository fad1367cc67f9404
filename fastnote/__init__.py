"""fastnote: fused Triton and CUDA kernels for GAN and vision-transformer training.

The public API is flat: ``from fastnote import hard_swish``. Drop-in modules live in
``fastnote.nn``; the plain-PyTorch oracle in ``fastnote.reference``.
"""
from . import nn, reference
from .ops.clip_loss import clip_loss
from .ops.gram import gram, style_loss
from .ops.hardswish import hard_sigmoid, hard_swish
from .ops.patch_nce import patch_nce_logits, patch_nce_loss, patch_nce_loss_layers, patch_sample
from .ops.power_iteration import power_iteration
from .ops.sagan_attention import sagan_attention
from .ops.siglip_loss import siglip_loss
from .ops.squeeze_excitation import hswish_se, squeeze_excitation
from .ops.tv_loss import tv_loss
from .ops.window_attention import swin_window_attention, window_attention
from .ops.window_attention_v2 import swin_window_attention_v2, window_attention_v2
from .patch import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "clip_loss",
    "gram",
    "hard_sigmoid",
    "hard_swish",
    "hswish_se",
    "patch_nce_logits",
    "patch_nce_loss",
    "patch_nce_loss_layers",
    "patch_sample",
    "power_iteration",
    "sagan_attention",
    "siglip_loss",
    "squeeze_excitation",
    "style_loss",
    "swin_window_attention",
    "swin_window_attention_v2",
    "tv_loss",
    "window_attention",
    "window_attention_v2",
    "nn",
    "patch",
    "unpatch",
    "reference",
]
