"""Hugging Face export of a (possibly expert-parallel) model: merge the expert shards onto rank 0 and
write config.json + safetensors + the training tokenizer, which ``transformers`` and ``bagualu`` load."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from bagualu.comm import Axis
from bagualu.models import from_config
from bagualu.moe import MoE


@torch.no_grad()
def export_hf(model, mesh, model_cfg, tokenizer, out: Path, rank: int) -> None:
    """Collective over the EP group (every rank calls it); rank 0 writes ``out``."""
    group = mesh.group(Axis.EP)
    merged: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            for pname in ("gate_proj", "up_proj", "down_proj"):
                shard = getattr(m.experts, pname).detach().contiguous()
                if group is not None:
                    parts = [torch.empty_like(shard) for _ in range(mesh.ep)]
                    dist.all_gather(parts, shard, group=group)
                    shard = torch.cat(parts)
                merged[f"{name}.experts.{pname}"] = shard
    if rank != 0:
        return
    full = from_config(model_cfg, device="cpu", dtype="float32", seed=None)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.update({k: v.cpu() for k, v in merged.items()})
    full.load_state_dict(state)
    full.save_pretrained(out)
    tokenizer.save(out)
