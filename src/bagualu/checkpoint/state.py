"""The state a run resumes from, as a torch.distributed.checkpoint state dict.

    model.<fqn>            parameters and buffers; expert shards as DTensors [Replicate() on dp, Shard(0)
                           on ep] over the run's DeviceMesh, so DCP writes each shard once and reshards on
                           load (a run saved with ep=2 resumes with ep=1 or ep=4)
    optim.<fqn>.<key>      AdamW moments (sharded like their parameter) and step counts
    sched, sampler, routers, rng, step      small objects

Tensors in the dict alias the live ones, so ``dcp.load`` restores in place; ``apply_loaded`` copies the
small objects back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagualu.moe import MoE


def _expert_ids(model) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}


@dataclass
class TrainingState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: object
    mesh: object

    def _wrap(self, t: torch.Tensor, expert: bool):
        if not expert or self.mesh is None or self.mesh.ep == 1 or self.mesh.device_mesh is None:
            return t
        from torch.distributed.tensor import DTensor, Replicate, Shard

        return DTensor.from_local(t, self.mesh.device_mesh, [Replicate(), Shard(0)], run_check=False)

    def _init_optimizer_state(self) -> None:
        """AdamW creates its moments at the first step; loading needs them to exist (zeros) first."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and not self.optimizer.state[p]:
                    self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                               "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def state_dict(self, step: int) -> dict:
        experts = _expert_ids(self.model)
        sd: dict = {"step": step}
        for name, p in self.model.named_parameters():
            sd[f"model.{name}"] = self._wrap(p.detach(), id(p) in experts)
        for name, b in self.model.named_buffers():
            sd[f"model.{name}"] = b
        self._init_optimizer_state()
        for name, p in self.model.named_parameters():
            for key, v in self.optimizer.state[p].items():
                sd[f"optim.{name}.{key}"] = self._wrap(v, id(p) in experts and v.dim() > 0)
        sd["sched"] = self.scheduler.state_dict()
        sd["sampler"] = self.sampler.state_dict()
        sd["routers"] = {n: m.gate.calls for n, m in self.model.named_modules() if isinstance(m, MoE)}
        sd["rng"] = torch.get_rng_state()
        return sd

    def apply_loaded(self, sd: dict) -> int:
        """After ``dcp.load(sd)``: restore the non-tensor parts; returns the step to continue after."""
        self.scheduler.load_state_dict(sd["sched"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.sampler.load_state_dict(sd["sampler"])
        modules = dict(self.model.named_modules())
        for name, calls in sd["routers"].items():
            modules[name].gate.calls = int(calls)
        torch.set_rng_state(sd["rng"])
        return int(sd["step"])
