"""The backend switch, the NaN-poisoned allocator, input checks and the tolerance table."""
import pytest
import torch
import triton
import triton.language as tl

import fastnote
from fastnote import backend, cases, checks, testing


@pytest.fixture(autouse=True)
def _settings_restored():
    """The environment is read once (``backend.refresh()`` reads it again): after each test, and
    after monkeypatch has restored the environment, the settings follow it again."""
    yield
    backend.refresh()


def _setenv(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    backend.refresh()


def test_switch(monkeypatch):
    cpu = torch.device("cpu")
    _setenv(monkeypatch, "FASTNOTE_BACKEND", "reference")
    assert backend.use_triton(cpu) is False
    _setenv(monkeypatch, "FASTNOTE_BACKEND", "auto")
    _setenv(monkeypatch, "TRITON_INTERPRET", "1")
    assert backend.use_triton(cpu) is True
    _setenv(monkeypatch, "TRITON_INTERPRET", "0")
    assert backend.use_triton(cpu) is False
    _setenv(monkeypatch, "FASTNOTE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.use_triton(cpu)
    _setenv(monkeypatch, "FASTNOTE_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTNOTE_BACKEND"):
        backend.use_triton(cpu)


def test_environment_read_once(monkeypatch):
    cpu = torch.device("cpu")
    _setenv(monkeypatch, "FASTNOTE_BACKEND", "reference")
    monkeypatch.setenv("FASTNOTE_BACKEND", "auto")       # not read again until refresh()
    assert backend.use_triton(cpu) is False and backend.requested() == "reference"
    monkeypatch.setenv("FASTNOTE_POISON_ALLOC", "1")
    backend.refresh()
    monkeypatch.setenv("FASTNOTE_POISON_ALLOC", "0")
    assert torch.isnan(backend.empty((2,), torch.float32, cpu)).all()
    assert torch.isnan(backend.empty_like(torch.zeros(3))).all()
    assert backend.refresh() == backend.settings() and backend.settings().choice == "auto"


def test_use_triton_reads_no_environment(monkeypatch):
    import os

    backend.refresh()
    backend.use_triton(torch.device("cpu"))
    fastnote.tv_loss(torch.randn(1, 1, 4, 4))   # a first launch: Triton reads its own settings then, once
    reads = []
    real_get = type(os.environ).get
    monkeypatch.setattr(type(os.environ), "get", lambda self, *a: reads.append(a[0]) or real_get(self, *a))
    backend.use_triton(torch.device("cpu"))
    backend.empty((2,), torch.float32, torch.device("cpu"))
    fastnote.tv_loss(torch.randn(1, 1, 4, 4))
    assert reads == []


def test_reference_backend_bypasses_kernels(monkeypatch):
    calls = []
    from fastnote.ops import tv_loss as op_module

    real = op_module._tv_op
    monkeypatch.setattr(op_module, "_tv_op", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(1, 3, 5, 6)
    _setenv(monkeypatch, "FASTNOTE_BACKEND", "reference")
    fastnote.tv_loss(x)
    assert calls == []
    if backend.interpreter_on():
        _setenv(monkeypatch, "FASTNOTE_BACKEND", "auto")
        fastnote.tv_loss(x)
        assert len(calls) == 1


def _double_leaves(inputs):
    return {k: v.detach().double().requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def _tensor_outputs(out):
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


# the distributed losses' per-chunk custom ops, which their cases call through torch.ops: the public
# clip_loss and siglip_loss choose the backend (float64 included) before reaching them
_CUSTOM_OP_CASES = {"clip_row_loss", "siglip_chunk_loss"}


@pytest.mark.no_kernel
@pytest.mark.parametrize("op", [c.name for c in cases.all_cases() if c.name not in _CUSTOM_OP_CASES])
def test_float64_runs_the_reference(op, device, launches):
    """Every op's parity inputs in float64: no kernel launches, and the outputs and every
    gradient are float64 and agree with the case's plain-PyTorch reference in float64 (to
    float64 rounding: an fp32 path anywhere would be ~1e9 times further off)."""
    (case,) = cases.by_name([op])
    torch.manual_seed(0)
    inputs = case.inputs(torch.float32, device)
    ours_in, ref_in = _double_leaves(inputs), _double_leaves(inputs)
    launches.clear()
    ours = _tensor_outputs(case.ours(**ours_in))
    assert launches == []
    want = _tensor_outputs(case.reference(**ref_in))
    assert len(ours) == len(want)
    for got, expected in zip(ours, want):
        assert got.dtype == torch.float64 or not expected.is_floating_point()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    pairs = [(a, e) for a, e in zip(ours, want) if a.requires_grad]
    grads = [torch.randn(a.shape, dtype=torch.float64, device=device) for a, _ in pairs]
    torch.autograd.backward([a for a, _ in pairs], grads)
    torch.autograd.backward([e for _, e in pairs], grads)
    leaves = [k for k, v in ours_in.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    assert leaves or not pairs
    for k in leaves:
        assert ours_in[k].grad.dtype == torch.float64, k
        torch.testing.assert_close(ours_in[k].grad, ref_in[k].grad, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.no_kernel
def test_float64_gradcheck_and_autocast(device, launches):
    """gradcheck passes on a fastnote op in float64, and float64 inputs stay float64 under
    autocast, as torch's autocast leaves them (so they still take the reference)."""
    q, k, v = (torch.randn(2, 1, 9, 4, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: fastnote.window_attention(q, k, v), (q, k, v))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert fastnote.gram(x).dtype == torch.float64
        assert fastnote.sagan_attention(q[:, 0], k[:, 0], v[:, 0]).dtype == torch.float64
    assert launches == []


def test_poisoned_allocations(monkeypatch):
    _setenv(monkeypatch, "FASTNOTE_POISON_ALLOC", "1")
    assert torch.isnan(backend.empty((3, 4), torch.float16, torch.device("cpu"))).all()
    _setenv(monkeypatch, "FASTNOTE_POISON_ALLOC", "0")
    assert backend.empty((3, 4), torch.float32, torch.device("cpu")).shape == (3, 4)


def test_checks_messages():
    with pytest.raises(ValueError, match=r"q must have 4 dimensions, got shape \(2, 3\)"):
        checks.tensor("q", torch.zeros(2, 3), ndim=4)
    with pytest.raises(ValueError, match=r"bias must have shape \[3, \*\], got \[2, 2\]"):
        checks.shape("bias", torch.zeros(2, 2), [3, None])
    with pytest.raises(TypeError, match="one dtype"):
        checks.same_dtype(q=torch.zeros(1), k=torch.zeros(1, dtype=torch.float16))
    with pytest.raises(ValueError, match="nce_T must be > 0"):
        checks.positive("nce_T", 0.0)
    with pytest.raises(ValueError, match="nce_T must be > 0"):
        checks.positive("nce_T", float("nan"))


def test_tolerance_table():
    assert testing.tolerance(torch.float32, "elementwise") == (1e-5, 1e-5)
    assert testing.tolerance(torch.float32, "two_matmul") == (2e-4, 2e-4)
    assert testing.tolerance(torch.float16, "two_matmul") == (3e-2, 3e-2)
    assert testing.tolerance(torch.bfloat16, "reduction") == (2e-2, 2e-2)
    with pytest.raises(AssertionError):
        testing.assert_close(torch.tensor([1.0 + 1e-3]), torch.tensor([1.0]), "elementwise")
    testing.assert_close(torch.tensor([1.0 + 1e-6]), torch.tensor([1.0]), "elementwise")


def test_kernel_scratch_buffers_are_poisoned(device, monkeypatch):
    # Scratch buffers a kernel must fill whole (SE's excitation vectors, window attention's
    # per-program bias-gradient partials) come from backend.empty like the outputs (the op layer
    # allocates every buffer), so under the tests' NaN poisoning a part the kernel leaves
    # unwritten shows as NaN.
    import fastnote
    from fastnote import backend

    made = []
    real = backend.empty

    def recording(shape, dtype, device):
        made.append((tuple(shape), dtype))
        return real(shape, dtype, device)

    monkeypatch.setattr(backend, "empty", recording)
    x = torch.randn(2, 16, 5, 5, device=device, requires_grad=True)
    w1, b1, w2, b2 = (torch.randn(*s, device=device, requires_grad=True) for s in ((8, 16), (8,), (16, 8), (16,)))
    fastnote.squeeze_excitation(x, w1, b1, w2, b2).sum().backward()
    # the MLP's backward vectors, two [B, Cr] and two [B, C] in one buffer each
    assert {((2, 2, 8), torch.float32), ((2, 2, 16), torch.float32)} <= set(made)
    made.clear()
    q, k, v = (torch.randn(4, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 9, 9, device=device, requires_grad=True)
    fastnote.window_attention(q, k, v, bias=bias).sum().backward()
    assert any(len(shape) == 4 and shape[1:] == (2, 9, 9) for shape, _ in made), made


def test_bf16_conversion_rounds_to_nearest_even():
    # A kernel's fp32 -> bf16 conversion as the GPU does it (cvt.rn.bf16.f32) and torch does it:
    # round to nearest, ties to even. Triton's interpreter truncates unless fastnote's kernel
    # modules have made it round (triton_kernels/utils.py's interpreter_round_bf16_to_nearest); on a GPU
    # this checks the hardware's conversion.
    import fastnote.triton_kernels.utils  # noqa: F401  (what every kernel module imports)

    @triton.jit
    def to_bf16(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.bfloat16), mask=offs < n)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not backend.interpreter_on():
        pytest.skip("no GPU and the interpreter is off: no kernel can run")
    g = torch.Generator().manual_seed(0)
    ties = (torch.arange(1 << 12, dtype=torch.int32) * 0x8000 + 0x3F808000).view(torch.float32)   # exact halves
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895314e38, -3.3895314e38, 1e-40, -1e-45])
    x = torch.cat([torch.randn(1 << 14, generator=g), torch.randn(1 << 10, generator=g) * 1e-39, ties, specials])
    x = x.to(device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    to_bf16[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    nan = torch.full((4,), float("nan"), device=device)
    out = torch.empty(4, dtype=torch.bfloat16, device=device)
    to_bf16[(1,)](nan, out, 4, BLOCK=16)
    assert torch.isnan(out.float()).all()



@triton.jit
def _scaled(x, s):
    return x * s


@triton.jit
def _rows_softmax(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """Row softmax of 6 x, calling a helper of its own and Triton's tl.zeros, tl.max and tl.sum
    (each a @triton.jit helper too) in a loop."""
    cols = tl.arange(0, BLOCK)
    offs = tl.program_id(0) * n + cols
    x = tl.load(x_ptr + offs, mask=cols < n, other=float("-inf"))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(3):
        acc += _scaled(x, i + 1.0)
    e = tl.exp(acc - tl.max(acc, axis=0))
    tl.store(y_ptr + offs, e / tl.sum(e, axis=0), mask=cols < n)


def test_interpreter_patches_the_language_once_per_launch(monkeypatch):
    # Triton's interpreter patches triton.language at each launch and again at every call of a
    # @triton.jit helper; fastnote's kernel modules make the helpers skip that (a third of the
    # interpreter's time in a Swin-T step). Same results bit for bit, one patching per launch,
    # and the language modules as they were once the launch is over.
    from triton.runtime import interpreter

    from fastnote.triton_kernels import utils

    if not backend.interpreter_on():
        pytest.skip("the interpreter is off: compiled kernels patch nothing")
    assert utils.interpreter_patch_language_once_per_launch()
    kernel = _rows_softmax
    calls = []
    real = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: calls.append(fn.__name__) or real(fn))
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))

    def run():
        calls.clear()
        y = torch.empty_like(x)
        kernel[(4,)](x, y, x.shape[1], BLOCK=128)     # a row a program
        return y, list(calls)

    y, patched = run()
    assert patched == ["_rows_softmax"], patched                # the launch's own, the helpers' none
    assert all(tl.core.is_builtin(f) for f in (tl.full, tl.core.full, tl.tensor.__add__, tl.math.exp))
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", interpreter.GridExecutor.__call__.original)
    monkeypatch.setattr(interpreter.InterpretedFunction, "__call__", interpreter.InterpretedFunction.__call__.original)
    y_triton, unpatched = run()
    assert len(unpatched) == 1 + 4 * 6, unpatched                 # per program: 3 x _scaled, zeros, max, sum
    assert torch.equal(y, y_triton)
    torch.testing.assert_close(y, torch.softmax(6 * x, dim=1))


@triton.jit
def _index_math(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """int32 index arithmetic that overflows (wraps) for the large factors below, then a float op."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0)
    wrapped = x * 65537 + offs * 40503 - 7
    tl.store(y_ptr + offs, wrapped, mask=offs < n)


def test_interpreter_overflow_checks_it_discards_are_not_computed(monkeypatch):
    # Triton's front end wraps each int32 +, -, * in an overflow check that device_assert drops
    # unless `debug` is on, which the interpreter's options never are: fastnote's kernel modules
    # turn the option off (a quarter of a Swin-T step). Premise and result: with Triton's own
    # option, an overflowing kernel raises nothing either, and both give the same (wrapped) bits.
    import dataclasses

    from triton.runtime import interpreter

    from fastnote.triton_kernels import utils

    if not backend.interpreter_on():
        pytest.skip("the interpreter is off: compiled kernels are not touched")
    assert utils.interpreter_skip_discarded_overflow_checks()
    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow
    x = torch.randint(-2**31, 2**31 - 1, (3000,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))

    def run():
        y = torch.empty_like(x)
        _index_math[(3,)](x, y, x.numel(), BLOCK=1024)
        return y

    ours = run()
    monkeypatch.setattr(interpreter.interpreter_builder, "options",
                        dataclasses.replace(options, sanitize_overflow=True))
    theirs = run()
    offs = torch.arange(x.numel(), dtype=torch.int64)
    want = ((x.long() * 65537 + offs * 40503 - 7 + 2**31) % 2**32 - 2**31).int()   # two's complement wrap
    assert torch.equal(ours, theirs) and torch.equal(ours, want)
    assert (x.long() * 65537).abs().max() > 2**31        # it did overflow


def test_interpreter_numpy_dtype_table_is_tritons():
    # fastnote's kernel modules give the interpreter a dtype table built once (Triton's rebuilds
    # it on every call): the same answer as Triton's own function for every type it takes
    from triton.runtime import interpreter

    from fastnote.triton_kernels import utils

    assert utils.interpreter_cache_numpy_dtypes()
    ours, theirs = interpreter._get_np_dtype, interpreter._get_np_dtype.original
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.uint16, tl.int32, tl.uint32, tl.int64, tl.uint64,
               tl.float16, tl.bfloat16, tl.float32, tl.float64, tl.float8e5, tl.float8e5b16, tl.float8e4nv,
               tl.float8e4b8, tl.float8e4b15]
    types = scalars + [tl.pointer_type(t) for t in scalars] + [tl.block_type(t, [4, 2]) for t in scalars] \
        + [tl.block_type(tl.pointer_type(t), [8]) for t in scalars]
    for t in types + types:     # twice: the second from the table
        assert ours(t) == theirs(t), t
    with pytest.raises(KeyError):
        theirs(tl.void)
    with pytest.raises(KeyError):
        ours(tl.void)
