"""Run every op benchmark in benchmarks/ (each script that calls ``harness.main(``), one process
each, and print a summary. A failing script does not stop the others; the exit status is 1 if any
failed.

    python benchmarks/run_all.py [--smoke] [--out DIR] [--only gram,squeeze_excitation] [--skip models]
                                 [-- extra args]

Arguments it does not know (``--modes``, ``--dtypes``, ``--compile``, ...) go to every script.
In smoke mode without ``--out`` all scripts write into one fresh temp dir, printed at the end.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NOT_OP_SCRIPTS = {"run_all.py", "parity_report.py", "make_table.py"}
ENTRY = "harness.main("


def discover(directory: str = HERE) -> list:
    """Paths of the op scripts: .py files in ``directory`` that call the harness entry point."""
    found = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".py") or name.startswith("_") or name in NOT_OP_SCRIPTS:
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path):  # a folder (a package) is no script, whatever its name
            continue
        with open(path, encoding="utf-8") as f:
            if ENTRY in f.read():
                found.append(path)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="smoke mode for every script")
    p.add_argument("--out", help="output root passed to every script")
    p.add_argument("--only", help="comma list of script names (without .py) to run")
    p.add_argument("--skip", help="comma list of script names (without .py) not to run")
    args, passthrough = p.parse_known_args(argv)
    if passthrough and passthrough[0] == "--":
        passthrough = passthrough[1:]

    scripts = discover()
    names = {os.path.basename(s)[:-3] for s in scripts}
    for flag, text in (("--only", args.only), ("--skip", args.skip)):
        if not text:
            continue
        listed = {s.strip().removesuffix(".py") for s in text.split(",") if s.strip()}
        unknown = listed - names
        if unknown:
            print(f"{flag}: no such benchmark script: {', '.join(sorted(unknown))}")
            return 2
        keep = (lambda n: n in listed) if flag == "--only" else (lambda n: n not in listed)
        scripts = [s for s in scripts if keep(os.path.basename(s)[:-3])]
    if not scripts:
        print("no benchmark scripts found")
        return 1

    out = args.out
    smoke = args.smoke
    if out is None and smoke:
        out = tempfile.mkdtemp(prefix="fastnote-bench-")
    common = (["--smoke"] if smoke else []) + (["--out", out] if out else []) + passthrough

    results = []
    for script in scripts:
        name = os.path.basename(script)
        cmd = [sys.executable, script, *common]
        print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=os.path.dirname(HERE)).returncode
        results.append((name, rc, time.perf_counter() - start))

    print("\n== summary")
    for name, rc, seconds in results:
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"  {name:<28} {status:<18} {seconds:7.1f} s")
    failed = [name for name, rc, _ in results if rc != 0]
    if out:
        print(f"  results under {out}")
    print(f"  {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
