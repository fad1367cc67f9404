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


# Compiled for when no GPU is visible at build time (torch then has no device to pick an arch from;
# with none it fails with "list index out of range"). The newest carries PTX, so GPUs newer than
# sm_90 (Blackwell) JIT-compile the extension's kernels from it.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _cuda_home_note(cuda_home):
    """A warning's text when ``cuda_home`` has no lib64/ (the CUDA libraries fastnote._C links
    against), else "". torch guesses CUDA_HOME, when the environment does not set it, as the parent
    of the folder holding the ``nvcc`` found on PATH: for a wrapper script such as /usr/bin/nvcc or
    /usr/local/bin/nvcc that is /usr or /usr/local, which holds no CUDA libraries."""
    if not cuda_home or os.path.isdir(os.path.join(cuda_home, "lib64")) or sys.platform == "win32":
        return ""
    guessed = not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
    how = ""
    if guessed:
        import shutil

        how = (f" (not set in the environment: torch guessed it from the nvcc on PATH, {shutil.which('nvcc')}, "
               "which may be a wrapper script outside the toolkit)")
    return (f"CUDA_HOME={cuda_home}{how} has no lib64/ folder, so linking the CUDA part of fastnote._C will "
            "fail; set CUDA_HOME to the CUDA toolkit's root (the folder holding bin/nvcc and lib64/, e.g. "
            "/usr/local/cuda).")


def extensions():
    """``fastnote._C``: C++ always; CUDA sources too when a toolkit and a CUDA torch are present,
    or when FORCE_CUDA=1. With no GPU visible TORCH_CUDA_ARCH_LIST defaults to
    DEFAULT_CUDA_ARCH_LIST, since torch cannot pick an arch then. Returns ([], {}) while csrc/ holds
    no sources."""
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
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    note = _cuda_home_note(CUDA_HOME)
    if note:
        print(f"\nfastnote: warning: {note}\n", file=sys.stderr)
    ext = CUDAExtension(
        "fastnote._C",
        cpp + cu,
        define_macros=[("FASTNOTE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=link,
    )

    class BuildWithFallback(BuildExtension):
        """A failed CUDA build (nvcc or the link failing, say) falls back to the C++ build, loudly,
        instead of failing the install: the Triton ops need no extension, and spectral norm on CUDA
        tensors then runs as torch ops (fastnote warns when it does)."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:  # noqa: BLE001 - any compiler failure
                if extension is not ext:
                    raise
                hint = f" {note}" if note else ""
                print(f"\nfastnote: building the CUDA part of fastnote._C failed ({err!r});{hint} building the "
                      "C++ part only. Set FASTNOTE_CPU_EXTENSION=1 to skip the attempt.\n", file=sys.stderr)
                # BuildExtension.build_extensions has already added torch's flags to ext's (among them
                # -DTORCH_EXTENSION_NAME=_C, which names PyInit__C): keep its C++ flags, drop nvcc's.
                flags = ext.extra_compile_args
                cxx_flags = list(flags.get("cxx", []) if isinstance(flags, dict) else flags)
                for flag in ("-DTORCH_API_INCLUDE_EXTENSION_H",
                             "-DTORCH_EXTENSION_NAME=" + ext.name.rsplit(".", 1)[-1]):
                    if flag not in cxx_flags:
                        cxx_flags.append(flag)
                for attr in ("sources", "define_macros", "libraries", "library_dirs", "include_dirs",
                             "runtime_library_dirs", "extra_link_args"):
                    setattr(ext, attr, list(getattr(cpu_only, attr) or []))
                ext.extra_compile_args = {"cxx": cxx_flags}
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
    packages=["fastnote", "fastnote.ops", "fastnote.nn", "fastnote.nn.utils", "fastnote.patch", "fastnote.triton_kernels"],
    package_dir={"fastnote": "fastnote", "fastnote.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.11", "triton>=3.6", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "pytest-xdist"],
        "bench": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
