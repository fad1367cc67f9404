"""``python -m fastnote report`` and the table of op cases it reads (``fastnote.cases``)."""
import dataclasses
import io
import os
import re
import subprocess
import sys

import pytest
import torch

import fastnote
from fastnote import __main__ as cli
from fastnote import cases, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_command_runs_every_op():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTNOTE_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "fastnote", "report"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for key in ("torch ", "triton ", "GPU ", "fastnote._C ", "backend on "):
        assert key in out, out
    names = [c.name for c in cases.all_cases()]
    for name in names:
        assert f"  {name} " in out and name + " " in out, name
    assert out.count(" PASS ") == len(names), out
    assert "parity: all passed" in out


def test_report_fails_on_a_wrong_op(monkeypatch):
    from fastnote import backend

    if not backend.use_triton(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("the kernels do not run here")
    (case,) = cases.by_name(["tv_loss"])
    wrong = dataclasses.replace(case, reference=lambda *a, **k: reference.tv_loss(*a, **k) * 1.01)
    monkeypatch.setattr(cases, "_TABLE", [wrong])
    buf = io.StringIO()
    assert cli.report(out=buf) == 1
    assert re.search(r"^ +tv_loss +FAIL", buf.getvalue(), re.M) and "parity: 1 failed" in buf.getvalue()


def test_report_rejects_an_unknown_op():
    buf = io.StringIO()
    assert cli.report(["no_such_op"], out=buf) == 2
    assert "unknown op(s) ['no_such_op']" in buf.getvalue()


def test_table_covers_every_public_op():
    # every public op of fastnote is compared by some case (patch_sample/patch_nce_logits are
    # covered by patch_nce's tests; the functional forms of modules are the ops themselves;
    # hard_swish/hard_sigmoid are torch's ops, tests/test_hardswish.py compares them bit for bit)
    named = {c.ours.__name__ for c in cases.all_cases()} | {c.name for c in cases.all_cases()}
    ops = {"clip_loss", "gram", "hswish_se", "power_iteration", "sagan_attention",
           "squeeze_excitation", "style_loss", "swin_window_attention", "tv_loss", "window_attention"}
    assert ops <= set(fastnote.__all__)
    assert ops <= named, ops - named


def test_case_names_are_unique():
    names = [c.name for c in cases.all_cases()]
    assert len(names) == len(set(names))


def test_help_and_aligned_table():
    # the description is the docstring's whole first paragraph (it once stopped mid-sentence), and
    # every status sits in one column however long the op's name
    proc = subprocess.run([sys.executable, "-m", "fastnote", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "Exit status 1 if a" in proc.stdout and "check fails." in proc.stdout, proc.stdout
    buf = io.StringIO()
    assert cli.report(ops=["tv_loss", "swin_window_attention_v2"], out=buf) == 0
    rows = [line for line in buf.getvalue().splitlines() if line.startswith("  ") and (" PASS " in line
                                                                                      or " skipped " in line)]
    assert len(rows) == 2
    assert len({line.index(" PASS ") if " PASS " in line else line.index(" skipped ") for line in rows}) == 1, rows
