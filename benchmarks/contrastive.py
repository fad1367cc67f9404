"""PatchNCE (CUT), CLIP and SigLIP contrastive losses, forward and backward: eager vs torch.compile vs
fastnote (and open_clip's SigLipLoss for SigLIP).

Providers, on the same L2-normalised features:
  eager          fastnote.reference (CUT's PatchNCELoss maths: bmm, masked_fill, cat, /T,
                 cross-entropy; CLIP's two cross-entropies over the [n, n] logits), materialising
                 the [G, M, M] / [n, n] logits
  torch.compile  of that eager function
  open_clip      open_clip's SigLipLoss (SigLIP only; left out where open_clip does not import):
                 the same maths as eager, with its [n, n] label matrix besides the logits
  fastnote       fastnote.patch_nce_loss / clip_loss / siglip_loss (streaming; O(rows * d) memory)
  fastnote layers
                 PatchNCE only: ``fastnote.patch_nce_loss_layers``, every NCE layer in one launch
                 each way where the layers stack (CUT's default: 5 layers of [256, 256]), summed
                 as CUT sums them; n/a for one layer
  fastnote narrow slices
                 the same op with the backward's gradient slices it had before
                 (``GRADIENT_SLICES = "narrow"`` in fastnote/triton_kernels/contrastive_tiles.py:
                 64 channels a program in bf16, 32 in fp32, so the score tiles are recomputed 8 to
                 24 times per gradient instead of 2 to 6), bwd and both modes only: the default
                 was chosen from the sm_90 build (registers, spills, resident warps), and this
                 provider is the GPU's check of that choice

Cases (x = M, the negatives per row for PatchNCE; n, the batch, for CLIP):
  patch_nce  CUT's default: B = 1, P = 256, d = 256, its 5 NCE layers summed (each a layer mean),
             per image and with negatives from the whole minibatch; then all negatives at
             B*P = 4096, 16384, 65536 (one layer, d = 256), where eager's fp32 [M, M + 1] logits
             reach 17 GB at 65536 (and autograd keeps more of that size: expected to run out of
             memory there). bf16 and fp32.
  clip_loss  n = 8192 ... 65536, d = 512, logit_scale 100 (open_clip's clamp); bf16 and fp32.
  siglip_loss n = 8192 ... 32768, d = 768 (SigLIP ViT-B/16's embedding), logit_scale 10 and
             logit_bias -10 (SigLIP's initial values); bf16 and fp32. Eager and open_clip hold
             the [n, n] logits and labels (8 GB in fp32 at 32768, and autograd keeps more).

FLOP model (matmuls, the minimum: no recomputation counted; R rows, M negatives per row):
  patch_nce  fwd 2 R M d; bwd 2 R M d (dq = (P - onehot) k; k is detached, as CUT's loss takes
             it, so no dk; the kernels also recompute the scores, not counted); both the sum (x layers)
  clip_loss  fwd 2 n^2 d; bwd 2 * 2 n^2 d (scores, d_image and d_text); both the sum
  siglip_loss as clip_loss: fwd 2 n^2 d; bwd 2 * 2 n^2 d (d_image and d_text); both the sum (the
             kernels also recompute the scores in backward, once per channel slice: see
             triton_kernels/siglip_loss.py; that work is not counted as useful)
Bytes model (minimum HBM traffic, itemsize b): patch_nce fwd 2 R d b, bwd 3 R d b; clip_loss and
siglip_loss fwd 2 n d b, bwd 4 n d b (inputs read, gradients written once). Both ops are compute-bound at these
sizes except CUT's default, which is launch-bound; the memory rows show what streaming saves.

    python benchmarks/contrastive.py [--smoke] [--out DIR] [--modes fwd,bwd,both] [--dtypes bf16,fp32]
"""
import torch
import torch.nn.functional as F

import fastnote
import harness
from fastnote import reference
from fastnote.triton_kernels import contrastive_tiles
from harness import Benchmark, Case, Provider
from harness.modes import under_setting

