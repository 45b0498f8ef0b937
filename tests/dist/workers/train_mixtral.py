"""torchrun worker: a tiny Mixtral trained 20 AdamW steps with EP (× DP) vs one process on the global batch."""

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import bagualu.models as bm
from bagualu.comm import make_mesh
from bagualu.models.flavours import flavour
from bagualu.parallel import parallelize

B_LOCAL, S, STEPS = 2, 16, 20


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def main(out_file: str, ep: int, dp: int) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    ref = bm.from_config(flavour("tiny-mixtral"), device="cpu", seed=0)
    ref.train()
    model = parallelize(copy.deepcopy(ref), make_mesh(dp=dp, ep=ep))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    curve, curve_ref = [], []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        # learnable: each token determines the next (x -> 5x + 3 mod 256) from a random start
        start = torch.randint(0, 256, (world * B_LOCAL, 1), generator=g)
        ids = start.clone()
        for _ in range(S):
            ids = torch.cat([ids, (ids[:, -1:] * 5 + 3) % 256], dim=1)
        loss = lm_loss(model, ids[rank * B_LOCAL:(rank + 1) * B_LOCAL])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        curve.append(mean.item() / world)
        loss_ref = lm_loss(ref, ids)
        opt_ref.zero_grad(set_to_none=True)
        loss_ref.backward()
        opt_ref.step()
        curve_ref.append(loss_ref.item())
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"curve": curve, "ref": curve_ref}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
