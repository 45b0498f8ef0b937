"""Checkpoint tensor names: ours ⇄ Hugging Face's, per architecture.

Our module tree mirrors HF's, so most names are equal. The differences:

- experts are stacked (``mlp.experts.gate_proj [E, F, D]``); checkpoints hold one tensor per expert
  (``mlp.experts.{e}.gate_proj.weight``, Mixtral: ``block_sparse_moe.experts.{e}.w1.weight``).
  transformers 5 can also hold them fused (``experts.gate_up_proj [E, 2F, D]``), which we read.
- a few module names differ (Mixtral ``block_sparse_moe``, Qwen2-MoE ``shared_expert``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

import torch

_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class NameMap:
    renames: tuple[tuple[str, str], ...] = ()  # (ours, theirs) substrings
    expert_names: dict[str, str] = field(default_factory=lambda: {p: p for p in _EXPERT_PROJS})

    def to_hf(self, name: str) -> str:
        for ours, theirs in self.renames:
            name = name.replace(ours, theirs)
        return name

    def from_hf(self, name: str) -> str:
        for ours, theirs in self.renames:
            name = name.replace(theirs, ours)
        return name


NAME_MAPS: dict[str, NameMap] = {
    "llama": NameMap(),
    "mixtral": NameMap(renames=((".mlp.", ".block_sparse_moe."),),
                       expert_names={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen2_moe": NameMap(renames=((".mlp.shared_experts.", ".mlp.shared_expert."),)),
    "qwen3_moe": NameMap(),
    "dots1": NameMap(),
    "deepseek_v2": NameMap(),
    "deepseek_v3": NameMap(),
}

_PER_EXPERT = re.compile(r"^(?P<prefix>.*)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*)\.experts\.(?P<proj>gate_up_proj|down_proj)$")
IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: our parameter ``name``, expert slice ``expert`` (None = whole)."""

    name: str
    expert: int | None = None
    rows: slice | None = None  # for fused gate_up: which half of the rows


def hf_to_targets(arch: str, hf_name: str, shape: tuple[int, ...]) -> list[Target]:
    nm = NAME_MAPS[arch]
    m = _PER_EXPERT.match(hf_name)
    if m:
        inv = {v: k for k, v in nm.expert_names.items()}
        proj = inv.get(m["proj"])
        if proj is not None:
            return [Target(f"{nm.from_hf(m['prefix'] + '.')}experts.{proj}", int(m["e"]))]
    m = _FUSED.match(hf_name)
    if m:
        base = nm.from_hf(m["prefix"] + ".") + "experts."
        if m["proj"] == "down_proj":
            return [Target(base + "down_proj")]
        half = shape[1] // 2
        return [Target(base + "gate_proj", rows=slice(0, half)), Target(base + "up_proj", rows=slice(half, None))]
    return [Target(nm.from_hf(hf_name))]


def iter_hf_tensors(arch: str, state: dict[str, torch.Tensor], tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for everything a checkpoint holds, experts unstacked into per-expert tensors."""
    nm = NAME_MAPS[arch]
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue
        prefix, _, proj = name.rpartition(".experts.")
        if prefix and proj in _EXPERT_PROJS:
            hf_prefix = nm.to_hf(prefix + ".")
            for e in range(t.shape[0]):
                yield f"{hf_prefix}experts.{e}.{nm.expert_names[proj]}.weight", t[e]
        else:
            yield nm.to_hf(name), t
