"""The direct launch path (``triton_kernels.utils.launch``) against Triton's own, without a GPU.

Run as a script with the interpreter off (tests/test_launch.py does). Triton's driver is replaced
by a fake one: the current device is 0, the stream 0, loading a binary hands out a fresh function
handle, and a kernel's C launcher is a recorder. Everything else is Triton's: its JIT binds and
specialises the arguments and compiles each variant for sm_90 with its compiler and ptxas. So
the record of a sequence of launches says which binary each launch ran (its handle), with which
grid, stream and arguments, and the same sequence can be played through ``JITFunction.run``
(direct path off) and through ``launch`` (on), in one process, and compared.

The sequence mixes what decides Triton's specialisation: dtypes, pointers 16-byte aligned or not,
integers divisible by 16 or not or equal to 1, None and float arguments, one-, two- and
three-dimensional grids through an elementwise kernel of this file's own and the op launchers of
total variation and CLIP.

    python tests/launch_probe.py            # checks; exit 1 on any difference
    python tests/launch_probe.py --time     # also host us per launch, Triton's path against direct

The timing leaves out what both paths pay on a GPU: the C launcher (argument parsing, each
tensor's ``data_ptr``) and ``cuLaunchKernelEx``.
"""
import gc
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class FakeUtils:
    def __init__(self):
        self.loaded = 0

    def load_binary(self, name, kernel, shared, device):
        self.loaded += 1
        return (self.loaded, 1000 + self.loaded, 32, 0, 1024)   # module, function, regs, spills, threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class FakeDriver:
    """Just enough of Triton's GPU driver for its JIT to compile, load and 'launch' on a CPU."""

    def __init__(self):
        self.utils = FakeUtils()
        self.record = []
        self.recording = True

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def launcher_cls(self, src, metadata):
        record, fake = self.record, self

        def launch(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
            if fake.recording:
                record.append((metadata.name, (gx, gy, gz), stream, function,
                              tuple((a.data_ptr(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)))
        return launch


FAKE = FakeDriver()
driver.set_active(FAKE)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastnote.triton_kernels import clip_loss, tv_loss  # noqa: E402
from fastnote.triton_kernels import utils  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, alpha, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    """y = alpha * x (times x again with SQUARE): a one-dimensional streaming kernel."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = x * alpha
    if SQUARE:
        y = y * x
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _grid(n):
    return (utils.cdiv(n, utils.ELEMENTWISE_BLOCK),)


def scale(x, out, alpha, square):
    """An op launcher as the kernel files write them."""
    n = x.numel()
    utils.launch(_scale_kernel, _grid(n), x, out, n, alpha, SQUARE=square, BLOCK=utils.ELEMENTWISE_BLOCK,
                 num_warps=utils.ELEMENTWISE_WARPS)


def _tensors():
    torch.manual_seed(0)
    buf32 = torch.randn(4096 * 2 + 8)
    buf16 = buf32.half()
    img = torch.randn(2, 3, 16, 24)
    return dict(
        x32=buf32[:4096], x32_odd=buf32[:4097], x32_misaligned=buf32[1:4097], one=buf32[:1],
        x16=buf16[:4096], out32=torch.empty(4097), out16=torch.empty(4096, dtype=torch.half),
        img=img, img_t=img.transpose(2, 3), part=torch.empty(tv_loss.programs(img)), grad=torch.ones(()),
        dimg=torch.empty_like(img), emb_x=torch.randn(48, 32).half(), emb_y=torch.randn(64, 32).half(),
        scale=torch.full((), 10.0), stats=torch.empty(2, 48), ce=torch.empty(48),
    )


def sequence(t):
    """One pass of launches; each op launcher call makes one to two kernel launches."""
    n = t["x32"].numel()
    for name in ("x32", "x32_odd", "x32_misaligned", "one"):
        x = t[name]
        scale(x, t["out32"][:x.numel()], 0.5, True)
        scale(x, t["out32"][:x.numel()], 2.0, False)
    scale(t["x16"], t["out16"][:n], 0.5, True)
    for img in (t["img"], t["img_t"]):
        tv_loss.forward(y=img, part=t["part"])
        tv_loss.backward(y=img, grad=t["grad"], dy=t["dimg"])
    clip_loss.row_lse(x=t["emb_x"], y=t["emb_y"], scale=t["scale"], offset=0, stats=t["stats"], ce=t["ce"])
    clip_loss.row_lse(x=t["emb_x"], y=t["emb_y"], scale=t["scale"], offset=16, stats=t["stats"], ce=t["ce"])


def played(t, direct=None):
    """The record of one pass; ``direct`` True/False first resets the direct path (forgetting
    its binaries), None plays on with it as it is."""
    if direct is not None:
        utils.set_direct_launch(direct, force=True)
    FAKE.record.clear()
    sequence(t)
    return list(FAKE.record)


def _per_launch_us(fn, launches, calls=2000, rounds=7):
    times = []
    for _ in range(rounds):
        gc.disable()
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter_ns() - start) / calls / launches / 1e3)
        gc.enable()
    return statistics.median(times)


def main():
    t = _tensors()
    triton_path = played(t, False)       # compiles every variant
    through_jit = []
    original_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        through_jit.append(self.fn.__name__)
        return original_run(self, *args, **kwargs)

    JITFunction.run = counting_run
    first = played(t, True)              # direct path on: learns each binary through Triton's path
    first_jit = len(through_jit)
    through_jit.clear()
    observed = []
    utils.LAUNCH_OBSERVERS.append(lambda kernel, grid: observed.append((kernel.fn.__name__, grid)))
    second = played(t)                   # every launch direct
    utils.LAUNCH_OBSERVERS.pop()
    JITFunction.run = original_run
    variants = len({entry[3] for entry in triton_path})
    print(f"{len(triton_path)} launches, {variants} binaries; through JITFunction.run with the direct path on: "
          f"first pass {first_jit}, second pass {len(through_jit)}")
    failures = []
    for label, record in (("first direct pass", first), ("second direct pass", second)):
        if record != triton_path:
            for i, (a, b) in enumerate(zip(triton_path, record)):
                if a != b:
                    failures.append(f"{label}, launch {i}: Triton {a} direct {b}")
            if len(record) != len(triton_path):
                failures.append(f"{label}: {len(record)} launches against {len(triton_path)}")
    if [(name, tuple(grid) + (1,) * (3 - len(grid))) for name, grid in observed] != [e[:2] for e in second]:
        failures.append(f"the launch observers saw {observed}, the launcher ran {[e[:2] for e in second]}")
    if first_jit != variants or through_jit:
        failures.append(f"expected {variants} launches through JITFunction.run, then none; got {first_jit}, "
                        f"then {through_jit}")
    if "--time" in sys.argv:
        FAKE.recording = False
        x, out = t["x32"], t["out32"][:4096]
        kernel, grid = _scale_kernel, _grid(4096)
        for direct in (False, True):
            utils.set_direct_launch(direct, force=True)
            scale(x, out, 0.5, True)
            raw = _per_launch_us(lambda: utils.launch(kernel, grid, x, out, 4096, 0.5, SQUARE=True,
                                                      BLOCK=utils.ELEMENTWISE_BLOCK, num_warps=utils.ELEMENTWISE_WARPS), 1)
            op = _per_launch_us(lambda: scale(x, out, 0.5, True), 1)
            print(f"{'direct' if direct else 'triton'}: one elementwise launch {raw:.2f} us, "
                  f"its op launcher {op:.2f} us (C launcher a no-op)")
    for line in failures:
        print("FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
