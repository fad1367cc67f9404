"""Build and install fastnote.

The Triton kernels live in ``triton_kernels/`` and install as ``fastnote.triton_kernels``
(never as a top-level ``triton_kernels``: that import name belongs to another PyPI project).
The C++/CUDA extension ``fastnote._C`` is built from ``csrc/`` (see ``extensions()``).

Install with ``pip install --no-build-isolation -e .``: build isolation would download a
multi-GB CUDA torch just to compile against.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    """``fastnote._C``: C++ always; CUDA sources too when a toolkit and a CUDA torch are present,
    or when FORCE_CUDA=1 (then TORCH_CUDA_ARCH_LIST gets a default, since with no GPU torch cannot
    pick one). Returns ([], {}) while csrc/ holds no sources."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = bool(cu) and CUDA_HOME is not None and (torch.version.cuda is not None or force)
    cxx = ["-O3", "-std=c++17"]
    link = []
    # at::parallel_for is header code: with torch's OpenMP backend it only runs in parallel when
    # the extension itself is compiled with OpenMP (it then shares torch's bundled libgomp).
    if sys.platform != "win32" and torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    cpu_only = CppExtension("fastnote._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if not use_cuda or os.environ.get("FASTNOTE_CPU_EXTENSION", "0") == "1":
        return [cpu_only], {"build_ext": BuildExtension.with_options(use_ninja=True)}
    if force and not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "fastnote._C",
        cpp + cu,
        define_macros=[("FASTNOTE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=link,
    )

    class BuildWithFallback(BuildExtension):
        """A failed CUDA build (a toolkit that does not match torch's, say) falls back to the C++
        build, loudly, instead of failing the install: the Triton ops need no extension, and
        spectral norm on CUDA tensors then runs as torch ops (fastnote warns when it does)."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:  # noqa: BLE001 - any compiler failure
                if extension is not ext:
                    raise
                print(f"\nfastnote: building the CUDA part of fastnote._C failed ({err}); building the C++ "
                      "part only. Set FASTNOTE_CPU_EXTENSION=1 to skip the attempt.\n", file=sys.stderr)
                for attr in ("sources", "define_macros", "extra_compile_args", "libraries", "library_dirs",
                             "include_dirs", "extra_link_args"):
                    setattr(ext, attr, getattr(cpu_only, attr))
                super().build_extension(ext)

    return [ext], {"build_ext": BuildWithFallback.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fastnote-kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for GAN and vision-transformer training",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fastnote", "fastnote.ops", "fastnote.nn", "fastnote.nn.utils", "fastnote.triton_kernels"],
    package_dir={"fastnote": "fastnote", "fastnote.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.11", "triton>=3.6", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
        "bench": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