NCE_T = 0.07
CLIP_SCALE = 100.0
# (label, B, P, d, all negatives, layers)
NCE_CASES = [
    ("CUT default", 1, 256, 256, False, 5),
    ("CUT default, all negatives", 1, 256, 256, True, 5),
    ("all negatives 4096", 16, 256, 256, True, 1),
    ("all negatives 16384", 64, 256, 256, True, 1),
    ("all negatives 65536", 256, 256, 256, True, 1),
]
NCE_SMOKE = [("smoke", 2, 16, 32, False, 2), ("smoke all", 2, 12, 16, True, 1)]
CLIP_SIZES = [8192, 16384, 32768, 65536]
CLIP_D = 512
CLIP_SMOKE = [(24, 16), (40, 32)]
SIGLIP_SIZES = [8192, 16384, 32768]
SIGLIP_D = 768
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
SIGLIP_SMOKE = [(24, 16), (37, 24)]


def _nce_cases(cases, dtypes):
    return [Case("M", B * P if all_neg else P,
                 {"dtype": dtype, "case": label, "B": B, "P": P, "d": d, "all_negatives": all_neg, "layers": layers})
            for dtype in dtypes for label, B, P, d, all_neg, layers in cases]


def _nce_inputs(case, device):
    c = case.config
    feats = []
    for _ in range(c["layers"]):
        q = F.normalize(torch.randn(c["B"] * c["P"], c["d"], device=device), dim=1)
        k = F.normalize(q + 0.5 * torch.randn_like(q), dim=1)
        feats.append((q.to(case.dtype).requires_grad_(), k.to(case.dtype)))
    return {"feats": feats}


def _nce_provider(fn):
    def setup(inputs, case):
        c = case.config
        feats = inputs["feats"]

        def run():
            total = 0.0
            for q, k in feats:   # CUT: total_nce_loss += crit(f_q, f_k).mean(), / n_layers
                total = total + fn(q, k, c["B"], c["all_negatives"]).mean()
            return total / len(feats)
        return run
    return setup


def _eager_nce(q, k, B, all_neg):
    return reference.patch_nce_loss(q, k, nce_T=NCE_T, batch_size=B, include_all_negatives_from_minibatch=all_neg)


def _fastnote_nce(q, k, B, all_neg):
    return fastnote.patch_nce_loss(q, k, B, NCE_T, all_neg)


def _fastnote_nce_layers(inputs, case):
    c = case.config
    if c["layers"] == 1:
        return {}
    qs, ks = [q for q, _ in inputs["feats"]], [k for _, k in inputs["feats"]]

    def run():   # CUT's total: each layer's mean, summed, / n_layers
        return sum(fastnote.patch_nce_loss_layers(qs, ks, c["B"], NCE_T, c["all_negatives"], "mean")) / len(qs)
    return run


def _nce_rows(case):
    c = case.config
    return c["B"] * c["P"], case.x_value, c["d"], c["layers"]


def _nce_flops(case, mode):
    R, M, d, layers = _nce_rows(case)
    return {"fwd": 2, "bwd": 2, "both": 4}[mode] * R * M * d * layers


def _nce_bytes(case, mode):
    R, _, d, layers = _nce_rows(case)
    return {"fwd": 2, "bwd": 3, "both": 5}[mode] * R * d * case.itemsize * layers


def _clip_cases(sizes, dtypes):
    return [Case("n", n, {"dtype": dtype, "n": n, "d": d}) for dtype in dtypes for n, d in sizes]


def _clip_inputs(case, device):
    n, d = case.config["n"], case.config["d"]
    img = F.normalize(torch.randn(n, d, device=device), dim=1)
    txt = F.normalize(img + torch.randn_like(img), dim=1)
    return {"img": img.to(case.dtype).requires_grad_(), "txt": txt.to(case.dtype).requires_grad_(),
            "scale": torch.tensor(CLIP_SCALE, device=device, requires_grad=True)}


def _eager_clip(inputs, case):
    return lambda: reference.clip_loss(inputs["img"], inputs["txt"], inputs["scale"], exponentiated=True)


def _fastnote_clip(inputs, case):
    return lambda: fastnote.clip_loss(inputs["img"], inputs["txt"], inputs["scale"])


def _clip_flops(case, mode):
    n, d = case.config["n"], case.config["d"]
    return {"fwd": 2, "bwd": 4, "both": 6}[mode] * n * n * d


