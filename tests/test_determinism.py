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
from fastnote.triton_kernels import window_attention as wa_kernels


class _Spy:
    """Stands in for a Triton kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

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

def _twice(fn, *inputs):
    results = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], torch.ones_like(out))
        results.append((out.detach(),) + tuple(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


DETERMINISTIC_MODE_CASES = {"window_attention N=144"}


def _cases(device):
    r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    return {
        "window_attention N=49": (lambda q, k, v, b: fastnote.window_attention(q, k, v, bias=b),
                                  r(512, 3, 49, 32), r(512, 3, 49, 32), r(512, 3, 49, 32), r(3, 49, 49)),
        # 64 windows of 144 tokens: over 10 programs per shared dbias slot by default (see
        # test_shared_slots_for_few_large_windows), so compared in the deterministic mode
        "window_attention N=144": (lambda q, k, v, b: fastnote.window_attention(q, k, v, bias=b),
                                   r(64, 4, 144, 32), r(64, 4, 144, 32), r(64, 4, 144, 32), r(4, 144, 144)),
        "swin block, padded": (lambda x, w, b, pw, pb, t: fastnote.swin_window_attention(x, w, b, pw, pb, t, 7, 3, 3),
                               r(8, 30, 33, 96), r(288, 96) * 0.1, r(288), r(96, 96) * 0.1, r(96), r(169, 3)),
        "sagan_attention": (lambda q, k, v, x, g: fastnote.sagan_attention(q, k, v, x, g),
                            r(4, 64, 4096), r(4, 64, 1024), r(4, 512, 1024), r(4, 512, 4096),
                            torch.full((1,), 0.5, device=device)),
        "hswish_se": (lambda x, w1, b1, w2, b2: fastnote.hswish_se(x, w1, b1, w2, b2),
                      r(64, 240, 14, 14), r(64, 240, dtype=torch.float32), r(64, dtype=torch.float32),
                      r(240, 64, dtype=torch.float32), r(240, dtype=torch.float32)),
        "hard_swish": (fastnote.hard_swish, r(128, 72, 56, 56)),
        "style_loss": (lambda x, t: fastnote.style_loss(x, t), r(4, 256, 64, 64), r(256, 256, dtype=torch.float32)),
        "tv_loss": (fastnote.tv_loss, r(8, 3, 256, 256)),
        # k not detached (CUT detaches it by default), so the key-side kernel is compared too
        "patch_nce_loss": (lambda q, k: fastnote.patch_nce_loss(q, k, 4, reduction="mean", detach_k=False,
                                                                include_all_negatives_from_minibatch=True),
                           r(1024, 256), r(1024, 256)),
        "clip_loss": (lambda a, b, s: fastnote.clip_loss(a, b, s), r(8192, 512), r(8192, 512),
                      torch.tensor(14.3, device=device)),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_cases("cpu").keys()) if torch.cuda.is_available() else ["all"])
def test_backward_is_bitwise_repeatable_gpu(device, name):
    fn, *inputs = _cases(device)[name]
    previous = torch.are_deterministic_algorithms_enabled()
    # the mode is read when the backward runs, so it spans forward and backward
    torch.use_deterministic_algorithms(previous or name in DETERMINISTIC_MODE_CASES)
    try:
        _twice(fn, *inputs)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.gpu
def test_deterministic_mode_shared_slots_repeatable_gpu(device, deterministic):
    # Swin-B 384, stage 4: few windows per head, where shared slots would otherwise be used.
    q, k, v = (torch.randn(4, 32, 144, 32, device=device, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(32, 144, 144, device=device, dtype=torch.bfloat16)
    _twice(lambda q, k, v, b: fastnote.window_attention(q, k, v, bias=b), q, k, v, bias)
