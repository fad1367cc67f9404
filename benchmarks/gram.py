"""Gram matrix, style loss and total variation of the perceptual loss: eager vs torch.compile vs
fastnote.

Providers, on the same features x [B, C, H, W] (and a style target):
  eager          the perceptual-loss code as written: G = F.bmm(F^T) / (C*H*W) in x's dtype; the
                 style term ((G - T)^2).sum() / (C*H*W) against the style Gram expanded to the
                 batch; TV from four slices
  torch.compile  of that eager function
  fastnote       fastnote.gram / style_loss (target [1, C, C]) / tv_loss
  fastnote no split  gram and style loss with the forward's split-K off (``SPLIT_K``): one launch
                 and no fp32 scratch where the default splits K in several programs and sums their
                 partial tiles in a second launch (cases where it splits only; fwd and both, the
                 backward being the same)

Shapes: VGG-16 relu1_2, relu2_2, relu3_3, relu4_3 at a 256x256 input (C/HW = 64/256^2,
128/128^2, 256/64^2, 512/32^2), batch 4 and 16, bf16 and fp32 (fp32 with torch's default, TF32
off); the relu4_3 batch-4 case comes first (``--quick`` runs only it). TV on the 256x256 image
batch [B, 3, 256, 256].

FLOP model, "useful" (triangular) FLOPs, E = B*C*H*W, s = itemsize:
  gram / style fwd   B * C * (C + 1) * H*W       the triangle and diagonal of F F^T (eager bmm
                                                 does 2 * B * C^2 * H*W)
  style bwd          2 * B * C^2 * H*W            dF = (dG + dG^T) F / norm
Bytes model (minimum HBM traffic; the target T is [C, C] in x's dtype, as the benchmark builds it):
  gram fwd   E*s + B*C^2*s (read F, write G)
  style fwd  E*s + C^2*s (read F and T; the loss is a scalar)
  style bwd  2*E*s + C^2*s (read F and T, write dF; fastnote's kernels also write and read D =
             G - T in fp32, B*C^2*4 each way, to spare the backward a second Gram product: its
             own choice, not counted)
  both       the sum
  tv         fwd E*s, bwd 2*E*s, both 3*E*s
With these, the bf16 Grams are bandwidth-bound at the copy bandwidth: the useful FLOPs of relu4_3
(C = 512) can reach at most 73.5% of the dense bf16 peak (relu3_3 52%, relu2_2 27.5%, relu1_2 14%),
so "% of peak TFLOP/s" and "% of copy BW" both matter; in fp32 (no TF32) relu3_3 and relu4_3 are
compute-bound. TV is bandwidth-bound (GB/s).

    python benchmarks/gram.py [--smoke] [--out DIR] [--modes fwd,bwd,both] [--dtypes bf16,fp32]
"""
import torch

import fastnote
import harness
from fastnote.triton_kernels import gram as kernels
from harness import Benchmark, Case, Provider
from harness.modes import under_setting

# (layer, C, H = W) of VGG-16 at a 256x256 input
LAYERS = [("relu4_3", 512, 32), ("relu1_2", 64, 256), ("relu2_2", 128, 128), ("relu3_3", 256, 64)]
BATCHES = (4, 16)
SMOKE_LAYERS = [("tiny", 8, 6), ("tiny70", 70, 4)]
SMOKE_BATCHES = (2,)


def _cases(layers, batches, dtypes):
    return [Case("C", c, {"dtype": dtype, "layer": layer, "shape": [b, c, hw, hw], "batch": b})
            for dtype in dtypes for b in batches for layer, c, hw in layers]


def _tv_cases(batches, size, dtypes):
    return [Case("B", b, {"dtype": dtype, "shape": [b, 3, size, size]}) for dtype in dtypes for b in batches]


def make_features(case, device):
    B, C, H, W = case.config["shape"]
    x = torch.randn(B, C, H, W, device=device).relu_().to(case.dtype).requires_grad_()
    style = torch.randn(1, C, H, W, device=device).relu_().to(case.dtype)
    with torch.no_grad():
        target = eager_gram(style)
    return {"x": x, "target": target}


