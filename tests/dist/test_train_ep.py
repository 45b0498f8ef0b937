"""A tiny Mixtral trained 20 optimizer steps with EP=2 follows the single-process loss curve (fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_torchrun_forward import free_port

pytestmark = pytest.mark.dist
WORKER = Path(__file__).parent / "workers" / "train_mixtral.py"


@pytest.mark.parametrize("nproc,ep,dp", [(2, 2, 1)])
def test_tiny_mixtral_ep_training_matches_single_process(tmp_path, nproc, ep, dp):
    out = tmp_path / "curve.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER), str(out), str(ep), str(dp)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    res = json.loads(out.read_text())
    curve, ref = res["curve"], res["ref"]
    assert len(curve) == len(ref) == 20
    assert ref[-1] < ref[0] - 0.1, f"the reference did not learn: {ref}"
    for a, b in zip(curve, ref):
        assert abs(a - b) / abs(b) < 1e-4, (curve, ref)
    print("losses", [round(x, 4) for x in ref[::4]], "max rel diff", max(abs(a - b) / abs(b) for a, b in zip(curve, ref)))
