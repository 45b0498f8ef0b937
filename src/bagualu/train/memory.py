"""Will a recipe fit? A per-device memory estimate, checked before anything is allocated.

    parameters on a device = replicated parameters + expert parameters / ep
    state bytes  = parameters × (4 fp32 weights + 4 grads + 8 AdamW moments)
    activations  ≈ micro-batch tokens per device × hidden × layers × 34 bytes (bf16; ×2 in fp32),
                   the usual transformer estimate; with activation checkpointing one layer's worth plus
                   every layer's input (tokens × hidden × 2 bytes, ×2 in fp32)

An estimate, deliberately on the high side; the error says what to change.
"""

from __future__ import annotations

import torch

from bagualu.models.config import ModelConfig
from bagualu.models.transformer import CausalLM
from bagualu.moe import MoE


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(replicated, expert) parameter counts, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    expert = sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters())
    total = sum(p.numel() for p in model.parameters())
    return total - expert, expert


def estimate_bytes(cfg: ModelConfig, train, *, ep: int, world: int = 1) -> dict[str, float]:
    replicated, expert = parameter_counts(cfg)
    params = replicated + expert / ep
    state = params * 16
    tokens = train.global_batch // train.grad_accum // max(1, world) * train.seq_len
    scale = 1 if train.dtype != "float32" else 2
    per_layer = tokens * cfg.hidden_size * 34 * scale
    if getattr(train, "activation_checkpointing", False):
        acts = per_layer + tokens * cfg.hidden_size * 2 * scale * cfg.num_layers
    else:
        acts = per_layer * cfg.num_layers
    return {"params": params, "state_bytes": state, "activation_bytes": acts, "total_bytes": state + acts}


def check_fits(cfg: ModelConfig, train, *, ep: int, platform, world: int | None = None) -> dict[str, float]:
    import torch.distributed as dist

    world = world or (dist.get_world_size() if dist.is_initialized() else 1)
    est = estimate_bytes(cfg, train, ep=ep, world=world)
    _, total = platform.memory_info(platform.current_device().index or 0)
    if est["total_bytes"] > 0.9 * total:
        gib = 1 << 30
        raise MemoryError(
            f"this run needs about {est['total_bytes'] / gib:.1f} GiB per {platform.name} device "
            f"({est['params'] / 1e9:.2f}B parameters there: {est['state_bytes'] / gib:.1f} GiB of weights, grads and "
            f"AdamW state + {est['activation_bytes'] / gib:.1f} GiB of activations), but a device has "
            f"{total / gib:.1f} GiB. Use more devices with expert parallelism (--nproc, parallel.ep), a smaller "
            f"train.global_batch or train.seq_len, train.activation_checkpointing=true, or a smaller recipe")
    return est
