"""Expert parallelism × data parallelism reproduces one process on the concatenated batch (fp32, 1e-5):
outputs, the mean loss, aux losses, every gradient after the MoDa synchronisation, per-expert counts
and dropped routes — for every router, dropless and capacity modes, with and without shared experts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_torchrun_forward import free_port

pytestmark = pytest.mark.dist
WORKER = Path(__file__).parent / "workers" / "moe_ep.py"
ROUTERS = ["softmax_topk", "topk_softmax", "sigmoid_bias", "softmax_group", "noisy_topk", "gshard", "switch"]


def torchrun(nproc: int, out: Path, cases: list[dict]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER), str(out), json.dumps(cases)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("nproc,ep,dp", [(2, 2, 1), (4, 4, 1), (4, 2, 2)])
def test_ep_dp_matches_single_process(tmp_path, nproc, ep, dp):
    cases = [{"ep": ep, "dp": dp, "router": r, "shared": s, "capacity": c}
             for r in ROUTERS for s in (0, 1) for c in (None, 0.75)]
    results = torchrun(nproc, tmp_path / "out.json", cases)
    assert len(results) == len(cases)
    for res in results:
        for key in ("out", "loss", "grad", "x_grad", "aux"):
            assert res[key] < 1e-5, res
        if res["capacity"] is not None:
            assert res["dropped"] > 0, f"capacity 0.75 should drop routes: {res}"


@pytest.mark.parametrize("nproc,ep,dp", [(2, 2, 1), (4, 4, 1), (4, 2, 2)])
def test_fastermoe_shadowing_and_smart_schedule_match_single_process(tmp_path, nproc, ep, dp):
    """Shadowing (forced: the 2 hottest; and by the cost model) and the pipelined schedule change how
    the work is done, never the result."""
    cases = [{"ep": ep, "dp": dp, "router": r, "shared": 1, "capacity": c, "shadow": sh, "schedule": sc,
              "skew": True}
             for r in ("softmax_topk", "sigmoid_bias", "gshard") for c in (None, 0.75)
             for sh in ("off", 2, "auto") for sc in ("all_to_all", "pipelined", "auto")
             if not (sh == "off" and sc == "all_to_all")]
    results = torchrun(nproc, tmp_path / "out.json", cases)
    for res in results:
        for key in ("out", "loss", "grad", "x_grad", "aux"):
            assert res[key] < 1e-5, res
        # forced shadows always happen; the cost model shadows when the hot experts are not already
        # clipped by capacity (with capacity 0.75 the load is flat and shadowing would not pay)
        if res["shadow"] == 2 or (res["shadow"] == "auto" and res["capacity"] is None):
            assert res["shadowed"] > 0, f"expected hot experts to be shadowed: {res}"
