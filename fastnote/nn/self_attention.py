"""Drop-in for SAGAN's ``Self_Attn`` (same state_dict keys: query_conv.*, key_conv.*, value_conv.*,
gamma)."""
from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..ops.sagan_attention import sagan_attention


class SelfAttention(nn.Module):
    """SAGAN self-attention block: ``out = gamma * attention_output + x`` on x [B, C, W, H], with
    1x1 convs ``query_conv``, ``key_conv`` (C -> C // 8) and ``value_conv`` (C -> C) and the
    scalar ``gamma`` (initialised to 0), so a ``Self_Attn`` state_dict loads as it is.

    ``forward(x)`` returns ``(out, attention)`` like ``Self_Attn``, but ``attention`` is None
    unless ``return_attention=True``: not materialising the [B, N, N] map (N = W*H) is what makes
    the block O(N) in memory. With ``return_attention=True`` it is computed as well, O(N^2).

    ``activation`` is accepted and stored, unused, as ``Self_Attn`` does, so ``Self_Attn(C, 'relu')``
    call sites keep working; ``return_attention`` is keyword-only for the same reason. ``softmax``
    is there as in ``Self_Attn``, but the kernel computes the softmax: hooks on it do not run
    (``fastnote.patch`` leaves a ``Self_Attn`` whose softmax holds one).
    """

    def __init__(self, in_dim: int, activation=None, *, return_attention: bool = False):
        super().__init__()
        if in_dim < 8:
            raise ValueError(f"in_dim must be >= 8 (query/key convs have in_dim // 8 channels), got {in_dim}")
        self.chanel_in = in_dim  # Self_Attn's attribute name, spelling included
        self.activation = activation
        self.return_attention = return_attention
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        checks.tensor("x", x, ndim=4)
        B, C, W, H = x.shape
        N = W * H
        q = self.query_conv(x).reshape(B, -1, N)
        k = self.key_conv(x).reshape(B, -1, N)
        v = self.value_conv(x).reshape(B, C, N)
        result = sagan_attention(q, k, v, x=x, gamma=self.gamma, return_attention=self.return_attention)
        if self.return_attention:
            return result
        return result, None

    def extra_repr(self) -> str:
        return f"in_dim={self.chanel_in}, return_attention={self.return_attention}"


class BigGANAttention(nn.Module):
    """BigGAN's non-local block (``Attention`` in BigGAN-PyTorch's layers.py), same state_dict keys:
    ``theta``, ``phi`` (C -> C // 8), ``g`` (C -> C // 2), ``o`` (C // 2 -> C), 1x1 convs without
    bias, and the scalar ``gamma`` (0-dim, initialised to 0)::

        out = x + gamma * o(g' softmax(theta^T phi')^T),   phi' = maxpool2x2(phi(x)), g' = maxpool2x2(g(x))

    Keys and values are pooled, so the attention map is [B, N, N/4]; fastnote's kernel never stores
    it (O(N) memory). The convs are whatever ``which_conv`` builds (BigGAN passes its spectral-norm
    conv; ``nn.Conv2d`` by default) and run as they are, spectral-norm updates included.
    ``forward(x, y=None)`` ignores ``y`` as BigGAN's does.
    """

    def __init__(self, ch: int, which_conv=nn.Conv2d, name: str = "attention"):
        super().__init__()
        if ch < 8:
            raise ValueError(f"ch must be >= 8 (theta/phi have ch // 8 channels), got {ch}")
        self.ch = ch
        self.which_conv = which_conv
        self.theta = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = which_conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = which_conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, y=None):
        checks.tensor("x", x, ndim=4)
        B, C, H, W = x.shape
        theta = self.theta(x).reshape(B, C // 8, H * W)
        phi = torch.nn.functional.max_pool2d(self.phi(x), [2, 2]).flatten(2)
        g = torch.nn.functional.max_pool2d(self.g(x), [2, 2]).flatten(2)
        attended = sagan_attention(theta, phi, g).reshape(B, C // 2, H, W)
        return self.gamma * self.o(attended) + x

    def extra_repr(self) -> str:
        return f"ch={self.ch}"


class PretrainedBigGANSelfAttn(nn.Module):
    """The non-local block of ``pytorch_pretrained_biggan`` (``SelfAttn`` in its model.py; BigGAN-deep
    converted from TF), same submodules and state_dict keys: spectral-norm 1x1 convs without bias
    ``snconv1x1_theta``, ``snconv1x1_phi`` (C -> C // 8), ``snconv1x1_g`` (C -> C // 2),
    ``snconv1x1_o_conv`` (C // 2 -> C), ``maxpool`` (2x2, stride 2), ``softmax`` (kept so the module
    tree is the library's; the kernel does the softmax) and ``gamma`` of shape [1], initialised to 0::

        out = x + gamma * o(g' softmax(theta^T phi')^T),   phi' = maxpool(phi(x)), g' = maxpool(g(x))

    as ``BigGANAttention``, on ``fastnote.sagan_attention`` with pooled keys and values (the
    [B, N, N/4] map is not stored). The convs run as they are, their spectral-norm hooks (torch's,
    or fastnote's after ``fastnote.patch``) included. H and W must be even: the library's forward
    reshapes the pooled maps to H*W/4 positions.
    """

    def __init__(self, in_channels: int, eps: float = 1e-12):
        super().__init__()
        if in_channels < 8:
            raise ValueError(f"in_channels must be >= 8 (theta/phi have in_channels // 8 channels), got {in_channels}")
        self.in_channels = in_channels

        def conv(c_in, c_out):
            return nn.utils.spectral_norm(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), eps=eps)

        self.snconv1x1_theta = conv(in_channels, in_channels // 8)
        self.snconv1x1_phi = conv(in_channels, in_channels // 8)
        self.snconv1x1_g = conv(in_channels, in_channels // 2)
        self.snconv1x1_o_conv = conv(in_channels // 2, in_channels)
        self.maxpool = nn.MaxPool2d(2, stride=2, padding=0)
        self.softmax = nn.Softmax(dim=-1)
        self.gamma = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_biggan(cls, module: nn.Module) -> "PretrainedBigGANSelfAttn":
        """The drop-in for the library's ``SelfAttn`` ``module``, around its own submodules (the
        spectral-norm convs with their hooks) and ``gamma`` (shared, not copied), in its mode."""
        ours = cls.__new__(cls)
        nn.Module.__init__(ours)
        ours.in_channels = module.snconv1x1_theta.in_channels
        for name, child in module.named_children():
            ours.add_module(name, child)
        ours.gamma = module.gamma
        ours.train(module.training)
        return ours

    def forward(self, x):
        checks.tensor("x", x, ndim=4)
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"x must have an even height and width (keys and values are 2x2-pooled), got {H}x{W}")
        theta = self.snconv1x1_theta(x).reshape(B, C // 8, H * W)
        phi = self.maxpool(self.snconv1x1_phi(x)).flatten(2)
        g = self.maxpool(self.snconv1x1_g(x)).flatten(2)
        attended = sagan_attention(theta, phi, g).reshape(B, C // 2, H, W)
        return x + self.gamma * self.snconv1x1_o_conv(attended)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}"
