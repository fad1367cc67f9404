"""The examples in fastnote's docstrings run and print what they say (under the interpreter
without a GPU, so the kernels are what runs)."""
import doctest
import importlib
import pkgutil

import pytest

import fastnote

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(fastnote.__path__, "fastnote.")
    if not m.name.startswith("fastnote.triton_kernels") and m.name != "fastnote._C"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"


def test_examples_exist():
    # The public entry points carry examples: guards against the doctest run finding nothing.
    attempted = sum(doctest.testmod(importlib.import_module(n)).attempted for n in
                    ("fastnote.ops.hardswish", "fastnote.ops.squeeze_excitation", "fastnote.patch"))
    assert attempted >= 5
