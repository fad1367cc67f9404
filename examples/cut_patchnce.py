"""A CUT training step: the generator's encoder features at 5 layers, patches sampled at the same
random positions in the source and translated images, an MLP head per layer, and the PatchNCE loss.

The eager variant is CUT's code path written in plain PyTorch (permute + flatten the whole map,
index, MLP, l2-normalise; the [B, P, P] negatives with a -10 diagonal and a cross entropy). The
fastnote variant gathers only the sampled positions with ``fastnote.patch_sample`` and computes the
loss with ``fastnote.nn.PatchNCELoss``, which never stores the logits. Both draw the patch
positions with the same ``torch.randperm`` call, so seeded runs sample the same patches.

    python examples/cut_patchnce.py --steps 5             # tiny: batch 2, 32x32, 64 patches (CPU)
    python examples/cut_patchnce.py --full --steps 100    # batch 1, 256x256, 256 patches (GPU)
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fastnote  # noqa: E402

FULL = dict(batch=1, image_size=256, ngf=64, nc=256, num_patches=256, n_blocks=9)
SMOKE = dict(batch=2, image_size=32, ngf=8, nc=32, num_patches=64, n_blocks=5)
NCE_T = 0.07
# CUT's defaults: the padded input, the two downsampling convs, the 1st and 5th residual blocks
NCE_LAYERS = (0, 4, 8, 12, 16)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim))

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CUT's ResNet generator layout: pad + 7x7 conv, two stride-2 convs, residual blocks, two
    transposed convs, 7x7 conv + tanh. ``encode(x)`` returns the outputs of ``NCE_LAYERS``."""

    def __init__(self, ngf: int, n_blocks: int):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU()]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                       nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU()]
        # two no-op slots keep CUT's layer numbering (where its anti-aliased downsampling layers are)
        layers[7:7] = [nn.Identity()]
        layers[11:11] = [nn.Identity()]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(ngf * mult // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)

    def encode(self, x):
        feats = []
        for i, layer in enumerate(self.model):
            x = layer(x)
            if i in NCE_LAYERS:
                feats.append(x)
            if i == NCE_LAYERS[-1]:
                return feats
        raise AssertionError("fewer layers than NCE_LAYERS")


class PatchSampleMLP(nn.Module):
    """CUT's PatchSampleF with its MLP heads: per feature map, the rows at the sampled positions,
    ``Linear -> ReLU -> Linear``, l2-normalised. ``use_fastnote``: sample with
    ``fastnote.patch_sample`` (gathers only the P positions) instead of flattening the map."""

    def __init__(self, channels: Sequence[int], nc: int, use_fastnote: bool):
        super().__init__()
        self.use_fastnote = use_fastnote
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(c, nc), nn.ReLU(), nn.Linear(nc, nc)) for c in channels)
        for mlp in self.mlps:   # CUT's init_net('normal', 0.02)
            for m in mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, 0.02)
                    nn.init.zeros_(m.bias)

    def forward(self, feats, num_patches: int, patch_ids=None):
        out, ids = [], []
        for j, (feat, mlp) in enumerate(zip(feats, self.mlps)):
            pid = None if patch_ids is None else patch_ids[j]
            if self.use_fastnote:
                x, pid = fastnote.patch_sample(feat, num_patches, pid, normalize=False)
            else:
                rows = feat.permute(0, 2, 3, 1).flatten(1, 2)                 # [B, HW, C]
                if pid is None:
                    pid = torch.randperm(rows.shape[1], device=feat.device)[:min(num_patches, rows.shape[1])]
                x = rows[:, pid, :].flatten(0, 1)                             # [B*P, C]
            x = mlp(x)
            out.append(x / (x.pow(2).sum(1, keepdim=True).pow(0.5) + 1e-7))
            ids.append(pid)
        return out, ids


def eager_patch_nce_loss(feat_q, feat_k, batch_size: int):
    """CUT's PatchNCELoss (negatives from the same image only): per-row loss [B*P]."""
    feat_k = feat_k.detach()
    dim = feat_q.shape[1]
    l_pos = (feat_q * feat_k).sum(1, keepdim=True)
    q, k = feat_q.view(batch_size, -1, dim), feat_k.view(batch_size, -1, dim)
    l_neg = torch.bmm(q, k.transpose(2, 1))
    diagonal = torch.eye(q.shape[1], device=q.device, dtype=torch.bool)[None]
    l_neg = l_neg.masked_fill(diagonal, -10.0).view(-1, q.shape[1])
    logits = torch.cat((l_pos, l_neg), dim=1) / NCE_T
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=q.device),
                           reduction="none")


def build(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0):
    """(generator, patch sampler with MLP heads, loss, sizes)."""
    sizes = FULL if full else SMOKE
    _common.seed_all(seed)
    G = ResnetGenerator(sizes["ngf"], sizes["n_blocks"]).to(device)
    with torch.no_grad():
        channels = [f.shape[1] for f in G.encode(torch.zeros(1, 3, 32, 32, device=device))]
    netF = PatchSampleMLP(channels, sizes["nc"], use_fastnote).to(device)
    if use_fastnote:
        loss = fastnote.nn.PatchNCELoss(NCE_T, batch_size=sizes["batch"])
    else:
        def loss(q, k):
            return eager_patch_nce_loss(q, k, sizes["batch"])
    return G, netF, loss, sizes


def training(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0,
             amp: Optional[torch.dtype] = None, verbose: bool = False) -> _common.Training:
    """CUT's NCE part of a generator step: translate, encode both images, sample, PatchNCE."""
    device = torch.device(device)
    G, netF, criterion, sizes = build(use_fastnote, full, device, seed)
    opt = torch.optim.Adam(list(G.parameters()) + list(netF.parameters()), 2e-4, betas=(0.5, 0.999))
    gen = _common.data_generator(seed)
    b, s, p = sizes["batch"], sizes["image_size"], sizes["num_patches"]

    def next_batch():
        return (torch.rand(b, 3, s, s, generator=gen) * 2 - 1).to(device)

    def nce_loss(real_a):
        fake_b = G(real_a)
        feat_q = G.encode(fake_b)
        feat_k = G.encode(real_a)
        pool_k, ids = netF(feat_k, p)
        pool_q, _ = netF(feat_q, p, ids)
        return sum(criterion(q, k).mean() for q, k in zip(pool_q, pool_k)) / len(NCE_LAYERS)

    return _common.Training("cut_patchnce" + ("" if use_fastnote else " (eager)"), {"G": G, "F": netF}, next_batch,
                            [_common.Phase("nce_loss", nce_loss, opt)], device, amp)


run = _common.runner(training)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return _common.main("CUT: PatchNCE loss over 5 encoder layers, a few training steps", run, argv)


if __name__ == "__main__":
    main()
