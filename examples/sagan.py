"""SAGAN at 64x64: a generator and a discriminator with spectral norm on their convolutions and
self-attention at two resolutions, trained a few steps with the hinge loss.

The model is written in plain PyTorch (``torch.nn.utils.spectral_norm``, a ``SelfAttention`` block
with SAGAN's ``query_conv`` / ``key_conv`` / ``value_conv`` / ``gamma``); ``fastnote.patch`` then
swaps the spectral-norm hooks for fastnote's power iteration and the attention blocks for
``fastnote.nn.SelfAttention``, keeping the weights. With the attention maps not asked for, the
patched attention never stores the [B, N, N] map.

    python examples/sagan.py --steps 5            # tiny: batch 2, 32x32, 8 base channels (CPU)
    python examples/sagan.py --full --steps 100   # 64x64, batch 64, z 128, 64 base channels (GPU)
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fastnote  # noqa: E402

FULL = dict(batch=64, z_dim=128, conv_dim=64, image_size=64)
# Same layers at half the resolution (attention at 8x8 and 16x16): each step a few seconds under
# the Triton interpreter.
SMOKE = dict(batch=2, z_dim=16, conv_dim=8, image_size=32)


class SelfAttention(nn.Module):
    """SAGAN's self-attention: ``out = gamma * (V softmax(Q^T K)^T) + x``, returns (out, attention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels // 8, 1)
        self.key_conv = nn.Conv2d(channels, channels // 8, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2).transpose(1, 2)          # [B, N, C/8]
        k = self.key_conv(x).flatten(2)                            # [B, C/8, N]
        attention = torch.softmax(torch.bmm(q, k), dim=-1)         # [B, N, N]
        v = self.value_conv(x).flatten(2)                          # [B, C, N]
        out = torch.bmm(v, attention.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x, attention


def _up(cin, cout, first: int = 0):
    conv = nn.ConvTranspose2d(cin, cout, first) if first else nn.ConvTranspose2d(cin, cout, 4, 2, 1)
    return nn.Sequential(spectral_norm(conv), nn.BatchNorm2d(cout), nn.ReLU())


def _down(cin, cout):
    return nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.1))


class Generator(nn.Module):
    """z [B, z_dim] -> image [B, 3, S, S]; at S = 64: 4 -> 8 -> 16 (attention) -> 32 (attention) -> 64."""

    def __init__(self, z_dim: int, conv_dim: int, image_size: int = 64):
        super().__init__()
        c = conv_dim
        self.l1 = _up(z_dim, 8 * c, first=image_size // 16)
        self.l2 = _up(8 * c, 4 * c)
        self.l3 = _up(4 * c, 2 * c)
        self.attn1 = SelfAttention(2 * c)
        self.l4 = _up(2 * c, c)
        self.attn2 = SelfAttention(c)
        self.last = nn.Sequential(nn.ConvTranspose2d(c, 3, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        out = self.l3(self.l2(self.l1(z[:, :, None, None])))
        out, _ = self.attn1(out)
        out, _ = self.attn2(self.l4(out))
        return self.last(out)


class Discriminator(nn.Module):
    """image [B, 3, S, S] -> score [B]; at S = 64: 32 -> 16 -> 8 (attention) -> 4 (attention) -> 1."""

    def __init__(self, conv_dim: int, image_size: int = 64):
        super().__init__()
        c = conv_dim
        self.l1 = _down(3, c)
        self.l2 = _down(c, 2 * c)
        self.l3 = _down(2 * c, 4 * c)
        self.attn1 = SelfAttention(4 * c)
        self.l4 = _down(4 * c, 8 * c)
        self.attn2 = SelfAttention(8 * c)
        self.last = nn.Conv2d(8 * c, 1, image_size // 16)

    def forward(self, x):
        out, _ = self.attn1(self.l3(self.l2(self.l1(x))))
        out, _ = self.attn2(self.l4(out))
        return self.last(out).flatten()


def build(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0, verbose: bool = False):
    """(generator, discriminator, sizes): the eager pair, or the same pair patched by fastnote."""
    sizes = FULL if full else SMOKE
    _common.seed_all(seed)
    G = Generator(sizes["z_dim"], sizes["conv_dim"], sizes["image_size"]).to(device)
    D = Discriminator(sizes["conv_dim"], sizes["image_size"]).to(device)
    if use_fastnote:
        for model in (G, D):
            # 4 spectral norms and 2 attention blocks each
            report = fastnote.patch(model, expect=6)
            for m in model.modules():
                if isinstance(m, fastnote.nn.SelfAttention):
                    m.return_attention = False    # (out, None): the O(N)-memory path
            if verbose:
                print(report)
    return G, D, sizes


def training(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0,
             amp: Optional[torch.dtype] = None, verbose: bool = False) -> _common.Training:
    """Hinge-loss training, one discriminator and one generator step per step (SAGAN's loop)."""
    device = torch.device(device)
    G, D, sizes = build(use_fastnote, full, device, seed, verbose)
    g_opt = torch.optim.Adam(G.parameters(), 1e-4, betas=(0.0, 0.9))
    d_opt = torch.optim.Adam(D.parameters(), 4e-4, betas=(0.0, 0.9))
    gen = _common.data_generator(seed)
    b, z_dim, size = sizes["batch"], sizes["z_dim"], sizes["image_size"]

    def next_batch():
        real = (torch.rand(b, 3, size, size, generator=gen) * 2 - 1).to(device)
        z_d, z_g = (torch.randn(b, z_dim, generator=gen).to(device) for _ in range(2))
        return real, z_d, z_g

    def d_loss(batch):
        real, z_d, _ = batch
        fake = G(z_d).detach()
        return F.relu(1.0 - D(real)).mean() + F.relu(1.0 + D(fake)).mean()

    def g_loss(batch):
        return -D(G(batch[2])).mean()

    phases = [_common.Phase("d_loss", d_loss, d_opt), _common.Phase("g_loss", g_loss, g_opt)]
    return _common.Training("sagan" + ("" if use_fastnote else " (eager)"), {"G": G, "D": D}, next_batch, phases,
                            device, amp)


run = _common.runner(training)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return _common.main("SAGAN 64x64, hinge loss, a few training steps", run, argv)


if __name__ == "__main__":
    main()
