"""RoPE settings in both config.json dialects.

- transformers 4.x (what most real checkpoints carry): top-level ``rope_theta`` plus an optional
  ``rope_scaling`` dict whose kind is ``rope_type`` (or the older ``type``).
- transformers 5.x: one ``rope_parameters`` dict holding ``rope_theta`` and ``rope_type``.

We write the 4.x dialect, which both 4.x and 5.x read.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from bagualu.models.config import ROPE_TYPES, RopeConfig

_KEYS = {f.name for f in fields(RopeConfig)} - {"theta", "type"}


def parse_rope(raw: dict[str, Any], default_theta: float) -> RopeConfig:
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ValueError("rope_parameters must be one flat dict (per-layer-type RoPE is not supported)")
        theta = params.get("rope_theta", raw.get("rope_theta", default_theta))
        scaling = params
    else:
        theta = raw.get("rope_theta", default_theta)
        scaling = raw.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be a dict or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    kw = {k: scaling[k] for k in _KEYS if scaling.get(k) is not None}
    if "partial_rotary_factor" not in kw and raw.get("partial_rotary_factor") is not None:
        kw["partial_rotary_factor"] = raw["partial_rotary_factor"]
    return RopeConfig(theta=float(theta), type=kind, **kw)


def rope_to_hf(r: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": r.theta}
    if r.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = r.partial_rotary_factor
    if r.type == "default":
        out["rope_scaling"] = None
        return out
    sc: dict[str, Any] = {"rope_type": r.type, "factor": r.factor}
    if r.original_max_position_embeddings is not None:
        sc["original_max_position_embeddings"] = r.original_max_position_embeddings
    if r.type == "llama3":
        sc.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if r.type == "yarn":
        sc.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow)
        for k in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(r, k) is not None:
                sc[k] = getattr(r, k)
        if not r.truncate:
            sc["truncate"] = False
    out["rope_scaling"] = sc
    return out
