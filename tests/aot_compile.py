"""Compile every Triton kernel for an H100 (sm_90) without a GPU, through the real launch paths.

Run as a script with the interpreter off (tests/test_kernels_compile.py does): each kernel launch
made by the public ops, forward and backward, in fp32, fp16 and bf16, at shapes that pick the
tile configurations real models get, is captured instead of run, then compiled by Triton's own
compiler (ptxas included). The interpreter accepts things the compiler rejects (tl.dot on tiles
under 16, some layouts), so this is what keeps a CPU-only CI honest about the GPU build.
Prints "compiled <variants> variants of <kernels> kernels"; with ``--report``, first one line per
variant with its registers per thread and stack (spill) bytes, read from the cubin with
cuobjdump: the numbers to tune tiles by.
"""
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
           torch.int32: "*i32"}
captured = []


def _capture(self, *args, grid, warmup, **kwargs):
    captured.append((self, args, kwargs))


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_launch(fn, args, kwargs):
    """Compile one captured launch; returns a key naming the variant."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip([p.name for p in fn.params], args))
    values.update(kwargs)
    signature, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr or v is None:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
        else:
            signature[p.name] = _arg_type(v)
    key = (fn.fn.__qualname__, tuple(sorted(signature.items())), repr(sorted(constexprs.items())),
           tuple(sorted(options.items())))
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                              options=options)
    if REPORT:
        _report(fn, constexprs, signature, options, compiled)
    return key


REPORT = "--report" in sys.argv
_reported = set()


def _report(fn, constexprs, signature, options, compiled):
    """One line per variant: registers per thread and stack bytes of the cubin Triton built."""
    cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    names = [p.name for p in fn.params]
    consts = {names[i[0]]: v for i, v in constexprs.items() if v is not None and not isinstance(v, bool)}
    dtypes = sorted({t for t in signature.values() if t.startswith("*fp") or t.startswith("*bf")})
    line = (f"{fn.fn.__qualname__:<28} {','.join(dtypes):<16} warps={options.get('num_warps', 4)} "
            f"regs={regs.group(1) if regs else '?':>3} stack={stack.group(1) if stack else '?':>5}  {consts}")
    if line not in _reported:
        _reported.add(line)
        print(line)


def _grad(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def run_ops(dtype):
    import fastnote

    x, = _grad(torch.randn(4, 72, 28, 28, dtype=dtype))
    fastnote.hard_swish(x).sum().backward()
    fastnote.hard_sigmoid(x).sum().backward()
    w1, b1, w2, b2 = _grad(torch.randn(24, 72), torch.randn(24), torch.randn(72, 24), torch.randn(72))
    for act, gate in (("relu", "hard_sigmoid"), ("silu", "sigmoid"), ("hard_swish", "hard_sigmoid")):
        fastnote.hswish_se(x, w1, b1, w2, b2, act, gate).float().sum().backward()
    fastnote.squeeze_excitation(x, w1, b1, w2, b2).float().sum().backward()
    # Swin: windows 7 (one tile per window), 12 (tiled), 3, 8; heads 3, head_dim 32, 16, 64, 128
    # 40 images of Swin-T stage 1 already give the backward its full GROUP (15) at N = 49
    for n, d, nW, imgs in ((49, 32, 64, 40), (144, 32, 16, 2), (9, 16, 4, 2), (49, 64, 16, 2), (64, 128, 4, 2)):
        q, k, v, bias = _grad(*(torch.randn(imgs * nW, 3, n, d, dtype=dtype) for _ in range(3)),
                              torch.randn(3, n, n, dtype=dtype))
        fastnote.window_attention(q, k, v, bias, torch.zeros(nW, n, n, dtype=dtype)).float().sum().backward()
    block = fastnote.nn.ShiftedWindowAttention(96, 7, 3, shift_size=3).to(dtype)
    block(*_grad(torch.randn(40, 56, 56, 96, dtype=dtype))).float().sum().backward()
    # SAGAN: generator 64x64 (d_qk 8, d_v 64), discriminator 16x16 (64, 512), pooled keys
    for d_qk, d_v, n, n_k in ((8, 64, 4096, 4096), (64, 512, 4096, 1024), (32, 256, 1024, 256)):
        q, k, v, xr, gamma = _grad(torch.randn(1, d_qk, n, dtype=dtype), torch.randn(1, d_qk, n_k, dtype=dtype),
                                   torch.randn(1, d_v, n_k, dtype=dtype), torch.randn(1, d_v, n, dtype=dtype),
                                   torch.zeros(1))
        fastnote.sagan_attention(q, k, v, x=xr, gamma=gamma).float().sum().backward()


def main():
    JITFunction.run = _capture  # launches are recorded, not run: there is no GPU
    from fastnote import backend

    backend.use_triton = lambda device: True  # CPU tensors take the kernel path
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        run_ops(dtype)
    variants = {compile_launch(fn, args, kwargs) for fn, args, kwargs in captured}
    print(f"compiled {len(variants)} variants of {len({v[0] for v in variants})} kernels")


if __name__ == "__main__":
    main()
