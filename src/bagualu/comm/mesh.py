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
    device_mesh: object | None = None  # the torch DeviceMesh (None without torch.distributed)

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
    return Mesh(dp=dp, ep=ep, rank=dist.get_rank(), groups=groups, world_group=dist.group.WORLD, device_mesh=dm)


def side_group(backend: str = "gloo"):
    """A process group over all ranks for background collectives (asynchronous checkpoint writes), so
    they never interleave with the training step's collectives on the default group. Collective: every
    rank must call it, in the same order. None without torch.distributed."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.new_group(backend=backend)


def init_distributed(backend: str) -> tuple[int, int]:
    """Join the job started by a launcher (torchrun, the elastic agent, Slurm via ``launch.slurm``);
    returns ``(rank, world_size)`` — ``(0, 1)`` for a single process.

    Under the elastic agent every attempt gets its own key prefix in the agent's store. Without it
    (torch 2.13, gloo) a restarted group reads the dead attempt's addresses and fails with "connection
    refused" — elastic recovery would never recover.
    """
    import datetime
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rank = int(os.environ["RANK"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=datetime.timedelta(seconds=300))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"bagualu/attempt-{attempt}", store), rank=rank,
                                world_size=world)
    else:
        dist.init_process_group(backend)
    return rank, world
