"""The benchmark harness shared by every ``benchmarks/<op>.py`` script (a package: ``import harness``
works with benchmarks/ on ``sys.path``, as when a script runs as ``python benchmarks/<op>.py``).

How to add a benchmark
======================
Write ``benchmarks/<op>.py`` (run_all.py picks up every script that calls ``harness.main(``)::

    '''<op>: what is measured. Bytes model: fwd E*itemsize, bwd 2*E*itemsize (say why).'''
    import math
    import torch
    import fastnote
    import harness
    from harness import Benchmark, Case, Provider

    def make_inputs(case, device):               # built once per case, shared by the providers
        y = torch.rand(case.config["shape"], device=device).to(case.dtype)
        return {"y": y.requires_grad_()}          # leaves that require grad get gradients

    def eager_tv(y):                              # the code fastnote replaces, as written
        ...                                       # (benchmarks/gram.py has it in full)

    def eager(inputs, case):                     # returns the forward callable
        return lambda: eager_tv(inputs["y"])

    def ours(inputs, case):
        return lambda: fastnote.tv_loss(inputs["y"])

    BENCHMARKS = [Benchmark(
        op="tv_loss",                             # -> results/<gpu>/tv_loss.csv
        make_inputs=make_inputs,
        providers=[Provider("eager", eager),
                   Provider("torch.compile", eager, compile=True),
                   Provider("fastnote", ours)],
        cases=[Case("B", 16, {"dtype": "bf16", "shape": [16, 3, 256, 256]}), ...],
        smoke_cases=[Case("B", 2, {"dtype": "fp32", "shape": [2, 3, 20, 20]})],
        bytes_moved=lambda case, mode: ({"fwd": 1, "bwd": 2, "both": 3}[mode]
                                        * math.prod(case.config["shape"]) * case.itemsize),
    )]

    if __name__ == "__main__":
        harness.main(BENCHMARKS)

Providers
---------
``Provider(name, setup)``: ``setup(inputs, case)`` runs outside the timed region and returns either

- the forward callable (no arguments; returns a tensor, or a tuple/list/dict of tensors). The
  harness derives the modes from it: ``fwd`` times the forward (autograd on, as in training, so
  the memory figure includes what the forward saves for backward); ``bwd`` runs the forward
  once, untimed, then times ``torch.autograd.backward(outputs, grads, retain_graph=True)``;
  ``both`` times forward + backward. Leaf tensors in ``inputs`` (dict/list/tuple, nn.Module
  parameters included) get ``.grad = None`` before every timed call, so no accumulation is
  timed. Or
- a dict ``{"fwd": fn, "bwd": fn, "both": fn}`` of ready callables (any subset), for
  providers that need their own wiring.

``compile=True`` wraps the forward callable in ``torch.compile(dynamic=False)`` after
``torch._dynamo.reset()`` for every case (no recompile limit, no dynamic-shape kernels). Compiled
providers are skipped in smoke mode unless ``--compile`` is given. ``needs_cuda=True`` skips a
provider on the CPU.

Cases and models
----------------
``Case(x_name, x_value, config)``: ``x_value`` is the swept size plotted on the x axis;
``config`` (JSON-able: dtype as "fp32"/"fp16"/"bf16", the other dims) is written as a JSON string.
``case.dtype`` / ``case.itemsize`` read ``config["dtype"]``. ``bytes_moved(case, mode)`` and
``flops(case, mode)`` (each optional, may return None) give achieved GB/s and TFLOP/s; GB/s is
also reported as a percentage of the copy bandwidth measured once per run (1 GiB ``copy_``, also
written to ``device.csv``) and of the nominal peak (H100 SXM 3350 GB/s, H200 4800 GB/s; dense
bf16/fp16 989 TFLOP/s, fp32 67, tf32 494; ``--peak-gbps`` / ``--peak-tflops`` override).

Where and how it measures
-------------------------
- CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` for time; peak memory is
  ``max_memory_allocated()`` during one call minus what was allocated before it.
- No GPU: smoke mode (``smoke_cases``, one timed call with ``time.perf_counter``, no memory
  rows, compiled providers skipped). Results go to ``--out`` (default a fresh temp dir) under
  ``cpu-smoke/``, so CI never rewrites committed results. ``--smoke`` forces it on a GPU too.
- A benchmark whose CPU timings are real measurements (spectral norm's power iteration:
  ``Benchmark(..., cpu_real=True, device="cpu", modes=("fwd",))``) runs its full ``cases`` on
  the CPU, ``cpu_warmup`` untimed then ``cpu_repeats`` timed calls (median, 20th and 80th
  percentile via ``time.perf_counter``), the providers taking turns (``CPU_ROUND`` calls each)
  so that a drifting machine speed hits them alike, into ``results/cpu-<processor>/``; its config gains
  ``threads``. ``device="cpu"`` keeps it on the CPU where a GPU exists too; with
  ``device=None`` it uses the GPU when there is one. ``--smoke`` still means smoke.
- A provider that fails (CUDA OOM included) gives NaN rows with ``"note"`` in their config and
  the run goes on; any failure other than OOM makes the script exit non-zero at the end.

Output: ``<out>/<device slug>/<op>.csv`` (long format, columns ``COLUMNS``; a run rewrites its
op's file, after every case, so a run stopped from outside keeps the cases it finished; with
``--merge`` it keeps the file's rows it does not measure again, e.g. a second run with other
``--providers``) and one PNG per op and ``plot_by`` group (time and memory vs x, one line per provider,
one column per mode).

With pytest-benchmark
---------------------
``pytest benchmarks/ --benchmark-only`` times the same declarations through pytest-benchmark's
``benchmark`` fixture (``benchmarks/test_timings.py``: one test per op, provider, mode and case,
``--fastnote-cases quick|all``, quick being ``quick_cases`` as for ``--quick``), for
``--benchmark-save`` / ``--benchmark-compare`` checks of a change. The CSVs stay the record.
On CUDA a round is GPU time read from CUDA events (``gpu_clock``), after an untimed
``flush_l2``; a ``cpu_real`` benchmark on the CPU uses pytest-benchmark's own timer; the others
only run on the CPU with ``--benchmark-disable`` (their smoke cases, once each).

Where things are
----------------
- ``spec.py``: ``Case``, ``Provider``, ``Benchmark`` (what a script declares), ``_Run`` (the
  settings of one run), ``MODES``, ``DTYPES``, ``QUANTILES``.
- ``environment.py``: device and CPU names, versions, git commit, fastnote backend, copy
  bandwidth, nominal peaks, ``ROOT`` / ``RESULTS``.
- ``modes.py``: gradient leaves and the callable each mode times.
- ``timing.py``: the measurement itself (``do_bench`` and the memory probe on a GPU, wall-clock
  calls and the interleaved providers on the CPU).
- ``runner.py``: ``run_benchmark``, the loop over cases, providers and modes.
- ``results.py``: the rows (time, memory, throughput, % of peak), printed lines, ``COLUMNS``
  and the CSV.
- ``plotting.py``: the PNGs.
- ``cli.py``: ``parser``, ``main`` and ``quick_cases``.
- ``clock.py``: ``gpu_clock`` (a pytest-benchmark timer of GPU time) and ``flush_l2``.
"""
from .cli import main, parser, quick_cases
from .clock import FLUSH_BYTES, flush_l2, gpu_clock, release_flush_buffers
from .environment import (COPY_BYTES, RESULTS, ROOT, copy_bandwidth_gbps, cpu_name, git_commit, nominal_peak,
                          slugify, triton_version)
from .modes import grad_leaves
from .plotting import plot
from .results import COLUMNS, write_csv
from .runner import run_benchmark
from .spec import DTYPES, MODES, QUANTILES, STEP, Benchmark, Case, Provider, _Run
from .timing import CPU_ROUND

__all__ = ["Benchmark", "Case", "Provider", "main", "parser", "run_benchmark", "write_csv", "plot",
           "grad_leaves", "slugify", "cpu_name", "git_commit", "triton_version", "copy_bandwidth_gbps",
           "nominal_peak", "MODES", "STEP", "DTYPES", "QUANTILES", "COLUMNS", "CPU_ROUND", "COPY_BYTES",
           "ROOT", "RESULTS", "_Run", "quick_cases", "gpu_clock", "flush_l2", "release_flush_buffers",
           "FLUSH_BYTES"]
