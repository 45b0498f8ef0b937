"""``bagualu compile --explain`` as a user runs it: on a script, on a model flavour, and on bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def _bagualu(args, tmp_path):
    env = dict(os.environ, BAGUALU_CACHE_DIR=str(tmp_path / "cache"), BAGUALU_NO_MEASURE="1")
    return subprocess.run([sys.executable, "-m", "bagualu.cli.main", "compile", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_explain_script_reports_kernels_and_fallbacks(tmp_path):
    script = tmp_path / "model_step.py"
    script.write_text(
        "import sys, torch, torch.nn.functional as F\n"
        "n = int(sys.argv[1])\n"
        "w = torch.randn(64, 64)\n"
        "def f(x):\n"
        "    h = F.silu(x @ w) * x\n"
        "    return torch.cumsum(torch.softmax(h, -1), -1)\n"
        "print('rows', torch.compile(f, backend='powerfusion')(torch.randn(n, 64)).shape[0])\n")
    p = _bagualu(["--explain", str(script), "--", "24"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "rows 24" in out  # the script ran with its own argv
    assert "fused kernel(s)" in out and "predicted" in out and "measured" in out
    assert "left to the vendor library: mm x1" in out
    assert "cumsum (cumsum): no lowering for this op" in out


def test_explain_flavour_compiles_forward_and_backward(tmp_path):
    p = _bagualu(["--explain", "tiny-llama", "--layers", "1", "--seq", "8", "--no-measure"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "backward#" in p.stdout and "forward#" in p.stdout


def test_explain_with_the_triton_code_generator(tmp_path):
    pytest.importorskip("triton")
    p = _bagualu(["--explain", "tiny-mixtral", "--layers", "1", "--seq", "8", "--no-measure", "--codegen", "triton"],
                 tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "code generator triton" in p.stdout and "backward#" in p.stdout
    assert "0 fused kernel(s)" not in p.stdout.splitlines()[0]


def test_unknown_target_names_the_choices(tmp_path):
    p = _bagualu(["--explain", "nope-model"], tmp_path)
    assert p.returncode != 0 and "tiny-llama" in (p.stderr + p.stdout) and "tiny-moe" in (p.stderr + p.stdout)
