"""torchrun worker: an MoE layer under ``parallelize`` (EP × DP) against the same layer in one process on
the concatenated batch — outputs, loss and every gradient after synchronisation."""

import copy
import json
import sys

import torch
import torch.distributed as dist

from bagualu.comm import make_mesh
from bagualu.moe import MoE
from bagualu.parallel import parallelize

T_LOCAL, D, F = 24, 16, 12


def case(ep: int, dp: int, router: str, shared: int, steps: int = 2) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    ref = MoE(D, F, num_experts=8, top_k=2, router=router, num_shared_experts=shared,
              num_groups=2 if router == "sigmoid_bias" else 1, topk_groups=1)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.5)
    if router == "sigmoid_bias":
        ref.gate.e_score_correction_bias.normal_(0, 0.1)
    model = parallelize(copy.deepcopy(ref), make_mesh(dp=dp, ep=ep))
    worst = {"out": 0.0, "loss": 0.0, "grad": 0.0, "x_grad": 0.0}

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    for step in range(steps):  # two backwards: the hooks re-arm after the first
        g = torch.Generator().manual_seed(100 + step)
        x_all = torch.randn(world * T_LOCAL, D, generator=g)
        target = torch.randn(world * T_LOCAL, D, generator=g)
        mine = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
        x = x_all[mine].clone().requires_grad_()
        y = model(x)
        loss = ((y - target[mine]) ** 2).mean()
        for p in model.parameters():
            p.grad = None
        loss.backward()
        x_ref = x_all.clone().requires_grad_()
        y_ref = ref(x_ref)
        loss_ref = ((y_ref - target) ** 2).mean()
        for p in ref.parameters():
            p.grad = None
        loss_ref.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        worst["out"] = max(worst["out"], rel(y, y_ref[mine]))
        worst["loss"] = max(worst["loss"], rel(mean_loss / world, loss_ref))
        worst["x_grad"] = max(worst["x_grad"], rel(x.grad / world, x_ref.grad[mine]))
        e = 8 // ep
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            want = ref_params[name].grad
            if name.startswith("experts."):
                want = want[model.ep_rank * e:(model.ep_rank + 1) * e]
            worst["grad"] = max(worst["grad"], rel(p.grad, want))
        counts = model.last_tokens_per_expert.clone()
        dist.all_reduce(counts)
        assert torch.equal(counts, ref.last_tokens_per_expert), (counts, ref.last_tokens_per_expert)
    return worst


def main(out_file: str, cases_json: str) -> None:
    dist.init_process_group("gloo")
    results = []
    for c in json.loads(cases_json):
        results.append({**c, **case(**c)})
    if dist.get_rank() == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
