"""Malformed parallel configurations fail at construction, naming the values."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from bagualu.comm import Axis, Mesh, make_mesh
from bagualu.moe import MoE
from bagualu.parallel import parallelize

pytestmark = pytest.mark.unit


def test_make_mesh_without_distributed():
    m = make_mesh()
    assert (m.dp, m.ep, m.world_size, m.group(Axis.EP)) == (1, 1, 1, None)
    with pytest.raises(RuntimeError, match=r"make_mesh\(dp=2, ep=2\) needs torch.distributed initialised with 4"):
        make_mesh(dp=2, ep=2)
    with pytest.raises(ValueError, match="mesh sizes must be >= 1, got dp=0, ep=1"):
        make_mesh(dp=0)


def test_ep_times_dp_must_be_world_size(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"ep × dp must equal the world size: ep=2 × dp=2 = 4, but world size is 1"):
            make_mesh(dp=2, ep=2)
    finally:
        dist.destroy_process_group()


def test_experts_not_divisible_by_ep():
    mesh = Mesh(dp=1, ep=3, rank=0, groups={Axis.DP: None, Axis.EP: None}, world_group=None)
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by ep=3; choose ep among the divisors of 8"):
        parallelize(MoE(16, 32, 8, 2), mesh)
