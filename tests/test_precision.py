"""fp32 matmul precision: every op with an fp32 ``tl.dot`` follows torch's setting, read through
whichever of torch's two APIs the user set. Once the new ``fp32_precision`` API is used, reading
the legacy ``get_float32_matmul_precision()`` / ``allow_tf32`` raises ("mix of the legacy and
new APIs"), which used to make every fp32 attention call fail."""
import pytest
import torch

import fastnote
from fastnote import reference
from fastnote.testing import assert_close
from fastnote.triton_kernels.utils import dot_precision


def _legacy_high():
    torch.set_float32_matmul_precision("high")


def _legacy_allow_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True


def _new_tf32():
    torch.backends.cuda.matmul.fp32_precision = "tf32"


def _new_ieee():
    torch.backends.cuda.matmul.fp32_precision = "ieee"


def _new_global_tf32():
    torch.backends.fp32_precision = "tf32"


SETTINGS = [
    pytest.param(lambda: None, "ieee", id="default"),
    pytest.param(_legacy_high, "tf32", id="legacy-set_float32_matmul_precision-high"),
    pytest.param(_legacy_allow_tf32, "tf32", id="legacy-allow_tf32"),
    pytest.param(_new_tf32, "tf32", id="new-cuda.matmul.fp32_precision-tf32"),
    pytest.param(_new_ieee, "ieee", id="new-cuda.matmul.fp32_precision-ieee"),
    pytest.param(_new_global_tf32, "tf32", id="new-backends.fp32_precision-tf32"),
]


@pytest.fixture
def restore_precision():
    yield
    # torch's defaults: the legacy setters first (each sets the new API's matmul entry
    # explicitly), then every new-API entry back to "none" (inherit), the state a fresh process
    # starts in, where either API can be read
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "none"
    torch.backends.fp32_precision = "none"
    assert torch.get_float32_matmul_precision() == "highest"


def _ops(device):
    r = lambda *s: torch.randn(*s, device=device, requires_grad=True)  # noqa: E731
    q, k, v, bias = r(4, 2, 9, 16), r(4, 2, 9, 16), r(4, 2, 9, 16), r(2, 9, 9)
    sq, sk, sv, sx, gamma = r(2, 8, 20), r(2, 8, 12), r(2, 16, 12), r(2, 16, 20), torch.full((1,), 0.5, device=device)
    x = r(1, 6, 7, 16)
    w, b, pw, pb, table = r(48, 16), r(48), r(16, 16), r(16), r(49, 2)
    f, t = r(2, 5, 9), torch.randn(5, 5, device=device)
    nq, nk = r(12, 16), r(12, 16)
    img, txt = r(10, 16), r(10, 16)
    scale = torch.tensor(3.0, device=device)
    return {
        "window_attention": (lambda: fastnote.window_attention(q, k, v, bias=bias),
                             lambda: reference.window_attention(q, k, v, bias=bias)),
        "swin_window_attention": (lambda: fastnote.swin_window_attention(x, w, b, pw, pb, table, 4, 2, 2),
                                  lambda: reference.swin_block_attention(x, w, b, pw, pb, table, 4, 2, 2)),
        "sagan_attention": (lambda: fastnote.sagan_attention(sq, sk, sv, sx, gamma),
                            lambda: reference.sagan_attention(sq, sk, sv, sx, gamma)),
        "gram": (lambda: fastnote.gram(f), lambda: reference.gram(f)),
        "style_loss": (lambda: fastnote.style_loss(f, t), lambda: reference.style_loss(f, t)),
        "patch_nce_loss": (lambda: fastnote.patch_nce_loss(nq, nk, 2),
                           lambda: reference.patch_nce_loss(nq, nk, batch_size=2)),
        "clip_loss": (lambda: fastnote.clip_loss(img, txt, scale),
                      lambda: reference.clip_loss(img, txt, scale, exponentiated=True)),
    }


OPS = list(_ops("cpu"))


@pytest.mark.parametrize("setting,expected", SETTINGS)
def test_dot_precision_follows_either_api(setting, expected, restore_precision):
    setting()
    assert dot_precision() == expected


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("setting,expected", SETTINGS)
def test_fp32_ops_run_under_every_setting(device, op, setting, expected, restore_precision, launches):
    fn, ref = _ops(device)[op]
    setting()
    got = fn()
    assert launches, "the kernel path did not run"
    if expected == "ieee" or device.type == "cpu":
        # exact fp32 dots (the interpreter computes TF32 requests in fp32 too)
        assert_close(got, ref(), "two_matmul")
    else:
        # TF32 rounds the operands to 10 mantissa bits: the fp16 row of the table applies
        assert_close(got, ref(), "two_matmul", dtype=torch.float16)
    got.sum().backward()
