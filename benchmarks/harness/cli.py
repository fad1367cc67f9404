"""The command line every benchmark script shares: ``parser`` (its flags) and ``main`` (choose
the device, output folder, cases, modes and providers; run; write the CSV and the PNGs)."""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import tempfile
import traceback
from typing import List, Optional, Sequence

import torch

from .environment import (COPY_BYTES, RESULTS, _backend_name, copy_bandwidth_gbps, cpu_name, git_commit,
                          slugify, triton_version)
from .plotting import plot
from .results import merged_with_file, write_csv
from .runner import run_benchmark
from .spec import DTYPES, MODES, STEP, Benchmark, _Run


def _csv_list(text: Optional[str]) -> Optional[List[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def quick_cases(bench: Benchmark, cases: Sequence) -> list:
    """What ``--quick`` runs (and the pytest-benchmark entry's default ``--fastnote-cases quick``):
    those of ``cases`` the Benchmark lists in ``quick_cases``, or else the first case of each
    dtype, in declaration order."""
    if bench.quick_cases is not None:
        return [c for c in cases if c in bench.quick_cases]
    firsts = {}
    for c in cases:
        firsts.setdefault(c.config.get("dtype"), c)
    return list(firsts.values())


def parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, one timed call (automatic when there is no CUDA GPU)")
    p.add_argument("--out", help="output root; results go to OUT/<device>/<op>.csv "
                                 "(default: benchmarks/results, or a temp dir in smoke mode)")
    p.add_argument("--modes", help="comma list of fwd,bwd,both (the model benchmarks: step)")
    p.add_argument("--dtypes", help="comma list of fp32,fp16,bf16")
    p.add_argument("--providers", help="comma list of provider names")
    p.add_argument("--compile", action="store_true", help="run torch.compile providers in smoke mode too")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile providers (their compilation dominates a short GPU run)")
    p.add_argument("--quick", action="store_true",
                   help="only each benchmark's first case per dtype (a GPU run on a short budget); "
                        "results go to a folder named <device>-quick")
    p.add_argument("--repeats", type=int, help="timed calls per measurement on the CPU")
    p.add_argument("--peak-gbps", type=float, help="nominal memory bandwidth for the %% of peak rows")
    p.add_argument("--peak-tflops", type=float, help="nominal compute peak for the %% of peak rows")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in the op's CSV that this run does not measure again "
                        "(e.g. a second run with other --providers); default: the run rewrites the CSV")
    return p


def main(benchmarks: Sequence[Benchmark], argv: Optional[Sequence[str]] = None) -> None:
    args = parser(sys.modules["__main__"].__doc__ or "").parse_args(argv)
    modes_wanted = _csv_list(args.modes)
    dtypes_wanted = _csv_list(args.dtypes)
    providers_wanted = _csv_list(args.providers)
    for name in modes_wanted or []:
        if name not in MODES + (STEP,):
            sys.exit(f"--modes: unknown mode {name!r}; choose from {MODES + (STEP,)}")
    for name in dtypes_wanted or []:
        if name not in DTYPES:
            sys.exit(f"--dtypes: unknown dtype {name!r}; choose from {tuple(DTYPES)}")

    meta_common = {"torch": torch.__version__, "triton": triton_version(), "fastnote_commit": git_commit(),
                   "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp_out = None
    failures = 0
    for bench in benchmarks:
        has_cuda = torch.cuda.is_available()
        device = torch.device(bench.device or ("cuda" if has_cuda else "cpu"))
        if device.type == "cuda" and not has_cuda:
            print(f"{bench.op}: needs CUDA, none here: smoke on the CPU instead")
            device = torch.device("cpu")
        smoke = args.smoke or (device.type == "cpu" and not bench.cpu_real)
        cpu_timing = smoke or device.type == "cpu"
        if device.type == "cuda":
            gpu = torch.cuda.get_device_name(device)
            slug = slugify(gpu) + ("-smoke" if smoke else "")
        else:
            gpu = cpu_name()
            slug = "cpu-smoke" if smoke else "cpu-" + slugify(gpu)
        if args.quick and not smoke:
            slug += "-quick"   # a subset of the cases: never overwrites a full run's CSV
        out_root = args.out
        if out_root is None:
            if smoke:
                tmp_out = tmp_out or tempfile.mkdtemp(prefix="fastnote-bench-")
                out_root = tmp_out
            else:
                out_root = RESULTS
        copy_gbps = None
        if not cpu_timing and bench.bytes_moved is not None:
            copy_gbps = copy_bandwidth_gbps(device)
            write_csv(os.path.join(out_root, slug, "device.csv"), [dict(
                op="copy_bandwidth", provider="torch.copy_", mode="copy", metric="throughput", unit="GB/s",
                x_name="bytes", x_value=COPY_BYTES, p50=copy_gbps, p20=copy_gbps, p80=copy_gbps,
                config=json.dumps({"dtype": "uint8"}), gpu=gpu, **meta_common)])
        run = _Run(device=device, smoke=smoke, cpu_timing=cpu_timing, slug=slug, gpu=gpu,
                   warmup=0 if smoke else bench.cpu_warmup,
                   repeats=1 if smoke else (args.repeats or bench.cpu_repeats),
                   peak_gbps=args.peak_gbps, peak_tflops=args.peak_tflops, copy_gbps=copy_gbps,
                   meta=dict(gpu=gpu, **meta_common))

        cases = list(bench.smoke_cases if smoke else bench.cases)
        if dtypes_wanted:
            cases = [c for c in cases if c.config.get("dtype") in (None, *dtypes_wanted)]
        modes = [m for m in bench.modes if not modes_wanted or m in modes_wanted]
        providers = [p for p in bench.providers if (not providers_wanted or p.name in providers_wanted)
                     and not (args.no_compile and p.compile)]
        if args.quick and not smoke:
            cases = quick_cases(bench, cases)

        how = ("smoke (tiny shapes, one timed call, no memory)" if smoke else
               f"CPU, median of {run.repeats} calls" if cpu_timing else "triton.testing.do_bench")
        print(f"== {bench.op} on {gpu} ({device.type}): {how}")
        print(f"   torch {meta_common['torch']}, triton {meta_common['triton']}, "
              f"commit {meta_common['fastnote_commit']}, fastnote backend: {_backend_name(device)}")
        if copy_gbps:
            print(f"   measured copy bandwidth: {copy_gbps:.1f} GB/s")
        out_dir = os.path.join(out_root, slug)
        path = os.path.join(out_dir, f"{bench.op}.csv")

        def save(rows, path=path):
            # With --merge, what this run measured replaces its own earlier rows only.
            write_csv(path, merged_with_file(path, rows) if args.merge else rows)

        # The CSV is rewritten after every case: a run stopped from outside keeps what it finished.
        rows, failed = run_benchmark(bench, run, cases, modes, providers, args.compile, save)
        failures += failed
        save(rows)
        if args.merge:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        print(f"   wrote {path} ({len(rows)} rows)")
        if not args.no_plot and rows:
            try:
                for png in plot(bench, rows, out_dir):
                    print(f"   wrote {png}")
            except Exception:
                failures += 1
                traceback.print_exc()
    if failures:
        print(f"{failures} measurement(s) failed (see the tracebacks above)")
        sys.exit(1)
