"""Drop-in nn.Modules built on fastnote.ops, with the parameter names existing checkpoints use."""
from .activation import Hardsigmoid, Hardswish
from .clip_loss import ClipLoss
from .patch_nce import PatchNCELoss
from .perceptual_loss import PerceptualLoss, PerceptualLossTerms, StyleLoss, TotalVariation
from .self_attention import BigGANAttention, PretrainedBigGANSelfAttn, SelfAttention
from . import utils
from .sagan_spectral_norm import SpectralNorm
from .siglip_loss import SigLipLoss
from .squeeze_excitation import HardswishSqueezeExcitation, SqueezeExcitation, SqueezeExcite
from .window_attention import ShiftedWindowAttention, WindowAttention
from .window_attention_v2 import ShiftedWindowAttentionV2, WindowAttentionV2

__all__ = ["utils", "Hardsigmoid", "Hardswish", "SelfAttention", "BigGANAttention", "SpectralNorm", "SqueezeExcitation",
           "ShiftedWindowAttention", "WindowAttention",
           "ShiftedWindowAttentionV2", "WindowAttentionV2", "SqueezeExcite", "HardswishSqueezeExcitation", "PerceptualLoss", "PerceptualLossTerms", "StyleLoss",
           "TotalVariation", "ClipLoss", "PatchNCELoss", "SigLipLoss", "PretrainedBigGANSelfAttn"]
