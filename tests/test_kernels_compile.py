"""Every Triton kernel builds for sm_90, sm_80 and sm_89 (Triton's compiler and ptxas, no GPU
needed; sm_80 to the LLVM IR, where its shared memory is fixed; sm_89 is checked on the sm_80
build, which it matches), with the argument specialisation
Triton's JIT would pick: the interpreter that runs the kernels elsewhere in the suite accepts code
the real compiler rejects, and what ptxas reports (registers, spills, shared memory) is the GPU's
own figure."""
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def build_report():
    if torch.cuda.is_available():
        pytest.skip("on a GPU every test compiles and runs the kernels for real")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile.py"), "--report"], env=env,
                         capture_output=True, text=True, timeout=1500)
    print(run.stdout)   # the per-variant report, shown with -s
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    lines = run.stdout.splitlines()
    words = lines[-1].split()
    assert words[:1] == ["compiled"] and words[-3:] == ["sm_90,", "sm_80,", "sm_89"], run.stdout
    # sm_89 is checked on the sm_80 build; its real build, for the variants nearest its limit, agrees
    assert any(re.fullmatch(r"confirmed (\d+) variants nearest the limit on sm_89 \(built as sm_80\): \1 agree",
                            line) for line in lines), run.stdout[-2000:]
    variants = [line for line in lines[:-1] if "regs=" in line]
    assert len(variants) >= int(words[1]) // 2, run.stdout
    return int(words[4]), {line: _fields(line) for line in variants}


def _fields(line):
    found = {k: int(v) for k, v in
             re.findall(r"(stages|stack|approx_div|wgmma|mma_sync|cp_async|occupancy)=\s*(\d+)", line)}
    assert set(found) == {"stages", "stack", "approx_div", "wgmma", "mma_sync", "cp_async", "occupancy"}, line
    found["low"] = " LOW " in line
    found["tiles"] = [int(v) for v in re.findall(r"'BLOCK_[MNXY]': (\d+)", line)]
    found["half"] = "*fp16" in line or "*bf16" in line
    return found


def test_every_kernel_builds_for_three_architectures(build_report):
    kernels, variants = build_report
    # SE 5, window 2 (V1 and V2), SAGAN 4, gram 3, tv 2, PatchNCE 3, CLIP 2, SigLIP 2: 23
    assert kernels >= 20, kernels
    # fp32 is built both ways a GPU runs it: TF32 when torch allows it, else 3xTF32 (fp32-accurate
    # products on the tensor cores); Triton's FMA-unit "ieee" dot is left to the interpreter
    assert any("'PRECISION': 'tf32'" in line for line in variants)
    assert any("'PRECISION': 'tf32x3'" in line for line in variants)
    assert not any("'PRECISION': 'ieee'" in line for line in variants)


def test_no_spills_in_half_precision_forward_and_none_past_1kb(build_report):
    # Spilling is what the compiler does when a tile choice is wrong for the GPU: the half
    # precision forward kernels (the inference path) must not spill at all, and nothing may
    # spill more than 1 KB per thread (a bf16 dot compiled through fp32 once took 5.5 KB).
    _, variants = build_report
    half_fwd = {line: f["stack"] for line, f in variants.items()
                if line.split()[0].rsplit(".", 1)[-1] in ("_fwd_kernel", "_forward_kernel")
                and ("*fp16" in line or "*bf16" in line)}
    assert half_fwd and all(b == 0 for b in half_fwd.values()), {k: v for k, v in half_fwd.items() if v}
    # Window attention trains in half precision (Swin V1 and V2, forward and backward, at the
    # shapes of fastnote.cases: real batches, window 7, a padded map): none of it may spill. The
    # cosine backward once took 16-80 bytes per thread, holding the additive tile and the padded
    # tokens' sums across a program's images.
    half_window = {line: f["stack"] for line, f in variants.items()
                   if line.startswith("window_attention.") and f["half"]}
    assert len(half_window) >= 20 and all(b == 0 for b in half_window.values()), \
        {k: v for k, v in half_window.items() if v}
    worst = max(variants, key=lambda line: variants[line]["stack"])
    assert variants[worst]["stack"] <= 1024, worst


def test_hard_activations_divide_exactly(build_report):
    # torch's CUDA kernels divide with IEEE rounding, and the SE kernels evaluate h-swish and
    # h-sigmoid in torch's order to give its values: Triton's fp32 `/` would compile to the
    # approximate div.full.f32 (the interpreter divides exactly, so only the compiled PTX shows
    # it). The variants with a hard activation: h-swish before SE (HSWISH), h-swish in the
    # excitation MLP (ACT 2), h-sigmoid as the gate (GATE 0).
    _, variants = build_report
    hard = {line: f["approx_div"] for line, f in variants.items() if line.startswith("squeeze_excitation.")
            and ("'HSWISH': True" in line or "'ACT': 2" in line or "'GATE': 0" in line)}
    assert len(hard) >= 10 and all(n == 0 for n in hard.values()), hard


def test_half_precision_dots_use_hopper_mma(build_report):
    # On sm_90 a dot whose tiles are 64 or more on both sides can be Hopper's warpgroup MMA
    # (wgmma.mma_async); Ampere's mma.sync there is a slower path the compiler falls back to (a
    # layout or a warp count it cannot give wgmma). Tiles under 64 (window attention at 16 or 32
    # tokens, PatchNCE's key-side tiles of 32) cannot use it.
    _, variants = build_report
    big = {line: f for line, f in variants.items() if f["half"] and f["tiles"] and min(f["tiles"]) >= 64}
    assert big
    fallen_back = [line for line, f in big.items() if f["mma_sync"]]
    assert not fallen_back, fallen_back
    assert any(f["wgmma"] for f in big.values())


