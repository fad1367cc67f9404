"""Which backward passes are deterministic, and torch.use_deterministic_algorithms honoured.

Every fastnote op gives bitwise-identical gradients from run to run by default (fixed summation
orders, no float atomics shared between programs), except window attention's shared dbias slots
(large windows with few of them per head), which ``torch.use_deterministic_algorithms(True)``
turns off. The interpreter runs programs one after another, so run-to-run equality can only be
shown on a GPU; what the CPU can check is that the deterministic mode picks the atomic-free path.
"""
import pytest
import torch

import fastnote
from fastnote import cases
from fastnote.triton_kernels import window_attention as wa_kernels


class _Spy:
    """Stands in for a Triton kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []
        self.fn = kernel.fn     # what the suite's launch records name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _window_backward(device):
    q, k, v = (torch.randn(6, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 9, 9, device=device, requires_grad=True)
    fastnote.window_attention(q, k, v, bias=bias).square().sum().backward()


def test_shared_dbias_slots_by_default(device, monkeypatch):
    monkeypatch.setattr(wa_kernels, "dbias_slots", lambda *a: 1)
    spy = _Spy(wa_kernels._bwd_kernel)
    monkeypatch.setattr(wa_kernels, "_bwd_kernel", spy)
    _window_backward(device)
    assert [c["SHARED_SLOTS"] for c in spy.calls] == [True]


def test_deterministic_mode_gives_each_program_its_slot(device, monkeypatch, deterministic):
    monkeypatch.setattr(wa_kernels, "dbias_slots", lambda *a: 1)
    monkeypatch.setattr(wa_kernels, "backward_group", lambda *a: 1)
    spy = _Spy(wa_kernels._bwd_kernel)
    monkeypatch.setattr(wa_kernels, "_bwd_kernel", spy)
    _window_backward(device)
    (call,) = spy.calls
    assert call["SHARED_SLOTS"] is False and call["num_slots"] == 6


@pytest.mark.parametrize("windows,heads,N,shared", [(8192, 3, 49, False), (512, 3, 49, True), (64, 4, 144, True),
                                                    (4096, 4, 144, False)])
def test_shared_slots_for_few_large_windows(windows, heads, N, shared):
    # Where one dbias partial per program would pass 10% of the backward's minimum traffic,
    # programs share slots: large windows over few images. Swin-T stage 1 at batch 128 (8192
    # windows of 49) and Swin-B 384 stage 1 at batch 64 (4096 of 144) do not; 64 windows of
    # 144 do (over 10 programs a slot). Two programs adding into one zeroed slot still give one
    # result whatever their order (0 + a + b = 0 + b + a): 512 windows of 49 share, repeatably.
    d = 32
    group = wa_kernels.backward_group(windows, 1, heads, N, d)
    programs = -(-windows // group)
    slots = wa_kernels.dbias_slots(programs, windows * heads * N * d * 2, heads, N)
    assert (slots < programs) == shared
    if windows == 512:
        assert programs <= 2 * slots


# ------------------------------------------------------------------------------------------------
# On a GPU: each backward twice, compared bit for bit
# ------------------------------------------------------------------------------------------------

def _twice(fn, inputs):
    results = []
    for _ in range(2):
        leaves = {k: t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                  else t for k, t in inputs.items()}
        out = fn(**leaves)
        grads = torch.autograd.grad(out, [t for t in leaves.values() if isinstance(t, torch.Tensor) and t.requires_grad],
                                    torch.ones_like(out))
        results.append((out.detach(),) + tuple(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# label -> (case, inputs maker): the repeat inputs of every case of fastnote.cases
REPEAT = {label: (case, make) for case in cases.all_cases() for label, make in case.repeat.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(REPEAT) if torch.cuda.is_available() else ["all"])
def test_backward_is_bitwise_repeatable_gpu(device, name):
    case, make = REPEAT[name]
    previous = torch.are_deterministic_algorithms_enabled()
    # the mode is read when the backward runs, so it spans forward and backward
    torch.use_deterministic_algorithms(previous or name in case.deterministic_mode)
    try:
        _twice(case.ours, make(device))
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.gpu
def test_deterministic_mode_shared_slots_repeatable_gpu(device, deterministic):
    # Swin-B 384, stage 4: few windows per head, where shared slots would otherwise be used.
    q, k, v = (torch.randn(4, 32, 144, 32, device=device, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(32, 144, 144, device=device, dtype=torch.bfloat16)
    _twice(lambda q, k, v, b: fastnote.window_attention(q, k, v, bias=b), {"q": q, "k": k, "v": v, "b": bias})
