"""torchrun worker: an MoE layer under ``parallelize`` (EP × DP) against the same layer in one process on
the concatenated batch — outputs, loss, aux losses, counts, drops and every gradient after sync.

Capacity is per dispatch group (the EP group's batch), so with dp > 1 the single-process reference
routes each dp group's concatenated batch in its own call.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

from bagualu.comm import make_mesh
from bagualu.moe import MoE
from bagualu.parallel import parallelize

T_LOCAL, D, F, E = 24, 16, 12, 8


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def case(ep: int, dp: int, router: str, shared: int, capacity: float | None, shadow="off",
         schedule: str = "all_to_all", skew: bool = False, steps: int = 2) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    top_k = {"switch": 1, "gshard": 2}.get(router, 2)
    torch.manual_seed(0)
    ref = MoE(D, F, num_experts=E, top_k=top_k, router=router, num_shared_experts=shared, capacity_factor=capacity,
              num_groups=2 if router in ("sigmoid_bias", "softmax_group") else 1, topk_groups=1, seed=5,
              shadow=shadow, schedule=schedule)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.5)
    if router == "sigmoid_bias":
        ref.gate.e_score_correction_bias.normal_(0, 0.1)
    if skew:  # make experts 0 and 5 hot, so shadowing them pays off
        with torch.no_grad():
            ref.gate.weight[0] += 2.0
            ref.gate.weight[5] += 1.5
    model = parallelize(copy.deepcopy(ref), make_mesh(dp=dp, ep=ep))
    if shadow == "auto":  # a link slow enough that moving hot experts' tokens costs more than their weights
        from bagualu.moe.ep_plan import ShadowCost
        model.cost = ShadowCost(row_bytes=64 * D, row_flops=18 * D * F, expert_bytes=12 * D * F, link_bw=1e8,
                                flops=1e10)
    shadowed = 0
    worst = {k: 0.0 for k in ("out", "loss", "grad", "x_grad", "aux")}
    total_dropped = 0
    use_aux = ref.capacity_factor is None  # with capacity (given or implied), statistics are per dispatch group
    for step in range(steps):  # two backwards: the hooks re-arm after the first
        g = torch.Generator().manual_seed(100 + step)
        x_all = torch.randn(world * T_LOCAL, D, generator=g)
        target = torch.randn(world * T_LOCAL, D, generator=g)
        mine = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
        x = x_all[mine].clone().requires_grad_()
        y = model(x)
        loss = ((y - target[mine]) ** 2).mean()
        aux = model.last_aux_losses["load_balance"] + model.last_aux_losses["z_loss"]
        for p in model.parameters():
            p.grad = None
        (loss + 0.1 * aux if use_aux else loss).backward()

        x_ref = x_all.clone().requires_grad_()
        groups = 1 if use_aux else dp  # capacity: one reference call per dispatch group
        calls, outs, dropped_ref, counts_ref = ref.gate.calls, [], 0, 0
        for gi, part in enumerate(x_ref.chunk(groups)):
            ref.gate.calls, ref.data_rank = calls, gi
            outs.append(ref(part))
            dropped_ref += int(ref.last_dropped)
            counts_ref = counts_ref + ref.last_tokens_per_expert
        y_ref = torch.cat(outs)
        loss_ref = ((y_ref - target) ** 2).mean()
        aux_ref = ref.last_aux_losses["load_balance"] + ref.last_aux_losses["z_loss"]
        for p in ref.parameters():
            p.grad = None
        (loss_ref + 0.1 * aux_ref if use_aux else loss_ref).backward()

        means = torch.stack([loss.detach(), aux.detach()])
        dist.all_reduce(means)
        worst["out"] = max(worst["out"], rel(y.detach(), y_ref[mine].detach()))
        worst["loss"] = max(worst["loss"], rel(means[0] / world, loss_ref))
        if use_aux:
            worst["aux"] = max(worst["aux"], rel(means[1] / world, aux_ref))
        worst["x_grad"] = max(worst["x_grad"], rel(x.grad / world, x_ref.grad[mine]))
        e = E // ep
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            want = ref_params[name].grad
            if name.startswith("experts."):
                want = want[model.ep_rank * e:(model.ep_rank + 1) * e]
            worst["grad"] = max(worst["grad"], rel(p.grad, want))
        counts = model.last_tokens_per_expert.clone()
        dropped = model.last_dropped.clone()
        dist.all_reduce(counts)
        dist.all_reduce(dropped)
        assert torch.equal(counts, counts_ref), (counts, counts_ref)
        assert int(dropped) == dropped_ref, (int(dropped), dropped_ref)
        total_dropped += dropped_ref
        shadowed += len(model.last_shadowed)
    return {**worst, "dropped": total_dropped, "shadowed": shadowed}


def main(out_file: str, cases_json: str) -> None:
    dist.init_process_group("gloo")
    results = [{**c, **case(**c)} for c in json.loads(cases_json)]
    if dist.get_rank() == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
