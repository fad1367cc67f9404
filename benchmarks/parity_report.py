"""Parity of every fastnote op against fastnote.reference: forward output and the gradient of every
differentiable input, per dtype, on this machine's device.

On a GPU the kernels run natively in fp32, fp16 and bf16. Without one the Triton interpreter is
turned on (before triton is imported), so the Triton kernels themselves are compared, in fp32.
The reference runs in fp32 on the same input values (low-precision inputs upcast) and with the
same upstream gradient; tolerances come from ``fastnote.testing`` (docs/design.md section 3.1).

    python benchmarks/parity_report.py [--out parity.csv] [--ops hard_swish,hswish_se]

Exit status 1 if any comparison fails.

Adding an op: append a ``ParityEntry`` to ``ENTRIES``: ``make_inputs(dtype, device)`` returns a
dict of keyword arguments (tensors that require grad get their gradient checked, anything else
is passed as is), ``fastnote_fn(**inputs)`` and ``reference_fn(**inputs)`` return a tensor or a
tuple of tensors, ``kind`` is the tolerance kind of ``fastnote.testing.tolerance``
("elementwise", "reduction", "two_matmul"), ``grad_kind`` the one for gradients (default
``kind``).
"""
from __future__ import annotations

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first import of triton (importing torch does not import it).
    if "triton" in sys.modules:
        print("warning: triton was imported before TRITON_INTERPRET could be set", file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = "1"
# A kernel that leaves part of its output unwritten shows NaN instead of stale memory.
os.environ.setdefault("FASTNOTE_POISON_ALLOC", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
from typing import Any, Callable, Dict, Optional, Sequence  # noqa: E402

import fastnote  # noqa: E402
from fastnote import backend, reference, testing  # noqa: E402

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass
class ParityEntry:
    name: str
    make_inputs: Callable[[torch.dtype, torch.device], Dict[str, Any]]
    fastnote_fn: Callable[..., Any]
    reference_fn: Callable[..., Any]
    kind: str
    grad_kind: Optional[str] = None
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def _activation_inputs(dtype, device):
    # Values across both kinks, with -3 and 3 exactly (exactly representable in every dtype).
    x = torch.randn(2, 24, 9, 9, device=device) * 4
    x.view(-1)[:6] = torch.tensor([-3.0, 3.0, 0.0, -3.0, 3.0, -6.0])
    return {"x": x.to(dtype).requires_grad_()}


def _se_inputs(shape, squeeze):
    def make(dtype, device):
        B, C, H, W = shape

        def param(*s, fan_in):
            return ((torch.rand(*s, device=device) * 2 - 1) / fan_in ** 0.5).to(dtype).requires_grad_()

        x = (torch.randn(B, C, H, W, device=device) * 3).to(dtype).requires_grad_()
        return {"x": x, "fc1_weight": param(squeeze, C, 1, 1, fan_in=C), "fc1_bias": param(squeeze, fan_in=C),
                "fc2_weight": param(C, squeeze, 1, 1, fan_in=squeeze), "fc2_bias": param(C, fan_in=squeeze)}
    return make


def _se(fn):
    return lambda x, fc1_weight, fc1_bias, fc2_weight, fc2_bias: fn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)


def _window_attention_inputs(dtype, device):
    # Swin-T stage 3 per window (N = 49, head_dim 32), 2 images x 2 windows, Swin's 0/-100 mask.
    q, k, v = ((torch.randn(4, 3, 49, 32, device=device)).to(dtype).requires_grad_() for _ in range(3))
    bias = torch.randn(3, 49, 49, device=device).to(dtype).requires_grad_()
    mask = torch.where(torch.rand(2, 49, 49, device=device) < 0.3, -100.0, 0.0)
    return {"q": q, "k": k, "v": v, "bias": bias, "mask": mask}


def _swin_block_inputs(dtype, device):
    # 9x11 is not a multiple of the window (padding) and the shift is on (the in-kernel mask).
    C, heads, ws = 64, 2, 7

    def param(*s, std):
        return (torch.randn(*s, device=device) * std).to(dtype).requires_grad_()

    return {"x": param(2, 9, 11, C, std=1.0), "qkv_weight": param(3 * C, C, std=C ** -0.5),
            "qkv_bias": param(3 * C, std=0.1), "proj_weight": param(C, C, std=C ** -0.5),
            "proj_bias": param(C, std=0.1), "relative_position_bias_table": param((2 * ws - 1) ** 2, heads, std=0.5),
            "window_size": ws, "num_heads": heads, "shift_size": 3}


def _sagan_inputs(dtype, device):
    # SAGAN's generator attention at C = 64 (d_qk = 8) on a ragged 9x7 map, keys 2x2-pooled
    # (BigGAN); logits in the hundreds, beyond what a naive fp16 exp survives.
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    return {"q": leaf(2, 8, 63, scale=4), "k": leaf(2, 8, 16, scale=4), "v": leaf(2, 64, 16),
            "x": leaf(2, 64, 63), "gamma": torch.full((1,), 0.7, device=device, requires_grad=True)}


def _power_iteration_inputs(dtype, device):
    # A SAGAN discriminator weight (128 x 1024, a 4x4 conv flattened), three iterations from
    # normalised random vectors; gradients flow to the weight only (u, v are constants).
    w = torch.randn(128, 1024, device=device)
    u = torch.nn.functional.normalize(torch.randn(128, device=device), dim=0)
    v = torch.nn.functional.normalize(torch.randn(1024, device=device), dim=0)
    return {"weight_mat": w.to(dtype).requires_grad_(), "u": u.to(dtype), "v": v.to(dtype),
            "n_power_iterations": 3}


def _gram_inputs(dtype, device):
    return {"x": torch.randn(2, 70, 9, 9, device=device).relu().to(dtype).requires_grad_()}


def _style_inputs(dtype, device):
    # activations ~30 so that the loss and its gradients are O(1), not below the absolute tolerance
    x = torch.randn(2, 70, 9, 9, device=device).relu() * 30
    style = torch.randn(1, 70, 81, device=device).relu() * 30
    target = torch.bmm(style, style.transpose(1, 2)) / (70 * 81) * 1.1
    return {"x": x.to(dtype).requires_grad_(), "target_gram": target.requires_grad_()}


def _tv_inputs(dtype, device):
    return {"y": torch.rand(2, 3, 37, 70, device=device).to(dtype).requires_grad_()}



def _patch_nce_inputs(B, P, d, all_negatives, grad_k):
    # L2-normalised features, keys a noisy copy of the queries (CUT's default d = 256 per image;
    # negatives from the whole minibatch with the gradient reaching the keys too).
    def make(dtype, device):
        q = torch.nn.functional.normalize(torch.randn(B * P, d, device=device), dim=1)
        k = torch.nn.functional.normalize(q + 0.5 * torch.randn_like(q), dim=1)
        return {"feat_q": q.to(dtype).requires_grad_(), "feat_k": k.to(dtype).requires_grad_(grad_k),
                "batch_size": B, "all_negatives": all_negatives, "detach_k": not grad_k}
    return make


def _patch_nce(feat_q, feat_k, batch_size, all_negatives, detach_k):
    return fastnote.patch_nce_loss(feat_q, feat_k, batch_size, 0.07, all_negatives, detach_k=detach_k)


def _patch_nce_reference(feat_q, feat_k, batch_size, all_negatives, detach_k):
    return reference.patch_nce_loss(feat_q, feat_k, 0.07, batch_size, all_negatives, detach_k=detach_k)


def _clip_inputs(dtype, device):
    # 100 pairs (a partial last tile), d = 64, open_clip's maximal logit scale 100.
    img = torch.nn.functional.normalize(torch.randn(100, 64, device=device), dim=1)
    txt = torch.nn.functional.normalize(img + torch.randn_like(img), dim=1)
    return {"image_emb": img.to(dtype).requires_grad_(), "text_emb": txt.to(dtype).requires_grad_(),
            "logit_scale": torch.tensor(100.0, device=device, requires_grad=True)}


def _clip_reference(image_emb, text_emb, logit_scale):
    return reference.clip_loss(image_emb, text_emb, logit_scale, exponentiated=True)

ENTRIES = [
    ParityEntry("hard_swish", _activation_inputs, fastnote.hard_swish, reference.hard_swish, "elementwise"),
    ParityEntry("hard_sigmoid", _activation_inputs, fastnote.hard_sigmoid, reference.hard_sigmoid, "elementwise"),
    # A MobileNetV3 channel count with a ragged plane (7x7) and its squeeze width make_divisible(72 // 4, 8).
    ParityEntry("squeeze_excitation", _se_inputs((2, 72, 7, 7), 24),
                _se(fastnote.squeeze_excitation), _se(reference.squeeze_excitation), "reduction"),
    ParityEntry("hswish_se", _se_inputs((3, 40, 5, 5), 16),
                _se(fastnote.hswish_se), _se(reference.hswish_se), "reduction"),
    ParityEntry("sagan_attention", _sagan_inputs, fastnote.sagan_attention, reference.sagan_attention,
                "two_matmul"),
    ParityEntry("window_attention", _window_attention_inputs, fastnote.window_attention,
                reference.window_attention, "two_matmul"),
    ParityEntry("swin_window_attention", _swin_block_inputs, fastnote.swin_window_attention,
                reference.swin_block_attention, "two_matmul"),
    ParityEntry("power_iteration", _power_iteration_inputs, fastnote.power_iteration, reference.power_iteration,
                "reduction"),
    # VGG-16-like features: 70 channels (a triangular grid of three 64-wide tiles in fp32), 9x9 map;
    # the style target [1, C, C] broadcast over the batch and given a gradient too.
    ParityEntry("gram", _gram_inputs, fastnote.gram, reference.gram, "reduction"),
    ParityEntry("style_loss", _style_inputs, fastnote.style_loss, reference.style_loss, "reduction"),
    ParityEntry("tv_loss", _tv_inputs, fastnote.tv_loss, reference.total_variation, "reduction"),
    ParityEntry("patch_nce", _patch_nce_inputs(2, 64, 256, False, False), _patch_nce, _patch_nce_reference,
                "reduction"),
    ParityEntry("patch_nce_all", _patch_nce_inputs(2, 40, 64, True, True), _patch_nce, _patch_nce_reference,
                "reduction"),
    ParityEntry("clip_loss", _clip_inputs, fastnote.clip_loss, _clip_reference, "reduction"),
]


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------

def _as_list(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _clone(inputs, to_fp32: bool):
    """Fresh leaves with the same values: as given, or upcast to fp32 for the reference."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().clone()
            if to_fp32 and t.is_floating_point():
                t = t.float()
            out[k] = t.requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _row(entry, dtype, tensor, actual, expected, kind):
    atol, rtol = testing.tolerance(dtype, kind)
    err = testing.max_error(actual, expected)
    try:
        testing.assert_close(actual, expected, kind, dtype=dtype)
        status = "PASS"
    except AssertionError:
        status = "FAIL"
    return {"op": entry.name, "dtype": DTYPE_NAMES[dtype], "tensor": tensor, "max_abs_err": err,
            "atol": atol, "rtol": rtol, "status": status, "note": ""}


def compare(entry: ParityEntry, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    inputs = entry.make_inputs(dtype, device)
    ours_in, ref_in = _clone(inputs, False), _clone(inputs, True)
    ours = _as_list(entry.fastnote_fn(**ours_in))
    ref = _as_list(entry.reference_fn(**ref_in))
    names = ["out"] if len(ours) == 1 else [f"out[{i}]" for i in range(len(ours))]
    rows = [_row(entry, dtype, n, a, e, entry.kind) for n, a, e in zip(names, ours, ref)]

    pairs = [(a, e) for a, e in zip(ours, ref) if a.requires_grad and e.requires_grad]
    if pairs:
        # One upstream gradient, rounded to the output dtype, fed to both sides.
        grads = [torch.randn(a.shape, device=device).to(a.dtype) for a, _ in pairs]
        torch.autograd.backward([a for a, _ in pairs], grads)
        torch.autograd.backward([e for _, e in pairs], [g.float() for g in grads])
        grad_kind = entry.grad_kind or entry.kind
        for k, v in ours_in.items():
            if isinstance(v, torch.Tensor) and v.requires_grad:
                if v.grad is None or ref_in[k].grad is None:
                    rows.append({"op": entry.name, "dtype": DTYPE_NAMES[dtype], "tensor": f"grad {k}",
                                 "max_abs_err": float("nan"), "atol": float("nan"), "rtol": float("nan"),
                                 "status": "FAIL", "note": "gradient missing"})
                    continue
                rows.append(_row(entry, dtype, f"grad {k}", v.grad, ref_in[k].grad, grad_kind))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the table as CSV here")
    p.add_argument("--ops", help="comma list of op names (default: all)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32]
    kernels = "triton" if backend.use_triton(device) else "reference"
    where = torch.cuda.get_device_name(device) if HAS_CUDA else "cpu, Triton interpreter"
    print(f"parity on {where}; fastnote backend: {kernels}; torch {torch.__version__}")
    if kernels == "reference":
        print("note: FASTNOTE_BACKEND selects the reference: this compares the reference with itself")

    entries = ENTRIES
    if args.ops:
        wanted = {s.strip() for s in args.ops.split(",") if s.strip()}
        unknown = wanted - {e.name for e in ENTRIES}
        if unknown:
            print(f"--ops: unknown op(s) {', '.join(sorted(unknown))}")
            return 2
        entries = [e for e in ENTRIES if e.name in wanted]

    # Each row is printed, and appended to the CSV, as soon as it is measured: a run stopped
    # from outside (a time limit) keeps every row it finished.
    header = f"{'op':<20} {'dtype':<5} {'tensor':<18} {'max abs err':>12} {'tolerance':>22}  result"
    print(header)
    print("-" * len(header), flush=True)
    writer = None
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        out_file = open(args.out, "w", newline="", encoding="utf-8")
        fields = ["op", "dtype", "tensor", "max_abs_err", "atol", "rtol", "status", "note", "device", "backend"]
        writer = csv.DictWriter(out_file, fieldnames=fields)
        writer.writeheader()
        out_file.flush()
    rows = []
    for entry in entries:
        for dtype in dtypes:
            if dtype not in entry.dtypes:
                continue
            try:
                new_rows = compare(entry, dtype, device)
            except Exception as exc:
                new_rows = [{"op": entry.name, "dtype": DTYPE_NAMES[dtype], "tensor": "-",
                             "max_abs_err": float("nan"), "atol": float("nan"), "rtol": float("nan"),
                             "status": "FAIL", "note": f"{type(exc).__name__}: {exc}"[:200]}]
            for r in new_rows:
                tol = (f"atol=rtol={r['atol']:.0e}" if r["atol"] == r["rtol"]
                       else f"atol={r['atol']:.0e} rtol={r['rtol']:.0e}")
                note = f"  {r['note']}" if r["note"] else ""
                print(f"{r['op']:<20} {r['dtype']:<5} {r['tensor']:<18} {r['max_abs_err']:>12.3e} {tol:>22}  "
                      f"{r['status']}{note}", flush=True)
                if writer is not None:
                    writer.writerow(dict(r, device=where, backend=kernels))
                    out_file.flush()
            rows += new_rows
    failed = sum(r["status"] == "FAIL" for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    if writer is not None:
        out_file.close()
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
