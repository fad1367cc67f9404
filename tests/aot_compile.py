"""Compile every Triton kernel for the GPUs users have, without a GPU, through the real launch paths.

Run as a script with the interpreter off (tests/test_kernels_compile.py does): each kernel launch
made by the public ops, forward and backward, in fp32 (IEEE and TF32 dots), fp16 and bf16, at
shapes that pick the tile configurations real models get, is captured instead of run, then built
the way Triton's JIT builds it at that launch: the same binder decides the argument
specialisation (pointers and integers divisible by 16, integers equal to 1), so the registers,
spills and shared memory reported are those of the binary a GPU would run. Each variant is
built for sm_90 (H100/H200) with Triton's compiler and ptxas, and checked for sm_80 (A100) and
sm_89 (L4, RTX 4090), whose shared memory per block is smaller (sm_89 on the sm_80 build, which it
matches: ``BUILT_AS``). The sm_80 build goes as far as the LLVM IR, where its shared memory is
fixed (``_to_llir``); the sm_89 builds that confirm it are full. The interpreter accepts things
the compiler rejects (tl.dot on tiles under 16, some layouts), so this is what keeps a CPU-only
CI honest about the GPU build.

Prints one line per variant with ``--report``: registers per thread and stack (spill) bytes read
from the sm_90 cubin with cuobjdump, shared memory per target, the count of approximate fp32
divisions in its PTX, its matrix instructions (Hopper's ``wgmma.mma_async`` against Ampere's
``mma.sync``), its software-pipelining stages and asynchronous copies (``cp.async``: loads issued
ahead into shared memory) and the warps it keeps resident per sm_90 SM out of 64. Then
"compiled <variants> variants of <kernels> kernels"; exits 1 after listing any variant that needs
more shared memory than a target has, or whose real sm_89 build (made for the few nearest that
limit) needs other shared memory than its sm_80 build.
"""
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from occupancy import SM90_WARPS, occupancy_warps  # noqa: E402  (tests/occupancy.py)

# (target, largest dynamic shared memory per block in bytes): sm_90 227 KB, sm_80 163 KB, sm_89 99 KB.
TARGETS = {
    "sm_90": (GPUTarget("cuda", 90, 32), 232448),
    "sm_80": (GPUTarget("cuda", 80, 32), 166912),
    "sm_89": (GPUTarget("cuda", 89, 32), 101376),
}
REPORT_TARGET = "sm_90"
# sm_89 (Ada) compiles these kernels as sm_80 does: the same mma.sync and cp.async path, and no fp8
# in any of them. The TTGIR (the layouts that fix shared memory) came out the same for 40 of 40
# variants sampled, and the shared memory the same for all 317 of a full build. So sm_89's limit
# is checked on the sm_80 build, which saves a third of the build (one of three targets), and sm_89
# is built for real only for the variants nearest its limit (CONFIRM), which must agree.
BUILT_AS = {"sm_89": "sm_80"}
CONFIRM = 4
captured = []


