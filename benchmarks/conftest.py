"""pytest setup for ``pytest benchmarks/ --benchmark-only`` (the tests are in test_timings.py):
benchmarks/ goes on ``sys.path`` so that ``import harness`` and the scripts' imports work as when
a script runs, the ``--fastnote-cases`` option, and the ``compile`` marker."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

CASE_CHOICES = ("quick", "all")


def pytest_addoption(parser):
    parser.addoption("--fastnote-cases", choices=CASE_CHOICES, default="quick",
                     help="which of each benchmark's cases to time: quick (default: the first case per dtype, "
                          "as the scripts' --quick) or all")


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: a torch.compile provider (deselect with -m 'not compile')")
