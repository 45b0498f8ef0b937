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
    # The two runs differ only in rounding (batch 2 vs 4 through the dense GEMMs, partial sums across ranks):
    # ~1e-7 in the first steps. A router near-tie can flip under such a last-bit difference, after which AdamW
    # (which normalises every gradient coordinate) carries the two runs apart slowly: measured up to 4.5e-3
    # relative by step 20 for this data with the native grouped GEMM, 8.5e-6 with torch.mm, and 1e-7..1e-5 for
    # both on other seeds. So: the first five steps to 1e-5, the whole curve to 1e-2 (a lost expert shard or
    # misrouted gradients move it by far more; the gradients' scale, to which AdamW is blind, is held to 1e-5
    # by the one-step tests in test_moe_ep.py).
    for i, (a, b) in enumerate(zip(curve, ref)):
        assert abs(a - b) / abs(b) < (1e-5 if i < 5 else 1e-2), (i, curve, ref)
    print("losses", [round(x, 4) for x in ref[::4]], "max rel diff", max(abs(a - b) / abs(b) for a, b in zip(curve, ref)))
