"""``python -m fastnote report``: the environment fastnote runs in, and a short parity check of
every op against ``fastnote.reference`` (forward and the gradient of every input, fp32, small
shapes, the tolerances of docs/design.md section 3.1). Exit status 1 if a check fails.

Without a GPU the Triton kernels can only run under the Triton interpreter, which must be turned on
before triton is imported: unless ``--no-interpret`` is given (or TRITON_INTERPRET is already
set), this sets ``TRITON_INTERPRET=1`` for the check, so the kernels themselves are what is
compared on a CPU too (slowly: the check takes a few seconds to a minute there).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple


def _prepare_interpreter(enable: bool) -> str:
    if "TRITON_INTERPRET" in os.environ or not enable:
        return ""
    import torch

    if torch.cuda.is_available():
        return ""
    if "triton" in sys.modules:
        return "triton was imported before the interpreter could be turned on"
    os.environ["TRITON_INTERPRET"] = "1"
    from . import backend

    backend.refresh()   # in case the settings were read before
    return ""


# ------------------------------------------------------------------------------------------------
# The checks: (name, make inputs, fastnote function, reference function, tolerance kind)
# ------------------------------------------------------------------------------------------------

def _checks():
    import torch
    import torch.nn.functional as F

    import fastnote
    from fastnote import reference

    def leaf(*shape, scale=1.0, device):
        return (torch.randn(*shape, device=device) * scale).requires_grad_()

    def act(device):
        x = torch.randn(2, 8, 5, 7, device=device) * 4
        x.view(-1)[:2] = torch.tensor([-3.0, 3.0])
        return {"x": x.requires_grad_()}

    def se(device):
        return {"x": leaf(2, 24, 5, 5, device=device), "fc1_weight": leaf(8, 24, scale=0.2, device=device),
                "fc1_bias": leaf(8, scale=0.1, device=device), "fc2_weight": leaf(24, 8, scale=0.3, device=device),
                "fc2_bias": leaf(24, scale=0.1, device=device)}

    def window(device):
        q, k, v = (leaf(2, 2, 16, 16, device=device) for _ in range(3))
        mask = torch.where(torch.rand(1, 16, 16, device=device) < 0.3, -100.0, 0.0)
        return {"q": q, "k": k, "v": v, "bias": leaf(2, 16, 16, device=device), "mask": mask}

    def block(device):
        C, heads, ws = 32, 2, 4
        return {"x": leaf(1, 6, 5, C, device=device), "qkv_weight": leaf(3 * C, C, scale=C ** -0.5, device=device),
                "qkv_bias": leaf(3 * C, scale=0.1, device=device),
                "proj_weight": leaf(C, C, scale=C ** -0.5, device=device),
                "proj_bias": leaf(C, scale=0.1, device=device),
                "relative_position_bias_table": leaf((2 * ws - 1) ** 2, heads, scale=0.5, device=device),
                "window_size": ws, "num_heads": heads, "shift_size": 2}

    def sagan(device):
        return {"q": leaf(2, 4, 20, device=device), "k": leaf(2, 4, 20, device=device),
                "v": leaf(2, 32, 20, device=device),
                "x": leaf(2, 32, 20, device=device), "gamma": torch.full((1,), 0.7, device=device, requires_grad=True)}

    def power(device):
        return {"weight_mat": leaf(24, 40, device=device), "u": F.normalize(torch.randn(24, device=device), dim=0),
                "v": F.normalize(torch.randn(40, device=device), dim=0), "n_power_iterations": 2}

    def gram(device):
        return {"x": leaf(2, 20, 5, 5, device=device)}

    def style(device):
        t = torch.randn(20, 30, device=device)
        return {"x": leaf(2, 20, 5, 6, device=device), "target_gram": (t @ t.t() / 600).requires_grad_()}

    def tv(device):
        return {"y": leaf(2, 3, 9, 11, device=device)}

    def nce(device):
        q = F.normalize(torch.randn(2 * 16, 32, device=device), dim=1)
        k = F.normalize(q + 0.5 * torch.randn_like(q), dim=1)
        return {"feat_q": q.requires_grad_(), "feat_k": k, "batch_size": 2}

    def clip(device):
        img = F.normalize(torch.randn(20, 16, device=device), dim=1)
        txt = F.normalize(img + torch.randn_like(img), dim=1)
        return {"image_emb": img.requires_grad_(), "text_emb": txt.requires_grad_(),
                "logit_scale": torch.tensor(10.0, device=device, requires_grad=True)}

    return [
        ("hard_swish", act, fastnote.hard_swish, reference.hard_swish, "elementwise"),
        ("hard_sigmoid", act, fastnote.hard_sigmoid, reference.hard_sigmoid, "elementwise"),
        ("squeeze_excitation", se, fastnote.squeeze_excitation, reference.squeeze_excitation, "reduction"),
        ("hswish_se", se, lambda x, **kw: fastnote.hswish_se(x, **kw), lambda x, **kw: reference.hswish_se(x, **kw),
         "reduction"),
        ("window_attention", window, fastnote.window_attention, reference.window_attention, "two_matmul"),
        ("swin_window_attention", block, fastnote.swin_window_attention, reference.swin_block_attention,
         "two_matmul"),
        ("sagan_attention", sagan, fastnote.sagan_attention, reference.sagan_attention, "two_matmul"),
        ("power_iteration", power, fastnote.power_iteration, reference.power_iteration, "reduction"),
        ("gram", gram, fastnote.gram, reference.gram, "reduction"),
        ("style_loss", style, fastnote.style_loss, reference.style_loss, "reduction"),
        ("tv_loss", tv, fastnote.tv_loss, reference.total_variation, "reduction"),
        ("patch_nce_loss", nce, fastnote.patch_nce_loss,
         lambda feat_q, feat_k, batch_size: reference.patch_nce_loss(feat_q, feat_k, batch_size=batch_size),
         "reduction"),
        ("clip_loss", clip, fastnote.clip_loss,
         lambda image_emb, text_emb, logit_scale: reference.clip_loss(image_emb, text_emb, logit_scale,
                                                                      exponentiated=True),
         "reduction"),
    ]


def _tensors(out) -> List:
    import torch

    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def check(name: str, make: Callable, ours: Callable, ref: Callable, kind: str, device) -> Tuple[bool, str]:
    """One op: forward outputs and the gradient of every input that requires one."""
    import torch

    from fastnote import testing

    torch.manual_seed(0)
    inputs = make(device)

    def fresh():
        return {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                for k, v in inputs.items()}

    a_in, b_in = fresh(), fresh()
    got, want = _tensors(ours(**a_in)), _tensors(ref(**b_in))
    worst = 0.0
    try:
        for g, w in zip(got, want):
            testing.assert_close(g, w, kind)
            worst = max(worst, testing.max_error(g, w))
        pairs = [(g, w) for g, w in zip(got, want) if g.requires_grad and w.requires_grad]
        leaves = [k for k, v in a_in.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        if pairs and leaves:
            cot = [torch.randn(g.shape, device=g.device, dtype=g.dtype) for g, _ in pairs]
            ga = torch.autograd.grad([g for g, _ in pairs], [a_in[k] for k in leaves], cot, allow_unused=True)
            gb = torch.autograd.grad([w for _, w in pairs], [b_in[k] for k in leaves], cot, allow_unused=True)
            for k, x, y in zip(leaves, ga, gb):
                if x is None and y is None:
                    continue
                if x is None or y is None:
                    raise AssertionError(f"gradient of {k}: one side has none")
                testing.assert_close(x, y, kind, msg=f"gradient of {k}")
                worst = max(worst, testing.max_error(x, y))
    except AssertionError as e:
        return False, str(e).strip().splitlines()[0]
    return True, f"max abs err {worst:.1e}"


def environment() -> Dict[str, str]:
    """What the report prints about the machine and the build."""
    import torch

    import fastnote
    from fastnote import backend
    from fastnote.ops import power_iteration

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpu = "none"
    if power_iteration.extension_available():
        from fastnote import _C

        ext = "loaded, with CUDA" if getattr(_C, "with_cuda", False) else "loaded, CPU only (no CUDA part)"
    else:
        ext = "not loaded (spectral norm runs its Python fallback)"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = ("Triton kernels" if backend.use_triton(device) else "fastnote.reference (plain PyTorch)")
    except (RuntimeError, ValueError) as e:
        chosen = f"error: {e}"
    return {
        "fastnote": fastnote.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "GPU": gpu,
        "fastnote._C": ext,
        "FASTNOTE_BACKEND": backend.requested(),
        "TRITON_INTERPRET": "on" if backend.interpreter_on() else "off",
        f"backend on {device.type}": chosen,
    }


def report(ops: Sequence[str] = (), out=None) -> int:
    """Print the environment and the parity checks; return the exit status (1 on a failure)."""
    import torch

    from fastnote import backend

    out = out or sys.stdout
    env = environment()
    width = max(len(k) for k in env)
    for k, v in env.items():
        print(f"{k:<{width}}  {v}", file=out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checks = _checks()
    known = [c[0] for c in checks]
    unknown = [o for o in ops if o not in known]
    if unknown:
        print(f"unknown op(s) {unknown}; known: {known}", file=out)
        return 2
    if not backend.use_triton(device):
        print(f"parity: the Triton kernels do not run on {device.type} here, so only power_iteration "
              "(C++) is compared; set TRITON_INTERPRET=1 (or drop --no-interpret) to check the rest",
              file=out)
    print(f"parity on {device.type}, fp32, vs fastnote.reference:", file=out)
    failed = 0
    for name, make, ours, ref, kind in checks:
        if ops and name not in ops:
            continue
        if not backend.use_triton(device) and name != "power_iteration":
            print(f"  {name:<22} skipped (reference backend: it would compare the reference with itself)", file=out)
            continue
        try:
            ok, detail = check(name, make, ours, ref, kind, device)
        except Exception as e:  # noqa: BLE001 - a crash is a failure to report, not to hide
            ok, detail = False, f"{type(e).__name__}: {e}"
        failed += not ok
        print(f"  {name:<22} {'PASS' if ok else 'FAIL'}  {detail}", file=out)
    print("parity: " + ("all passed" if not failed else f"{failed} failed"), file=out)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnote", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="environment and a short parity check of every op")
    rep.add_argument("--ops", default="", help="comma-separated op names to check (default: all)")
    rep.add_argument("--no-interpret", action="store_true",
                     help="without a GPU, do not turn the Triton interpreter on for the check")
    args = parser.parse_args(argv)
    note = _prepare_interpreter(not args.no_interpret)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return report([o for o in args.ops.split(",") if o])


if __name__ == "__main__":
    sys.exit(main())