def make_image(case, device):
    return {"y": torch.rand(case.config["shape"], device=device).to(case.dtype).requires_grad_()}


def eager_gram(x):
    bs, ch, h, w = x.size()
    f = x.view(bs, ch, w * h)
    return f.bmm(f.transpose(1, 2)) / (ch * h * w)


def eager_style(x, target):
    _, c, h, w = x.shape
    return (eager_gram(x) - target.expand(x.shape[0], c, c)).pow(2).sum() / float(c * h * w)


def eager_tv(y):
    _, c, h, w = y.shape
    diff_i = torch.sum(torch.abs(y[:, :, :, 1:] - y[:, :, :, :-1]))
    diff_j = torch.sum(torch.abs(y[:, :, 1:, :] - y[:, :, :-1, :]))
    return (diff_i + diff_j) / float(c * h * w)


def _dims(case):
    B, C, H, W = case.config["shape"]
    return B, C, H * W, B * C * H * W


def gram_flops(case, mode):
    B, C, K, _ = _dims(case)
    fwd = B * C * (C + 1) * K
    bwd = 2 * B * C * C * K
    return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}[mode]


def gram_bytes(case, mode):
    B, C, _, E = _dims(case)
    s = case.itemsize
    return E * s + B * C * C * s


def style_bytes(case, mode):
    B, C, _, E = _dims(case)
    s = case.itemsize
    fwd = E * s + C * C * s
    bwd = 2 * E * s + C * C * s
    return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}[mode]


def tv_bytes(case, mode):
    _, _, _, E = _dims(case)
    return {"fwd": 1, "bwd": 2, "both": 3}[mode] * E * case.itemsize


def _providers(eager_fn, ours_fn, names):
    def eager(inputs, case):
        args = [inputs[n] for n in names]
        return lambda: eager_fn(*args)

    def ours(inputs, case):
        args = [inputs[n] for n in names]
        return lambda: ours_fn(*args)

    return [Provider("eager", eager), Provider("torch.compile", eager, compile=True), Provider("fastnote", ours)]


def _splits(case, style: bool) -> bool:
    """Whether the default forward splits K at this case (on an H100/H200's 132 SMs)."""
    B, C, H, W = case.config["shape"]
    f = torch.empty(B, C, H * W, dtype=case.dtype, device="meta")
    return kernels.forward_plan(f, style=style).n_split > 1


def _no_split(providers, style: bool, modes):
    ours = next(p for p in providers if p.name == "fastnote")
    return providers + [Provider("fastnote no split", under_setting(ours.setup, kernels, "SPLIT_K", False,
                                                                     modes=modes,
                                                                     applies=lambda case: _splits(case, style)))]


BENCHMARKS = [
    Benchmark(
        op="gram",
        make_inputs=make_features,
        providers=_no_split(_providers(eager_gram, fastnote.gram, ["x"]), False, ("fwd",)),
        cases=_cases(LAYERS, BATCHES, ["bf16", "fp32"]),
        smoke_cases=_cases(SMOKE_LAYERS, SMOKE_BATCHES, ["fp32", "bf16"]),
        modes=("fwd",),
        bytes_moved=gram_bytes,
        flops=gram_flops,
        plot_by=("dtype", "batch"),
    ),
    Benchmark(
        op="style_loss",
        make_inputs=make_features,
        providers=_no_split(_providers(eager_style, fastnote.style_loss, ["x", "target"]), True,
                            ("fwd", "both")),
        cases=_cases(LAYERS, BATCHES, ["bf16", "fp32"]),
        smoke_cases=_cases(SMOKE_LAYERS, SMOKE_BATCHES, ["fp32", "bf16"]),
        bytes_moved=style_bytes,
        flops=gram_flops,
        plot_by=("dtype", "batch"),
    ),
    Benchmark(
        op="tv_loss",
        make_inputs=make_image,
        providers=_providers(eager_tv, fastnote.tv_loss, ["y"]),
        cases=_tv_cases(BATCHES, 256, ["bf16", "fp32"]),
        smoke_cases=_tv_cases((2,), 20, ["fp32", "bf16"]),
        bytes_moved=tv_bytes,
    ),
]

if __name__ == "__main__":
    harness.main(BENCHMARKS)
