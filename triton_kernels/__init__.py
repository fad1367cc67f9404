"""Triton kernels and their launch helpers (installed as ``fastnote.triton_kernels``).

Only ``@triton.jit`` kernels and the Python functions that launch them live here: no autograd, no
nn. Every launcher takes tensors already checked by ``fastnote.ops`` and returns new tensors.
"""
