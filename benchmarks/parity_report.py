"""Parity of every fastnote op against fastnote.reference: forward output and the gradient of every
differentiable input, per dtype, on this machine's device.

On a GPU the kernels run natively in fp32, fp16 and bf16. Without one the Triton interpreter is
turned on (before triton is imported), so the Triton kernels themselves are compared, in fp32.
The reference runs in fp32 on the same input values (low-precision inputs upcast) and with the
same upstream gradient; tolerances come from ``fastnote.testing`` (docs/design.md section 3.1).

    python benchmarks/parity_report.py [--out parity.csv] [--ops gram,hswish_se]

Exit status 1 if any comparison fails.

The ops, their inputs and tolerance kinds are the table of ``fastnote.cases`` (which
``python -m fastnote report`` reads too); the comparison is ``fastnote.cases.compare``.
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

from fastnote import backend, cases  # noqa: E402


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

    try:
        entries = cases.by_name([s.strip() for s in (args.ops or "").split(",") if s.strip()])
    except ValueError as e:
        print(f"--ops: {e}")
        return 2

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
            new_rows = cases.compare_safely(entry, dtype, device)
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
