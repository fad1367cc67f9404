"""fp32 matmul precision: every op with an fp32 ``tl.dot`` follows torch's setting, read through
whichever of torch's two APIs the user set. Once the new ``fp32_precision`` API is used, reading
the legacy ``get_float32_matmul_precision()`` / ``allow_tf32`` raises ("mix of the legacy and
new APIs"), which used to make every fp32 attention call fail."""
import pytest
import torch

from fastnote import cases
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


# the ops with an fp32 tl.dot: the cases of fastnote.cases that have precision inputs
CASES = {c.name: c for c in cases.all_cases() if c.precision is not None}
OPS = list(CASES)


@pytest.mark.parametrize("setting,expected", SETTINGS)
def test_dot_precision_follows_either_api(setting, expected, restore_precision):
    setting()
    assert dot_precision() == expected


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("setting,expected", SETTINGS)
def test_fp32_ops_run_under_every_setting(device, op, setting, expected, restore_precision, launches):
    case = CASES[op]
    inputs = case.precision(device)
    setting()
    got = case.ours(**inputs)
    assert launches, "the kernel path did not run"
    if expected == "ieee" or device.type == "cpu":
        # exact fp32 dots (the interpreter computes TF32 requests in fp32 too)
        assert_close(got, case.reference(**inputs), "two_matmul")
    else:
        # TF32 rounds the operands to 10 mantissa bits: the fp16 row of the table applies
        assert_close(got, case.reference(**inputs), "two_matmul", dtype=torch.float16)
    got.sum().backward()
