"""setup.py's CUDA configuration and its fallback to a C++-only ``fastnote._C``, driven through
setup.py itself in a subprocess (like pip's build), on any machine: the subprocess is told that no
GPU is visible and given a stand-in CUDA toolkit (a ``bin/nvcc`` that only answers ``--version``,
no ``lib64/``), since a CPU torch looks for no toolkit at all.

- Without a GPU, TORCH_CUDA_ARCH_LIST gets setup.py's default (torch cannot pick an arch with no
  device: "list index out of range"), whose newest arch carries +PTX for newer GPUs.
- A CUDA_HOME without lib64/ (guessed from a wrapper nvcc) is named in a warning.
- When the CUDA part fails to build, the C++ part is built and imports: it defines PyInit__C
  (-DTORCH_EXTENSION_NAME=_C) and registers the op's CPU kernel. The failure is made real with
  TORCH_CUDA_ARCH_LIST=0.0, which torch rejects in the CUDA compile step before any compiler runs;
  the C++ build then takes about 40 s on two cores.
"""
import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_PY = os.path.join(ROOT, "setup.py")

# Runs setup.py as pip's backend does (run as __main__, cwd = the project), after arranging the
# machine it should see. argv: cuda_home, then setup.py's own arguments.
DRIVER = textwrap.dedent('''
    import os, runpy, sys

    import torch
    import torch.utils.cpp_extension as cpp_extension

    cuda_home, *setup_args = sys.argv[1:]
    torch.cuda.is_available = lambda: False       # no GPU visible at build time
    torch.cuda.device_count = lambda: 0
    if os.environ.get("DRIVER_TORCH_CUDA"):       # a CUDA build of torch
        torch.version.cuda = os.environ["DRIVER_TORCH_CUDA"]
    cpp_extension.CUDA_HOME = cuda_home            # a CPU torch looks for no toolkit
    sys.argv = [os.path.join(os.getcwd(), "setup.py"), *setup_args]
    runpy.run_path(sys.argv[0], run_name="__main__")
    print("DRIVER TORCH_CUDA_ARCH_LIST=" + os.environ.get("TORCH_CUDA_ARCH_LIST", "<unset>"))
    get_flags = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if get_flags is not None and "TORCH_CUDA_ARCH_LIST" in os.environ:
        try:
            print("DRIVER arch flags=" + " ".join(get_flags([])))
        except Exception as err:
            print(f"DRIVER arch flags error={err!r}")
''')

# Loads the built extension in a fresh process (the project's own fastnote._C would register the
# same op a second time) and checks its CPU kernel.
CHECK = textwrap.dedent('''
    import importlib.util, sys

    import torch

    spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.with_cuda is False, mod.with_cuda
    assert hasattr(mod, "spectral_weight")
    name = "fastnote::spectral_power_iteration_"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.randn(12, generator=g, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(8, generator=g, dtype=torch.float64), dim=0)
    sigma, _, _ = torch.ops.fastnote.spectral_power_iteration_(w, u, v, 200, 1e-12, False, False)
    expected = torch.linalg.matrix_norm(w, ord=2)
    assert abs(float(sigma) - float(expected)) < 1e-6 * float(expected), (float(sigma), float(expected))
    print("CHECK ok")
''')


def _fake_toolkit(tmp_path) -> str:
    """A CUDA_HOME with bin/nvcc answering --version (as torch's release, so torch's version check
    passes) and failing anything else, and no lib64/."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    release = torch.version.cuda or "13.0"
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n"
                    'case "$*" in *--version*) echo "Cuda compilation tools, release '
                    f'{release}, V{release}.0"; exit 0;; esac\n'
                    'echo "stand-in nvcc: no CUDA toolkit here" >&2; exit 1\n')
    nvcc.chmod(0o755)
    return str(home)


def _run_setup(tmp_path, cuda_home, setup_args, env_update, timeout):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_CUDA_ARCH_LIST", "FORCE_CUDA", "FASTNOTE_CPU_EXTENSION", "CUDA_HOME", "CUDA_PATH")}
    env.update(env_update)
    return subprocess.run([sys.executable, str(driver), cuda_home, *setup_args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the stand-in nvcc is a shell script")


def test_cuda_torch_without_gpu_gets_default_arch_list(tmp_path):
    """A CUDA torch on a machine with no GPU (no FORCE_CUDA): the arch list is defaulted, with
    +PTX on its newest arch, and torch accepts it; the CUDA_HOME without lib64/ is warned about."""
    cuda_home = _fake_toolkit(tmp_path)
    proc = _run_setup(tmp_path, cuda_home, ["--name"], {"DRIVER_TORCH_CUDA": torch.version.cuda or "13.0"},
                      timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "fastnote-kernels" in proc.stdout
    assert "DRIVER TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX" in proc.stdout, out[-6000:]
    if "DRIVER arch flags" in proc.stdout:   # torch's own parser, where this torch has it
        assert "-gencode=arch=compute_90,code=compute_90" in proc.stdout, out[-6000:]
        assert "-gencode=arch=compute_80,code=sm_80" in proc.stdout, out[-6000:]
    assert f"CUDA_HOME={cuda_home}" in proc.stderr and "lib64" in proc.stderr, proc.stderr[-6000:]


def test_arch_list_from_environment_is_kept(tmp_path):
    proc = _run_setup(tmp_path, _fake_toolkit(tmp_path), ["--name"],
                      {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.6"}, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "DRIVER TORCH_CUDA_ARCH_LIST=8.6\n" in proc.stdout


def test_failed_cuda_build_falls_back_to_importable_cpp_extension(tmp_path):
    cuda_home = _fake_toolkit(tmp_path)
    lib, temp = tmp_path / "lib", tmp_path / "temp"
    proc = _run_setup(tmp_path, cuda_home,
                      ["build_ext", "--build-lib", str(lib), "--build-temp", str(temp)],
                      {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "0.0"}, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "building the CUDA part of fastnote._C failed" in proc.stderr, out[-8000:]
    built = glob.glob(str(lib / "fastnote" / "_C*"))
    assert len(built) == 1, (built, out[-8000:])
    check = tmp_path / "check.py"
    check.write_text(CHECK)
    loaded = subprocess.run([sys.executable, str(check), built[0]], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and "CHECK ok" in loaded.stdout, loaded.stdout + loaded.stderr[-6000:]
    # the stand-in toolkit has no lib64/: the fallback's message says so
    assert "lib64" in proc.stderr.split("building the CUDA part of fastnote._C failed", 1)[1]


def test_setup_lists_every_package():
    # setup.py names its packages one by one: a new subpackage left out would be missing from a
    # wheel (an editable install finds it anyway, so nothing else would notice)
    import ast

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, "setup.py"), encoding="utf-8").read())
    listed = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "packages")
    found = {os.path.relpath(os.path.dirname(p), root).replace(os.sep, ".")
             for p in glob.glob(os.path.join(root, "fastnote", "**", "__init__.py"), recursive=True)}
    found.add("fastnote.triton_kernels")   # triton_kernels/, mapped there by package_dir
    assert set(listed) == found, (sorted(found - set(listed)), sorted(set(listed) - found))
