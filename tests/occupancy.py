"""Warps one kernel keeps resident on an sm_90 SM (H100/H200), from what ptxas reports: the
arithmetic of the CUDA occupancy calculator. Kept apart from aot_compile.py, which turns the
interpreter off when imported, so that a test can import it."""

# sm_90 per SM: 64K 32-bit registers (allocated per warp in units of 256), 228 KB of shared memory
# (1 KB of it reserved per block), at most 64 warps and 32 blocks resident.
SM90_REGS, SM90_SMEM, SM90_WARPS, SM90_BLOCKS = 65536, 233472, 64, 32


def occupancy_warps(regs: int, shared: int, num_warps: int) -> int:
    """Warps of one kernel resident per sm_90 SM, from its registers per thread, shared memory per
    block and warps per block."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM90_REGS // per_warp) // num_warps if per_warp else SM90_BLOCKS
    by_smem = SM90_SMEM // (shared + 1024)
    blocks = min(by_regs, by_smem, SM90_WARPS // num_warps, SM90_BLOCKS)
    return blocks * num_warps