def test_occupancy_reported(build_report):
    # resident warps per sm_90 SM from registers, shared memory and warps per block; flagged LOW
    # under a quarter of the 64 (a variant to look at, not a failure: the report lists them)
    _, variants = build_report
    for line, f in variants.items():
        assert 1 <= f["occupancy"] <= 64, line
        assert f["low"] == (f["occupancy"] < 16), line


def test_fused_window_forward_fits_two_programs_per_sm(build_report):
    # The Swin block's fused forward with one tile per window (windows 7 and 8, V1 and V2) takes
    # the window's token count as a compile-time constant, so the masks of the padded rows and
    # columns fold away: at most 128 registers a thread, two programs of 8 warps on an SM. With
    # the count at run time these took 132-176 registers (Triton 3.9) and half that occupancy.
    _, variants = build_report
    fused = {line: f["occupancy"] for line, f in variants.items()
             if line.startswith("window_attention._fwd_kernel") and f["half"]
             and "'FUSED': True" in line and "'SINGLE': True" in line}
    assert len(fused) >= 8 and all(o >= 16 for o in fused.values()), fused


def test_window_attention_pipelines_its_windows_in_half_precision(build_report):
    # The V1 kernels in fp16/bf16 with one tile per window are built with two stages (``_stages``
    # in triton_kernels/window_attention.py): Triton's pipeliner then loads the program's next
    # window (cp.async into shared memory) while this one computes. The forwards keep two 8-warp
    # programs per SM, and no variant spills. With one stage, as before, there were no
    # asynchronous copies.
    _, variants = build_report
    pipelined = {line: f for line, f in variants.items()
                 if line.split()[0] in ("window_attention._fwd_kernel", "window_attention._bwd_kernel")
                 and f["half"] and "'SINGLE': True" in line and "'COSINE': True" not in line}
    assert len(pipelined) >= 12, pipelined
    for line, f in pipelined.items():
        assert f["stages"] == 2 and f["cp_async"] > 0 and f["stack"] == 0, line
        assert f["occupancy"] >= 16 or "_bwd_kernel" in line, line


def test_sagan_backward_uses_wgmma_and_keeps_16_warps_resident(build_report):
    # SAGAN's backward tiles (``BACKWARD_TILES`` in triton_kernels/sagan_attention.py): every dk/dv
    # and dq variant, fp32 included, multiplies with Hopper's wgmma (fp32's dk/dv programs owned
    # 32 keys before, and used mma.sync), and in fp16/bf16 every one keeps at least 16 warps
    # resident per SM (on 64 x 64 tiles and 8 warps the dk/dv kernel kept 8 at every SAGAN width,
    # dq from d_v 256); at SAGAN's C = 64 (d_qk 8, padded to 16; d_v 64) as two programs of 8.
    _, variants = build_report
    kernels = ("sagan_attention._dkdv_kernel", "sagan_attention._dq_kernel")
    backward = {line: f for line, f in variants.items() if line.split()[0] in kernels}
    assert len(backward) >= 10, backward
    assert all(f["wgmma"] and not f["mma_sync"] for f in backward.values()), backward
    half = {line: f["occupancy"] for line, f in backward.items() if f["half"]}
    assert len(half) >= 8 and all(o >= 16 for o in half.values()), half
    c64 = [line for line in half if "'BLOCK_D': 16, 'BLOCK_DV': 64}" in line]
    assert len(c64) >= 4 and all(" warps=8 " in line for line in c64), c64


def test_contrastive_backward_accumulates_wide_gradient_slices(build_report):
    # The contrastive backward kernels recompute every score tile over all D channels once per
    # gradient slice they accumulate (``GRADIENT_SLICES`` in triton_kernels/contrastive_tiles.py):
    # slices of at least 128 channels (256 in fp16/bf16 and with TF32), where they were the
    # score chunk's 32 or 64 (CLIP's D = 512: 8 and 16 recomputations per gradient, now 2 and 4).
    # Where all of D fits one score chunk (SINGLE_D) there is one slice either way.
    _, variants = build_report
    kernels = ("clip_loss._backward_kernel", "siglip_loss._backward_kernel", "patch_nce._dq_kernel",
               "patch_nce._dk_kernel")
    backward = [line for line in variants if line.split()[0] in kernels and "'SINGLE_D': True" not in line]
    assert len(backward) >= 12, backward
    slices = {line: int(re.search(r"'BLOCK_G': (\d+)", line).group(1)) for line in backward}
    assert all(g >= 128 for g in slices.values()), slices
    assert all(g == 256 for line, g in slices.items() if "tf32x3" not in line), slices


def test_occupancy_arithmetic():
    from occupancy import occupancy_warps   # tests/occupancy.py, beside this file

    assert occupancy_warps(255, 0, 8) == 8           # 32 x 256 registers a warp: 8 warps fit
    assert occupancy_warps(128, 0, 4) == 16          # 16 warps by registers: 4 blocks of 4
    assert occupancy_warps(32, 0, 4) == 64           # the warp limit
    assert occupancy_warps(64, 100 * 1024, 4) == 8   # shared memory: two blocks of 100 KB
