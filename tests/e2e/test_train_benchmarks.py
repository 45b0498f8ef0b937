"""The training benchmarks run end to end at toy sizes (they are scripts, so only a run proves they work).

No timing is asserted — only that each prints its table and headline ratio line and writes valid --json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
TOY = ["--layers", "1", "--batch", "2", "--seq", "16", "--reps", "1", "--threads", "1"]


def test_train_step_benchmark_smoke(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "train_step.py"), *TOY, "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "fp32 loss check (same weights, same batch)" in p.stdout
    assert "headline: bagualu train step vs transformers + AdamW (tiny-moe, 2x16 tokens)" in p.stdout
    res = json.loads(out.read_text())
    assert set(res["ratios"]) == {"float32", "bfloat16"} and res["geomean_ratio"] > 0
    assert {r["impl"] for r in res["rows"]} >= {"bagualu"} and all(r["tokens_per_s"] > 0 for r in res["rows"])


def test_checkpoint_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH / "checkpoint.py"), *TOY, "--steps-after", "1", "--dir",
                        str(tmp_path), "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "headline: async checkpoint stall" in p.stdout and "torch.save" in p.stdout
    res = json.loads(out.read_text())
    assert res["state_bytes"] > 0 and res["save_ratio_vs_torch"] > 0 and res["load_ratio_vs_torch"] > 0
    assert {r["what"] for r in res["rows"]} >= {"stall: sync checkpoint (bagualu)",
                                                 "stall: async checkpoint, blocking part"}
