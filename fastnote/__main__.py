"""``python -m fastnote report``: the environment fastnote runs in, and a short parity check of
every op against ``fastnote.reference``: the cases of ``fastnote.cases`` in fp32, forward and the
gradient of every input, the tolerances of docs/design.md section 3.1 (the comparison of
``benchmarks/parity_report.py``, which runs every dtype). Exit status 1 if a check fails.

Without a GPU the Triton kernels can only run under the Triton interpreter, which must be turned on
before triton is imported: unless ``--no-interpret`` is given (or TRITON_INTERPRET is already
set), this sets ``TRITON_INTERPRET=1`` for the check, so the kernels themselves are what is
compared on a CPU too (slowly: the check takes a few seconds to a minute there).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Sequence, Tuple


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


def check(case, device) -> Tuple[bool, str]:
    """One op of ``fastnote.cases`` in fp32: (passed, the worst error or the first failure)."""
    from fastnote import cases

    rows = cases.compare_safely(case, cases.FP32, device)
    bad = [r for r in rows if r["status"] != "PASS"]
    if bad:
        r = bad[0]
        return False, r["note"] or (f"{r['tensor']}: max abs err {r['max_abs_err']:.1e} > "
                                    f"atol {r['atol']:.0e} + rtol {r['rtol']:.0e}")
    return True, f"max abs err {max(r['max_abs_err'] for r in rows):.1e}"


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
    from fastnote import cases

    try:
        selected = cases.by_name(ops)
    except ValueError as e:
        print(e, file=out)
        return 2
    if not backend.use_triton(device):
        print(f"parity: the Triton kernels do not run on {device.type} here, so only power_iteration "
              "(C++) is compared; set TRITON_INTERPRET=1 (or drop --no-interpret) to check the rest",
              file=out)
    print(f"parity on {device.type}, fp32, vs fastnote.reference:", file=out)
    failed = 0
    width = max((len(c.name) for c in selected), default=0)
    for case in selected:
        if not backend.use_triton(device) and case.name != "power_iteration":
            print(f"  {case.name:<{width}}  skipped (reference backend: it would compare the reference with itself)",
                  file=out)
            continue
        ok, detail = check(case, device)
        failed += not ok
        print(f"  {case.name:<{width}}  {'PASS' if ok else 'FAIL'}  {detail}", file=out)
    print("parity: " + ("all passed" if not failed else f"{failed} failed"), file=out)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnote", description=__doc__.split("\n\n")[0].replace("\n", " "))
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
