"""A job started by torchrun: every rank finds the platform, its device and the distributed backend,
and a data-parallel forward pass equals the single-process one."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
WORKER = Path(__file__).parent / "workers" / "dp_forward.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nproc", [2])
def test_torchrun_data_parallel_forward_matches_single_process(tmp_path, nproc):
    bagualu = Path(sys.executable).parent / "bagualu"
    subprocess.run([str(bagualu), "init-model", "tiny-mixtral", str(tmp_path / "m")], check=True,
                   capture_output=True)
    out = tmp_path / "result.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           f"--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER), str(tmp_path / "m"), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    name, backend, world, err = out.read_text().split()
    assert (name, backend, int(world)) == ("cpu", "gloo", nproc)
    assert float(err) < 1e-5
