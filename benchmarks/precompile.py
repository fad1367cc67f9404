"""Build, in parallel, the Triton kernels that the op benchmarks will launch, so that their timed
steps find every kernel in Triton's cache instead of compiling them one after another.

``run_gpu.sh quick`` runs each op family's benchmark under its own time budget, and a kernel
compiles at its first launch, one at a time: at the quick cases the window attention family alone
launches 48 distinct variants (four benchmarks, three dtypes, the A/B providers), a few seconds of
compiling each. This script records those launches without running them: it calls each
benchmark's fastnote providers (every provider whose name starts with "fastnote", torch.compile
ones excepted) on CPU tensors of the cases' shapes and dtypes (forward and backward once, where a
provider has the "both" mode, else each mode it has), with Triton's launch
replaced by a recorder, the one ``tests/aot_compile.py`` uses (the JIT's own binder decides the
argument specialisation, so each recorded variant is the binary the GPU launch asks for). Then it
builds each distinct variant for this machine's GPU in a pool of processes. Triton keeps each
build in its cache (``TRITON_CACHE_DIR``, ``~/.triton/cache`` by default), keyed by the source,
the specialisation, the options and the target, where the benchmark's own launch finds it.

The GPU stays hidden from this process (the kernels are built, not run; CUDA is never initialised
before the pool forks): its compute capability is read in a child process, or given with
``--arch``. Without a GPU it builds for sm_90 (what ``run_gpu.sh``'s CPU simulation does).

    python benchmarks/precompile.py [--quick | --smoke] [--only window_attention,gram] [--jobs N] [--arch 90]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _gpu_arch() -> int | None:
    """The compute capability of GPU 0 as 90 for sm_90, read in a child process (so that this one
    never initialises CUDA); None without a GPU."""
    probe = ("import torch; c = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None; "
             "print(c[0] * 10 + c[1] if c else '')")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    out = out.strip().splitlines()
    return int(out[-1]) if out and out[-1].isdigit() else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the cases `--quick` runs (run_gpu.sh quick)")
    which.add_argument("--smoke", action="store_true", help="the smoke cases")
    p.add_argument("--only", help="comma list of benchmark scripts (without .py); default: every op script")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build processes (default: one per core)")
    p.add_argument("--arch", type=int, help="compute capability to build for, e.g. 90 (default: GPU 0's, else 90)")
    return p


def record(scripts, which: str):
    """Run the fastnote providers of each script's benchmarks with launches recorded; returns
    ({variant key: index of its first launch in aot_compile.captured}, [(script, op, new variants,
    seconds)], [problems])."""
    import importlib.util

    import torch
    from triton.runtime.jit import JITFunction

    import aot_compile
    from fastnote import backend
    from harness.cli import quick_cases
    from harness.modes import _mode_callable, _NotApplicable

    JITFunction.run = aot_compile._capture          # launches are recorded, not run
    backend.use_triton = lambda device: True        # CPU tensors take the kernel path
    cpu = torch.device("cpu")
    variants, per_op, problems = {}, [], []
    for path in scripts:
        name = os.path.basename(path)[:-3]
        spec = importlib.util.spec_from_file_location(f"fastnote_precompile_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for bench in module.BENCHMARKS:
            started = time.perf_counter()
            start = len(aot_compile.captured)
            cases = list(bench.smoke_cases if which == "smoke" else bench.cases)
            if which == "quick":
                cases = quick_cases(bench, cases)
            providers = [p for p in bench.providers if p.name.startswith("fastnote") and not p.compile]
            for case in cases:
                try:
                    inputs = bench.make_inputs(case, cpu)
                except Exception as exc:   # reported; the benchmark itself will say more
                    problems.append(f"{bench.op} {case.config}: inputs: {type(exc).__name__}: {exc}")
                    continue
                for provider in providers:
                    try:
                        made = provider.setup(inputs, case)
                        # "both" launches what "fwd" and "bwd" launch (the same settings), once
                        modes = ["both"] if "both" in bench.modes else []
                        modes += [m for m in bench.modes if m != "both"]
                        for mode in modes:
                            try:
                                run = _mode_callable(made, mode)
                            except _NotApplicable:
                                continue
                            run()
                            if mode == "both":
                                break
                    except Exception as exc:
                        problems.append(f"{bench.op} {provider.name} {case.config}: {type(exc).__name__}: {exc}")
            found = 0
            for i in range(start, len(aot_compile.captured)):
                key = aot_compile.variant_key(*aot_compile.captured[i])
                if key not in variants:
                    variants[key] = i
                    found += 1
            per_op.append((name, bench.op, found, time.perf_counter() - started))
    return variants, per_op, problems


def _build(index):
    """Build recorded launch ``index`` for the target (in a forked pool process, which has the
    recorded launches: kernels do not pickle); returns an error or None."""
    import aot_compile

    fn, args, kwargs = aot_compile.captured[index]
    try:
        aot_compile.build(fn, args, kwargs, _TARGET)
    except Exception as exc:
        return f"{fn.fn.__name__}: {type(exc).__name__}: {exc}"
    return None


_TARGET = None


def main(argv=None) -> int:
    global _TARGET
    args = _parser().parse_args(argv)
    arch = args.arch or _gpu_arch() or 90
    # the kernels are built, never run: hide the GPU (no CUDA context before the pool forks) and
    # switch the interpreter off (the launchers then choose the GPU's dot precision)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.pop("TRITON_INTERPRET", None)
    for path in (HERE, os.path.join(ROOT, "tests")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import multiprocessing

    from triton.backends.compiler import GPUTarget

    from run_all import discover

    scripts = [p for p in discover(HERE) if not p.endswith("models.py")]
    if args.only:
        wanted = {s.strip().removesuffix(".py") for s in args.only.split(",") if s.strip()}
        unknown = wanted - {os.path.basename(p)[:-3] for p in scripts}
        if unknown:
            print(f"--only: no such benchmark script: {', '.join(sorted(unknown))}")
            return 2
        scripts = [p for p in scripts if os.path.basename(p)[:-3] in wanted]
    which = "smoke" if args.smoke else "quick" if args.quick else "all"
    t0 = time.perf_counter()
    variants, per_op, problems = record(scripts, which)
    t1 = time.perf_counter()
    for script, op, found, seconds in per_op:
        print(f"  {script:<20} {op:<28} {found:>3} new variants, recorded in {seconds:5.1f} s")
    print(f"recorded {len(variants)} distinct variants ({which} cases) in {t1 - t0:.1f} s; "
          f"building them for sm_{arch} in {args.jobs} processes")
    _TARGET = GPUTarget("cuda", arch, 32)
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        errors = [e for e in pool.map(_build, list(variants.values()), chunksize=1) if e]
    print(f"built {len(variants) - len(errors)} of {len(variants)} in {time.perf_counter() - t1:.1f} s")
    for line in problems + errors:
        print("problem:", line)
    return 1 if problems or errors else 0


if __name__ == "__main__":
    sys.exit(main())