def _stand_in(arg):
    """What the JIT's binder reads of a tensor argument is its dtype and whether its address is a
    multiple of 16: a one-element tensor with both stands in for it, so that the captured launches
    do not keep the cases' tensors alive (the real-batch cases would hold several GB)."""
    if not isinstance(arg, torch.Tensor):
        return arg
    offset = arg.data_ptr() % 16
    base = torch.empty(64 // arg.element_size(), dtype=arg.dtype)   # the allocator aligns to >= 64 bytes
    assert base.data_ptr() % 64 == 0 and offset % arg.element_size() == 0
    return base[offset // arg.element_size():][:1]


def _capture(self, *args, grid, warmup, **kwargs):
    captured.append((self, tuple(_stand_in(a) for a in args), {k: _stand_in(v) for k, v in kwargs.items()}))


def jit_source(fn, args, kwargs, target):
    """The ASTSource and options Triton's JIT would compile for this launch on ``target``, by the
    JIT's own binder (Triton 3.6 through 3.9 share these internals)."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


APPROX_DIV = re.compile(r"\b(div\.full\.f32|div\.approx(\.ftz)?\.f32)\b")
WGMMA = re.compile(r"\bwgmma\.mma_async\b")       # Hopper's warpgroup MMA
MMA_SYNC = re.compile(r"\bmma\.sync\b")            # Ampere's warp MMA
CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\b")       # asynchronous global -> shared copies (pipelined loads)


def variant_key(fn, args, kwargs):
    """What makes two launches the same binary: kernel, specialised signature, constexprs, options."""
    src, options = jit_source(fn, args, kwargs, TARGETS[REPORT_TARGET][0])
    return (f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__qualname__}", repr(sorted(src.signature.items())),
            repr(sorted(src.constants.items(), key=repr)), options.num_warps, options.num_stages)


def build(fn, args, kwargs, target, shared_memory_only=False):
    """Build one captured launch for ``target`` as the JIT would (Triton keeps it in its cache);
    returns (source, options, compiled kernel). ``shared_memory_only``: see ``_to_llir``."""
    src, options = jit_source(fn, args, kwargs, target)
    previous = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = _to_llir if shared_memory_only else previous
    try:
        return src, options, triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.runtime.add_stages_inspection_hook = previous


LLIR_ONLY = "fastnote-aot-llir-only"
KERNEL_NAME = re.compile(r"^define ptx_kernel [^@\n]*@([A-Za-z_][A-Za-z0-9_]*)\(", re.M)   # the entry point


def _to_llir(*args):
    """Triton's stages hook (``knobs.runtime.add_stages_inspection_hook``) for a build read only for
    its shared memory (the targets built for another than the report's): the pipeline runs through
    the LLVM IR, where the shared memory is allocated (``make_llir`` records it), and the PTX and
    cubin stages give empty results, without LLVM's PTX code generation and ptxas: a third of an
    sm_80 build's time (window attention's backward: 0.77 of 2.25 s). Called without arguments it
    gives the cache key part that keeps such builds apart from full ones."""
    if not args:
        return LLIR_ONLY, LLIR_ONLY
    stages = args[1]

    def ptx(llir, metadata):
        metadata["name"] = KERNEL_NAME.search(llir).group(1)   # what make_ptx reads from the PTX
        return ""

    stages["ptx"] = ptx
    stages["cubin"] = lambda ptx_text, metadata: b""


def compile_launch(fn, args, kwargs, targets=tuple(TARGETS)):
    """Build one captured launch for ``targets`` (a target in ``BUILT_AS`` takes the shared memory
    of the build it stands for); returns ({target: shared bytes}, report line). Only the report's
    target is built to a cubin; the others to LLVM IR (``_to_llir``)."""
    built_shared = {}
    for name in {BUILT_AS.get(t, t) for t in targets}:
        src, options, built = build(fn, args, kwargs, TARGETS[name][0], shared_memory_only=name != REPORT_TARGET)
        built_shared[name] = built.metadata.shared
        if name == REPORT_TARGET:
            compiled, signature, constexprs, opts = built, src.signature, src.constants, options
    shared = {name: built_shared[BUILT_AS.get(name, name)] for name in targets}
    return shared, _report_line(fn, constexprs, signature, opts, compiled, shared)


def _compile_captured(index):
    return compile_launch(*captured[index])


def _shared_on(index, name):
    """Shared memory of captured launch ``index`` really built for ``name``."""
    return build(*captured[index], TARGETS[name][0])[2].metadata.shared


def _report_line(fn, constexprs, signature, options, compiled, shared):
    """Registers per thread and stack bytes of the cubin Triton built, shared memory per target,
    and approximate divisions in the PTX."""
    cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    ptx = compiled.asm["ptx"]
    approx = len(APPROX_DIV.findall(ptx))
    wgmma, mma_sync = len(WGMMA.findall(ptx)), len(MMA_SYNC.findall(ptx))
    cp_async = len(CP_ASYNC.findall(ptx))
    names = [p.name for p in fn.params]
    # the upper-case constexprs: values, and the switches that are on (COSINE, FUSED, ...) by name
    consts = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in constexprs.items()
              if v is not None and v is not False and (names[k[0]] if isinstance(k, tuple) else k).isupper()}
    dtypes = sorted({t for t in signature.values()
                     if isinstance(t, str) and (t.startswith("*fp") or t.startswith("*bf"))})
    smem = ",".join(f"{t}:{b}" for t, b in shared.items())
    warps = occupancy_warps(int(regs.group(1)) if regs else 255, shared.get(REPORT_TARGET, 0), options.num_warps)
    return (f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__qualname__:<28} {','.join(dtypes):<16} "
            f"warps={options.num_warps} stages={options.num_stages} regs={regs.group(1) if regs else '?':>3} "
            f"stack={stack.group(1) if stack else '?':>5} approx_div={approx} wgmma={wgmma} mma_sync={mma_sync} "
            f"cp_async={cp_async} "
            f"occupancy={warps}/{SM90_WARPS}{' LOW' if warps < SM90_WARPS // 4 else ''} smem={smem}  {consts}")





def run_ops(dtype):
    """Every launch of every case's build inputs (``fastnote.cases``), forward and backward."""
    from fastnote import cases

    for case in cases.all_cases():
        for inputs in case.build(dtype, torch.device("cpu")):
            out = case.ours(**inputs)
            outs = [out] if isinstance(out, torch.Tensor) else list(out)
            sum(o.float().sum() for o in outs if o.requires_grad).backward()


def main():
    JITFunction.run = _capture  # launches are recorded, not run: there is no GPU
    from fastnote import backend

    backend.use_triton = lambda device: True  # CPU tensors take the kernel path
    matmul = torch.backends.cuda.matmul
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        run_ops(dtype)
    # fp32 again with TF32 allowed: its dots take another code path (and registers)
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        run_ops(torch.float32)
    finally:
        matmul.fp32_precision = previous
    report = "--report" in sys.argv
    unique = {}
    for i, (fn, args, kwargs) in enumerate(captured):
        unique.setdefault(variant_key(fn, args, kwargs), i)
    # Compiling is CPU-bound and the variants are independent: one process per core (forked, so
    # each sees the captured launches).
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
        results = pool.map(_compile_captured, sorted(unique.values()), chunksize=1)
        # each target built as another is built for real where it matters most: nearest its limit
        confirm = []
        for name in BUILT_AS:
            nearest = sorted(zip(sorted(unique.values()), results), key=lambda r: -r[1][0][name])[:CONFIRM]
            confirm += [(i, name, shared[name]) for i, (shared, _) in nearest]
        real = pool.starmap(_shared_on, [(i, name) for i, name, _ in confirm], chunksize=1)
    lines, too_big = [], []
    differ = [f"{variant_key(*captured[i])[0]} needs {b} bytes of shared memory on {name}, {a} on "
              f"{BUILT_AS[name]} (built as)" for (i, name, a), b in zip(confirm, real) if a != b]
    for problem in differ:
        print("differs:", problem)
    for shared, line in results:
        if report and line not in lines:
            lines.append(line)
            print(line)
        too_big += [f"{line.split()[0]} needs {b} bytes of shared memory, {t} has {TARGETS[t][1]}"
                    for t, b in shared.items() if b > TARGETS[t][1]]
    for problem in too_big:
        print("too big:", problem)
    print(f"confirmed {len(confirm)} variants nearest the limit on "
          f"{', '.join(f'{t} (built as {a})' for t, a in BUILT_AS.items())}: {len(confirm) - len(differ)} agree")
    print(f"compiled {len(unique)} variants of {len({k[0] for k in unique})} kernels for {', '.join(TARGETS)}")
    sys.exit(1 if too_big or differ else 0)


if __name__ == "__main__":
    main()
