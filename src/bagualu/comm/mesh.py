"""The device mesh: named axes over the ranks, and the only place process groups are made.

    world = dp × ep, rank = dp_rank * ep + ep_rank       (EP groups are contiguous ranks: the
                                                          all-to-all stays inside a node first)
    ep=2, dp=2:   ep groups {0,1} {2,3}    dp groups {0,2} {1,3}

Built on ``torch.distributed.device_mesh.init_device_mesh`` (public API), never on private
process-group classes. A size-1 axis has no group (``None``): collectives over it are no-ops.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch.distributed as dist


class Axis(str, enum.Enum):
    DP = "dp"
    EP = "ep"


@dataclass(frozen=True)
class Mesh:
    dp: int
    ep: int
    rank: int
    groups: dict  # Axis -> ProcessGroup | None
    world_group: object | None

    @property
    def world_size(self) -> int:
        return self.dp * self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    def group(self, axis: Axis | str):
        return self.groups[Axis(axis)]

    def size(self, axis: Axis | str) -> int:
        return {Axis.DP: self.dp, Axis.EP: self.ep}[Axis(axis)]


def make_mesh(*, dp: int = 1, ep: int = 1) -> Mesh:
    """A dp × ep mesh over the default process group (or a 1×1 mesh without one).

    Raises when ``dp * ep`` is not the world size, naming both.
    """
    if dp < 1 or ep < 1:
        raise ValueError(f"mesh sizes must be >= 1, got dp={dp}, ep={ep}")
    if not dist.is_available() or not dist.is_initialized():
        if dp * ep != 1:
            raise RuntimeError(f"make_mesh(dp={dp}, ep={ep}) needs torch.distributed initialised with "
                               f"{dp * ep} processes (launch with torchrun --nproc-per-node={dp * ep})")
        return Mesh(dp=1, ep=1, rank=0, groups={Axis.DP: None, Axis.EP: None}, world_group=None)
    world = dist.get_world_size()
    if dp * ep != world:
        raise ValueError(f"ep × dp must equal the world size: ep={ep} × dp={dp} = {ep * dp}, but world size "
                         f"is {world}; choose ep and dp whose product is {world}")
    from torch.distributed.device_mesh import init_device_mesh

    from bagualu.platform import current_platform

    dm = init_device_mesh(current_platform().device_type, (dp, ep), mesh_dim_names=(Axis.DP.value, Axis.EP.value))
    groups = {Axis.DP: dm.get_group(Axis.DP.value) if dp > 1 else None,
              Axis.EP: dm.get_group(Axis.EP.value) if ep > 1 else None}
    return Mesh(dp=dp, ep=ep, rank=dist.get_rank(), groups=groups, world_group=dist.group.WORLD)
