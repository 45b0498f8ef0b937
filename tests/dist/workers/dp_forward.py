"""torchrun worker: each rank loads the model on the platform device, runs its shard of a batch, and
all-gathers the logits; rank 0 checks them against one process running the whole batch."""

import sys

import torch
import torch.distributed as dist

import bagualu.models as bm
from bagualu.platform import current_platform


def main(model_dir: str, out_file: str) -> None:
    plat = current_platform()
    dist.init_process_group(backend=plat.dist_backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = plat.current_device()
    model = bm.from_pretrained(model_dir)  # default device: the platform's, for this rank
    assert model.device == dev, (model.device, dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2 * world, 9), generator=g)
    mine = ids.chunk(world)[rank].to(dev)
    with torch.no_grad():
        logits = model(mine)
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits)
    if rank == 0:
        with torch.no_grad():
            whole = model(ids.to(dev))
        err = ((torch.cat(parts) - whole).abs().max() / whole.abs().max()).item()
        with open(out_file, "w") as f:
            f.write(f"{plat.name} {plat.dist_backend} {world} {err}\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
