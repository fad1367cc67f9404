"""Parity tolerances (docs/design.md section 3.1) and a comparison helper used by the tests and the
parity report; ``load_example`` for the tests and benchmarks that run the example programs.

kind: ``elementwise`` (activations, gates), ``reduction`` (sums, means, single matmuls),
``two_matmul`` (ops that chain two matmuls: attention). The reference runs in fp32 on the same
inputs; bf16 gets twice the fp16 figures.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Dict, Iterator, Optional

import torch

_FP32 = {"elementwise": 1e-5, "reduction": 2e-4, "two_matmul": 2e-4}
_FP16 = {"elementwise": 1e-2, "reduction": 1e-2, "two_matmul": 3e-2}


def tolerance(dtype: torch.dtype, kind: str) -> tuple[float, float]:
    """(atol, rtol) for outputs of ``dtype`` compared with the fp32 reference."""
    if kind not in _FP32:
        raise ValueError(f"kind must be one of {tuple(_FP32)}, got {kind!r}")
    if dtype in (torch.float32, torch.float64):
        tol = _FP32[kind]
    elif dtype == torch.float16:
        tol = _FP16[kind]
    elif dtype == torch.bfloat16:
        tol = 2 * _FP16[kind]
    else:
        raise ValueError(f"no tolerance for dtype {dtype}")
    return tol, tol


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, dtype=None, msg: str = "") -> None:
    """Compare ``actual`` (any dtype) with the fp32 ``expected`` at the table's tolerance for
    ``dtype`` (default: ``actual.dtype``)."""
    atol, rtol = tolerance(dtype or actual.dtype, kind)
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


# Unit roundoff of each dtype (half the gap between 1 and the next number).
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def rms_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``rms(actual - expected) / rms(expected)`` in float64 (0 for empty or all-zero tensors
    compared with themselves). Unlike a max-abs test scaled by the largest entry, it is one
    number per tensor that neither the tensor's scale nor one large entry can loosen."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.numel() == 0:
        return 0.0
    num = (a - e).square().mean().sqrt().item()
    den = e.square().mean().sqrt().item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def assert_rms_close(actual: torch.Tensor, expected: torch.Tensor, bound: float, msg: str = "") -> None:
    err = rms_relative_error(actual, expected)
    assert err <= bound, f"{msg + ': ' if msg else ''}RMS-relative error {err:.3g} > {bound:.3g}"


def assert_autocast_like_eager(eager: torch.nn.Module, patched: torch.nn.Module, run, dtype: torch.dtype,
                               names, factor: float = 4.0, inputs=None) -> None:
    """A patched model under autocast against the library's own model under the same autocast.
    ``run(model)`` returns a list of tensors (outputs and gradients, None for an unused one) named
    by ``names``; the truth is the eager model without autocast (fp32), and the rule is
    ``assert_errors_like_eager``'s. Each run gets a fresh copy of the eager model, so state a
    forward updates (batch norm, spectral norm) starts alike; ``patched`` runs once per input.
    Each of ours must also have eager's dtype under the autocast.
    With ``inputs`` (a list), ``run(model, input)`` runs on each and the rule applies to the
    medians over them (``assert_median_errors_like_eager``)."""
    import copy

    device_type = next(eager.parameters()).device.type
    names = list(names)
    runs = []
    for args in ([()] if inputs is None else [(each,) for each in inputs]):
        truth = run(copy.deepcopy(eager), *args)
        with torch.autocast(device_type, dtype=dtype):
            theirs = run(copy.deepcopy(eager), *args)
            ours = run(patched, *args)
        assert len(names) == len(truth) == len(theirs) == len(ours), (len(names), len(truth), len(theirs), len(ours))
        rows = []
        for name, t, e, o in zip(names, truth, theirs, ours):
            if t is None:
                assert e is None and o is None, name
            else:
                # a drop-in keeps eager's dtypes under autocast too (outputs and gradients)
                assert o.dtype == e.dtype, f"{name}: {o.dtype} under autocast, where eager's is {e.dtype}"
                rows.append((name, t, e, o))
        runs.append(rows)
    assert_median_errors_like_eager(runs, dtype, factor, f"under autocast {dtype}")


def assert_errors_like_eager(rows, dtype: torch.dtype, factor: float = 4.0, what: str = "") -> None:
    """``rows``: (name, truth, eager's, ours) tensors, where eager's and ours computed in ``dtype``
    (autocast) and the truth in fp32. For each, our RMS-relative error against the truth must stay
    within ``factor`` x eager's own error, that error taken no smaller than the median over all
    the rows, plus two units of ``dtype``'s roundoff. The median: a gradient that is a sum with
    much cancellation (a per-head ``logit_scale``: two numbers) has an error that varies 10x from
    one input to the next for eager and fastnote alike, so eager's error on one tensor can be
    luckily small. ``assert_median_errors_like_eager`` applies the same rule over several inputs."""
    assert_median_errors_like_eager([rows], dtype, factor, what)


def assert_median_errors_like_eager(runs, dtype: torch.dtype, factor: float = 4.0, what: str = "") -> None:
    """``runs``: one list of ``assert_errors_like_eager``'s rows per input, the same names in each.
    Per name, our error and eager's are the medians over the inputs, then that rule applies. For
    gradients whose error swings several-fold from one input to the next on either side (Swin V2's
    per-head ``logit_scale``), the medians compare the two computations rather than two draws."""
    import statistics

    floor = 2 * UNIT_ROUNDOFF[dtype]
    per_name = {}
    for rows in runs:
        for name, t, e, o in rows:
            assert torch.isfinite(o).all(), f"{name}: not finite {what}"
            per_name.setdefault(name, []).append(
                (rms_relative_error(o.float(), t.float()), rms_relative_error(e.float(), t.float())))
    assert per_name, "nothing compared"
    assert all(len(v) == len(runs) for v in per_name.values()), "every input must give the same names"
    errors = [(name, statistics.median(own for own, _ in v), statistics.median(base for _, base in v))
              for name, v in per_name.items()]
    typical = statistics.median(base for _, _, base in errors)
    over = f" (medians over {len(runs)} inputs)" if len(runs) > 1 else ""
    for name, own, base in errors:
        assert own <= factor * max(base, typical) + floor, (
            f"{name}: fastnote {what} off fp32 by {own:.3g}, eager by {base:.3g} (median over the tensors "
            f"{typical:.3g}){over}")


@contextlib.contextmanager
def environ(values: Dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` while inside, then each variable as it was (unset
    again where it was unset). For settings child processes inherit, or that fastnote reads once
    (call ``fastnote.backend.refresh()`` inside and after)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str) -> ModuleType:
    """The example program ``examples/<name>.py`` as the module ``name``, loaded once (later calls
    return the same module). It is registered in ``sys.modules`` under that name before it runs:
    its dataclasses look their module up there. The examples are programs in fastnote's source
    tree, not part of the package; each one puts its own folder on ``sys.path`` for ``_common``."""
    path = os.path.join(EXAMPLES, f"{name}.py")
    module = sys.modules.get(name)
    if module is not None and os.path.abspath(getattr(module, "__file__", None) or "") == path:
        return module
    if not os.path.isfile(path):
        raise ModuleNotFoundError(f"no example {name!r}: {path} does not exist (the examples are in the source tree)",
                                  name=name)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _gloo_rank(rank: int, body, world_size: int, store_path: str, errors, kernel_module) -> None:
    import torch.distributed as dist
    from triton.runtime.jit import JITFunction

    try:
        if kernel_module is not None:
            # TRITON_INTERPRET came with the environment (the parent started this process with it):
            # set here it would be too late, fastnote and triton being imported before this runs
            assert os.environ.get("TRITON_INTERPRET") == "1", "TRITON_INTERPRET=1 was not inherited"
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        body(rank, world_size)
        if kernel_module is not None:
            kernels = importlib.import_module(kernel_module)
            compiled = [n for n, k in vars(kernels).items() if isinstance(k, JITFunction)]
            assert not compiled, f"compiled (not interpreted) kernels on CPU tensors: {compiled}"
        dist.destroy_process_group()
    except Exception as e:  # reported to the parent
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    errors.put(f"rank {rank}: ok")
    # Leave without running C++ static destructors: gloo's teardown at interpreter exit sometimes
    # aborts after all the work is done and checked; the parent checks every rank's report.
    os._exit(0)


def run_gloo_ranks(body, world_size: int, store_path, kernel_module: Optional[str] = None) -> list:
    """``body(rank, world_size)`` in ``world_size`` spawned CPU processes joined in a gloo group
    (a file rendezvous at ``store_path``: no port to race for). With ``kernel_module``, each rank
    checks afterwards that its Triton kernels ran interpreted (start it inside the tests'
    ``interpreted_children``). ``body`` must be picklable (a module-level function, or a
    ``functools.partial`` of one). Returns the ranks' reports, sorted: ``["rank 0: ok", ...]``
    when every rank finished."""
    import torch.multiprocessing as mp

    errors = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_gloo_rank, args=(body, world_size, str(store_path), errors, kernel_module), nprocs=world_size,
             join=True)
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    return sorted(reports)