def _clip_bytes(case, mode):
    n, d = case.config["n"], case.config["d"]
    return {"fwd": 2, "bwd": 4, "both": 6}[mode] * n * d * case.itemsize


def _siglip_inputs(case, device):
    inputs = _clip_inputs(case, device)
    inputs["scale"] = torch.tensor(SIGLIP_SCALE, device=device, requires_grad=True)
    inputs["bias"] = torch.tensor(SIGLIP_BIAS, device=device, requires_grad=True)
    return inputs


def _eager_siglip(inputs, case):
    return lambda: reference.siglip_loss(inputs["img"], inputs["txt"], inputs["scale"], inputs["bias"])


def _fastnote_siglip(inputs, case):
    return lambda: fastnote.siglip_loss(inputs["img"], inputs["txt"], inputs["scale"], inputs["bias"])


def _open_clip_siglip():
    """open_clip's SigLipLoss class, or None where open_clip is not installed or does not import."""
    try:
        from fastnote.compat import torchvision_op_schemas   # torchvision beside a CPU torch
        torchvision_op_schemas()
    except ImportError:
        pass
    try:
        from open_clip.loss import SigLipLoss
    except Exception:   # absent, or its own imports fail: the provider is left out
        return None
    return SigLipLoss


def _siglip_providers():
    providers = [Provider("eager", _eager_siglip), Provider("torch.compile", _eager_siglip, compile=True)]
    open_clip_loss = _open_clip_siglip()
    if open_clip_loss is not None:
        def open_clip_provider(inputs, case):
            loss = open_clip_loss()
            return lambda: loss(inputs["img"], inputs["txt"], inputs["scale"], inputs["bias"])
        providers.append(Provider("open_clip", open_clip_provider))
    return providers + [Provider("fastnote", _fastnote_siglip),
                        Provider("fastnote narrow slices", _narrow_slices(_fastnote_siglip))]


def _narrow_slices(fastnote_setup):
    """fastnote with ``GRADIENT_SLICES = "narrow"`` in its backward: bwd and both modes only."""
    return under_setting(fastnote_setup, contrastive_tiles, "GRADIENT_SLICES", "narrow")


BENCHMARKS = [
    Benchmark(
        op="patch_nce",
        make_inputs=_nce_inputs,
        providers=[Provider("eager", _nce_provider(_eager_nce)),
                   Provider("torch.compile", _nce_provider(_eager_nce), compile=True),
                   Provider("fastnote", _nce_provider(_fastnote_nce)),
                   Provider("fastnote layers", _fastnote_nce_layers),
                   Provider("fastnote narrow slices", _narrow_slices(_nce_provider(_fastnote_nce)))],
        cases=_nce_cases(NCE_CASES, ["bf16", "fp32"]),
        smoke_cases=_nce_cases(NCE_SMOKE, ["fp32"]),
        bytes_moved=_nce_bytes,
        flops=_nce_flops,
    ),
    Benchmark(
        op="clip_loss",
        make_inputs=_clip_inputs,
        providers=[Provider("eager", _eager_clip),
                   Provider("torch.compile", _eager_clip, compile=True),
                   Provider("fastnote", _fastnote_clip),
                   Provider("fastnote narrow slices", _narrow_slices(_fastnote_clip))],
        cases=_clip_cases([(n, CLIP_D) for n in CLIP_SIZES], ["bf16", "fp32"]),
        smoke_cases=_clip_cases(CLIP_SMOKE, ["fp32"]),
        bytes_moved=_clip_bytes,
        flops=_clip_flops,
    ),
    Benchmark(
        op="siglip_loss",
        make_inputs=_siglip_inputs,
        providers=_siglip_providers(),
        cases=_clip_cases([(n, SIGLIP_D) for n in SIGLIP_SIZES], ["bf16", "fp32"]),
        smoke_cases=_clip_cases(SIGLIP_SMOKE, ["fp32"]),
        bytes_moved=_clip_bytes,   # the same model: inputs read and gradients written once
        flops=_clip_flops,
    ),
]

if __name__ == "__main__":
    harness.main(BENCHMARKS)
