"""Launch helpers shared by the kernels."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def interpreter_round_bf16_to_nearest() -> bool:
    """Make Triton's interpreter convert fp32 to bf16 as the GPU does: round to nearest, ties to
    even (``cvt.rn.bf16.f32``, and torch's ``.to(torch.bfloat16)``). Triton 3.6 to 3.9's
    interpreter truncates instead (``InterpreterBuilder.cast_impl`` drops the low 16 bits: round
    toward zero), so every bf16 value a kernel writes under the interpreter is biased toward zero
    by half a unit of roundoff on average, and a gradient that sums many such values with
    cancellation (Swin V2's per-head ``logit_scale``) comes out several times further from fp32
    than it does on a GPU. Called when this module is imported (every kernel module imports it);
    it changes that one conversion of the interpreter, for every kernel it runs, and nothing a
    compiled kernel does. Idempotent; False where Triton's interpreter has no such method."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or not hasattr(interpreter, "TensorHandle"):
        return False
    if getattr(original, "_fastnote_round_to_nearest", False):
        return True

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = np.asarray(src.data, dtype=np.float32)
            bits = x.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
            return interpreter.TensorHandle(np.where(np.isnan(x), quiet_nan, rounded), tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._fastnote_round_to_nearest = True
    builder.cast_impl = cast_impl
    return True


interpreter_round_bf16_to_nearest()


def interpreter_patch_language_once_per_launch() -> bool:
    """Make Triton's interpreter patch ``triton.language`` once per kernel launch instead of once
    per call of a ``@triton.jit`` helper as well. Triton 3.6 to 3.9's interpreter swaps every
    builtin of ``tl``, ``tl.tensor`` and ``tl.math`` for an interpreted one when a launch starts
    (``GridExecutor.__call__``, undone when it ends), and again at every device-function call
    (``InterpretedFunction.__call__``: ours, and Triton's own ``tl.zeros``, ``tl.sum``,
    ``tl.max``, which see ``tl.core``), scanning those modules with ``inspect.getmembers`` each
    time. Inside a launch that scan finds nothing left to swap, yet a kernel that calls helpers
    in its loops pays it thousands of times. Here each launch swaps the builtins of both
    ``tl`` and ``tl.core`` once, through Triton's own ``_patch_lang``, and undoes both when it
    ends; the helpers it calls then run without patching anything. (Triton never undid a
    helper's ``tl.core`` swap; now it lasts as long as the launch.) Nothing a kernel computes
    changes, and compiled kernels are untouched. Called when this module is imported;
    idempotent; False where the interpreter's structure differs."""
    try:
        import threading
        import types

        from triton.runtime import interpreter
    except ImportError:
        return False
    grid_cls = getattr(interpreter, "GridExecutor", None)
    fn_cls = getattr(interpreter, "InterpretedFunction", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if grid_cls is None or fn_cls is None or patch_lang is None or not hasattr(fn_cls, "rewrite") \
            or not hasattr(interpreter, "InterpreterError"):
        return False
    if hasattr(fn_cls.__call__, "original"):      # already made
        return True
    launch_call, helper_call = grid_cls.__call__, fn_cls.__call__
    # _patch_lang patches the language modules a function's globals hold: this one holds both.
    sees_both = types.FunctionType((lambda: None).__code__, {"tl": tl, "core": tl.core})
    running = threading.local()      # .depth: launches running on this thread

    def run_launch(self, *args, **kwargs):
        scope = patch_lang(sees_both)
        running.depth = getattr(running, "depth", 0) + 1
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            running.depth -= 1
            scope.restore()

    def call_helper(self, *args, **kwargs):
        if not getattr(running, "depth", 0):
            return helper_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    run_launch.original, call_helper.original = launch_call, helper_call     # Triton's own (the test compares)
    grid_cls.__call__ = run_launch
    fn_cls.__call__ = call_helper
    return True


interpreter_patch_language_once_per_launch()


def interpreter_skip_discarded_overflow_checks() -> bool:
    """Stop Triton's interpreter from computing integer-overflow checks that it then discards.
    Triton 3.6 to 3.9's front end wraps every 32-bit integer ``+``, ``-`` and ``*`` of a kernel
    (its index arithmetic) in a check while the builder's ``sanitize_overflow`` option is on, as
    it is by default: both operands cast to int64, the operation again, two comparisons, then
    ``device_assert``, which emits nothing unless ``debug`` is on. The interpreter's options have
    ``debug`` off (``TRITON_DEBUG`` does not reach them), so every check is computed and thrown
    away: a quarter of a Swin-T step under the interpreter. Compiled kernels drop the checks the
    same way unless built with ``debug``. Turning the option off skips only that computation; a
    kernel's results are unchanged, and with ``debug`` on the checks stay. Called when this module
    is imported; idempotent; False where the interpreter has no such option."""
    import dataclasses

    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not (dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow")
            and hasattr(options, "debug")) or options.debug:
        return False
    if options.sanitize_overflow:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True


def interpreter_cache_numpy_dtypes() -> bool:
    """Make Triton's interpreter look up the numpy dtype of a Triton type in a table built once.
    Triton 3.6 to 3.9's ``_get_np_dtype`` builds a dict of every Triton dtype (hashing each) on
    each of its calls, which come once or more per operation of every program: 10% of a Swin-T
    step under the interpreter. The table here holds what Triton's own function returns for each
    scalar type, by name (pointers, and blocks of them, are uint64 addresses, as there). Called
    when this module is imported; idempotent; False where the interpreter has no such function."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None:
        return False
    if hasattr(original, "original"):     # already made
        return True
    address = original(tl.pointer_type(tl.float32))
    by_name = {}

    def get_np_dtype(tt_dtype):
        if isinstance(tt_dtype, tl.block_type):
            tt_dtype = tt_dtype.element_ty
        if isinstance(tt_dtype, tl.pointer_type):
            return address
        found = by_name.get(tt_dtype.name)
        if found is None:
            found = by_name[tt_dtype.name] = original(tt_dtype)
        return found

    get_np_dtype.original = original      # Triton's own (the test compares)
    interpreter._get_np_dtype = get_np_dtype
    return True


interpreter_skip_discarded_overflow_checks()
interpreter_cache_numpy_dtypes()

# One program per BLOCK elements for streaming kernels. Large enough that the interpreter (which
# runs programs one after another) stays fast, and that each GPU program moves >= 16 KB.
ELEMENTWISE_BLOCK = 4096
ELEMENTWISE_WARPS = 8

# log2(e): softmax and logsigmoid kernels work in base-2 units (exp2/log2). A global the kernels
# read must be a tl.constexpr instance; the launchers use the plain float.
LOG2E_F = 1.4426950408889634
LOG2E = tl.constexpr(LOG2E_F)
LN2 = tl.constexpr(0.6931471805599453)
# tl.dot needs every tile dimension >= 16: smaller sizes are padded by masked loads.
MIN_DOT = 16


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Plain Python on purpose, as ``cdiv``."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers. Plain Python: ``triton.cdiv`` and ``triton.next_power_of_2``
    are wrapped as constexpr functions (Triton 3.6 to 3.9) and cost ~3 us a call on the host,
    against ~0.1 us here, with up to 20 calls per op call."""
    return -(-a // b)


# What ``torch.backends.cuda.matmul.fp32_precision`` reads (through a Python ``__getattr__``: ~0.9 us
# a read against ~0.2 us direct, paid on every fp32 launch); None on torch releases without it.
_matmul_precision = getattr(torch._C, "_get_fp32_precision_getter", None)


def fp32_matmul_allows_tf32() -> bool:
    """Whether torch lets fp32 matmuls use TF32, read through whichever API the user set.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" or "tf32"; it also
    reflects the legacy settings and the global ``torch.backends.fp32_precision``). Once a user
    sets the new API, reading the legacy ``get_float32_matmul_precision()`` / ``allow_tf32``
    raises "mix of the legacy and new APIs", so the new one is read first; the legacy pair is the
    fallback for torch releases without it."""
    if _matmul_precision is not None:
        return _matmul_precision("cuda", "matmul") == "tf32"
    new = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if new is not None:
        return new == "tf32"
    return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)


def tf32_key(dtype: torch.dtype) -> bool:
    """The fp32 setting's part of a cached launch plan's key: whether fp32 dots may use TF32
    (False for fp16/bf16, which it does not concern)."""
    return dtype is torch.float32 and fp32_matmul_allows_tf32()


class PlanCache(dict):
    """Launch plans per key (shapes, strides, dtype, device, settings) for launchers whose host time
    is paid on every call: ``get`` is a plain dict lookup; ``put`` stores a plan made after a miss
    (a plan that raised is never stored) and clears the cache when it holds ``size`` of them, so
    shapes that keep changing do not grow it without bound."""

    def __init__(self, size: int = 1024) -> None:
        super().__init__()
        self.size = size

    def put(self, key, plan):
        if len(self) >= self.size:
            self.clear()
        self[key] = plan
        return plan


def dot_precision() -> str:
    """``input_precision`` for ``tl.dot`` on fp32 inputs, from torch's own setting: TF32 only when
    the user allowed it (``fp32_precision = "tf32"``, ``set_float32_matmul_precision('high')``,
    ``allow_tf32 = True``), else exact IEEE fp32 as the interpreter computes."""
    return "tf32" if fp32_matmul_allows_tf32() else "ieee"


# Whether the kernels below are interpreted: triton.jit decides that when a kernel module is
# imported, from TRITON_INTERPRET as it is then, so it is read once, here, beside them.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


CPU = torch.device("cpu")


def _interpreting(device: torch.device) -> bool:
    # Keyed on the interpreter itself, not only on CPU tensors, so that compiling launches
    # captured from CPU tensors (tests/aot_compile.py) builds the kernels a GPU runs.
    # (a CPU tensor's device equals torch.device("cpu"): that comparison spares reading
    # device.type, which builds a string, ~0.25 us, on every launch)
    return INTERPRETED and (device == CPU or device.type == "cpu")


def compiled_precision(precision: str, interpreting: bool) -> str:
    """The ``input_precision`` a kernel is built with for torch's fp32 setting ``precision``.

    "ieee" is honoured with "tf32x3" on a GPU: each operand split into a TF32 high part and a TF32
    remainder, three tensor-core products (the remainders' product dropped), fp32 accumulation,
    so each product carries ~2^-21 relative error against fp32's 2^-24, while Triton's "ieee" dot
    runs on the FMA units: CLIP's fp32 loss took 344 ms against eager's 7.05 on an H200, SAGAN's
    fp32 forward 20.7 ms against 7.97. The interpreter computes every request exactly, so
    there it stays "ieee"."""
    if precision == "ieee" and not interpreting:
        return "tf32x3"
    return precision


def dot_switches(dtype: torch.dtype, device: torch.device) -> dict:
    """The constexpr switches of ``dot`` for operands of ``dtype`` on ``device`` (one dict per
    combination, shared: callers pass it on as keyword arguments and never change it)."""
    return switches_for_key(*dot_key(dtype, device))


def dot_key(dtype: torch.dtype, device: torch.device) -> tuple:
    """What ``dot_switches`` depends on, hashable: for launchers that cache a whole launch
    configuration per shape and setting."""
    return dtype, _interpreting(device), fp32_matmul_allows_tf32() if dtype == torch.float32 else False


@functools.lru_cache(maxsize=None)
def switches_for_key(dtype: torch.dtype, interpreting: bool, tf32: bool) -> dict:
    """``dot_switches`` from its ``dot_key`` (for launchers that cache per key)."""
    return {
        # input_precision only means something for fp32 operands; half ones take the default.
        "PRECISION": compiled_precision("tf32" if tf32 else "ieee", interpreting) if dtype == torch.float32 else None,
        # Only the interpreter needs it: compiled kernels use native bf16 dots.
        "UPCAST": dtype == torch.bfloat16 and interpreting,
    }


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with the switches of ``dot_switches``. UPCAST: the Triton interpreter multiplies
    bf16 tiles as their raw bits (it is exact for fp32 and fp16), so under it bf16 operands go
    through fp32, which gives the products the GPU's bf16 tensor cores give; compiled kernels
    always use the native dot."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


# torch's results are the contract of the hard activations (tests compare them bit for bit), and
# torch's CUDA kernels divide with IEEE rounding: fp32 ``/`` in Triton lowers to an approximate
# division on a GPU (div.full.f32, up to 2 ulp), so these use the correctly rounded div_rn. The
# interpreter divides exactly either way, so the build check (tests/aot_compile.py) is what
# verifies the compiled kernels contain no approximate division.


@triton.jit
def hard_swish_f32(x):
    # Same operation order as torch's kernel: x * min(max(x + 3, 0), 6) / 6.
    return tl.math.div_rn(x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0), 6.0)


@triton.jit
def hard_swish_grad_f32(x):
    # torch's hardswish_backward: 0 for x <= -3, x/3 + 1/2 for -3 < x < 3, 1 for x >= 3.
    return tl.where(x <= -3.0, 0.0, tl.where(x < 3.0, tl.math.div_rn(x, 3.0) + 0.5, 1.0))


@triton.jit
def hard_sigmoid_f32(x):
    return tl.math.div_rn(tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0), 6.0)


@triton.jit
def hard_sigmoid_grad_f32(x):
    # torch's hardsigmoid_backward: 1/6 strictly inside (-3, 3), else 0.
    return tl.where((x > -3.0) & (x < 3.0), 1.0 / 6.0, 0.0)


@triton.jit
def sigmoid_f32(x):
    return 1.0 / (1.0 + tl.exp(-x))


# ------------------------------------------------------------------------------------------------
# Launching
# ------------------------------------------------------------------------------------------------
# ``kernel[grid](*args)`` goes through ``JITFunction.run``: per launch it reads Triton's knobs,
# asks the driver for the device and stream, binds and specialises the arguments, renders a
# cache key (``str`` of the options dict), looks the kernel up, checks the kernel's globals,
# builds launch metadata and only then calls the compiled kernel's C launcher. ``launch`` keeps
# the one step that decides which binary runs (the JIT's own binder, so the specialisation is
# Triton's, exactly) and remembers the binary per (kernel, device, specialisation, options); a
# repeat launch then goes straight to the binary's launcher with the arguments Triton would pass
# it. The first launch of each specialisation, and any launch while a launch hook (a profiler) or
# a pre-run hook is set, takes Triton's own path. Measured with Triton's driver faked (no GPU,
# ``python tests/launch_probe.py --time``, 2-core CPU), per launch of h-swish's kernel: 5.9 us
# through ``JITFunction.run`` on Triton 3.6 and 6.2 on 3.9, against 3.4 and 3.3 here; the C
# launcher and ``cuLaunchKernelEx`` come on top of both.
#
# It leans on JITFunction internals that are identical in Triton 3.5.1 through 3.9.0 (the
# ``device_caches`` entry ``(kernel_cache, key_cache, target, backend, binder)`` and the launcher
# call ``run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
# exit_hook, *bound_args)``); on any other version ``launch`` is ``kernel[grid](*args)``.
# What it does not redo per launch: Triton's check that a global the kernel read has not
# changed since it was compiled (the kernels read only constants), and re-reading
# TRITON_DEBUG-style knobs (a kernel compiled under one setting keeps running under it).
DIRECT_LAUNCH_TRITON = ((3, 5), (3, 10))    # [from, to) of Triton versions checked


def _triton_version() -> tuple:
    parts = []
    for part in triton.__version__.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def direct_launch_supported() -> bool:
    """Whether this process can launch compiled kernels directly: real kernels (no interpreter),
    a CUDA device, and a Triton version whose launch internals ``launch`` mirrors."""
    low, high = DIRECT_LAUNCH_TRITON
    return not INTERPRETED and torch.cuda.is_available() and low <= _triton_version() < high


# Called as ``observer(kernel, grid)`` before every launch, direct or not (the test suite counts
# launches this way: the direct path never reaches Triton's ``kernel[grid]``).
LAUNCH_OBSERVERS: list = []


class _DirectLaunch:
    on = False
    compiled: dict = {}        # (kernel, device, specialisation, options) -> CompiledKernel
    device = None              # the driver's get_current_device / get_current_stream
    stream = None
    knobs = None


def set_direct_launch(enabled=None, *, force: bool = False) -> bool:
    """Turn the direct launch path on or off; returns whether it is on.

    ``enabled=None`` restores the default: on where ``direct_launch_supported()``, unless the
    environment sets ``FASTNOTE_DIRECT_LAUNCH=0`` (read here, once, not per launch). ``force``
    skips the support check (tests that fake Triton's driver). Always forgets the binaries
    remembered so far."""
    if enabled is None:
        enabled = os.environ.get("FASTNOTE_DIRECT_LAUNCH", "1") != "0"
    enabled = bool(enabled) and (force or direct_launch_supported())
    _DirectLaunch.compiled = {}
    _DirectLaunch.on = enabled
    # Triton's driver is bound at the first direct launch, not here: importing fastnote should not
    # start Triton's CUDA driver (it builds and loads a helper module the first time).
    _DirectLaunch.device = _bind_driver
    return enabled


def _bind_driver():
    from triton import knobs
    from triton.runtime import driver

    _DirectLaunch.device = driver.active.get_current_device
    _DirectLaunch.stream = driver.active.get_current_stream
    _DirectLaunch.knobs = knobs.runtime
    return _DirectLaunch.device()


@contextlib.contextmanager
def tritons_launch_path():
    """Inside, every ``launch`` takes Triton's own path; the binaries remembered stay (benchmarks
    time the two paths turn by turn)."""
    on = _DirectLaunch.on
    _DirectLaunch.on = False
    try:
        yield
    finally:
        _DirectLaunch.on = on


def _hooked(hook) -> bool:
    # Triton 3.6+ holds the launch hooks in HookChain objects, empty unless a profiler added one;
    # the knob may also be set to a plain callable (or None).
    return bool(getattr(hook, "calls", hook))


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the direct path where it is on (see above).
    ``grid`` is a tuple of one to three ints."""
    if LAUNCH_OBSERVERS:
        for observer in LAUNCH_OBSERVERS:
            observer(kernel, grid)
    state = _DirectLaunch
    if not state.on:
        kernel[grid](*args, **kwargs)
        return
    caches = getattr(kernel, "device_caches", None)    # None: not a JITFunction (a test's stand-in)
    if caches is None:
        kernel[grid](*args, **kwargs)
        return
    device = state.device()
    bound, specialisation, options = caches[device][4](*args, **kwargs)
    key = (kernel, device, tuple(specialisation), tuple(options.items()))
    runtime = state.knobs
    try:
        compiled = state.compiled.get(key)
    except TypeError:   # an unhashable constexpr value: no memo, Triton's path every time
        kernel[grid](*args, **kwargs)
        return
    if (compiled is None or kernel.pre_run_hooks or _hooked(runtime.launch_enter_hook)
            or _hooked(runtime.launch_exit_hook)):
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None and hasattr(compiled, "packed_metadata") and not kernel.pre_run_hooks:
            state.compiled[key] = compiled
        return
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, state.stream(device),
                 compiled.function, compiled.packed_metadata, None, None, None, *bound.values())


set_direct_launch()
