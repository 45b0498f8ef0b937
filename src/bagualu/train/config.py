"""Run configuration: keyword-only dataclasses owned by the training system, overridable by dotted keys.

    RunConfig(model=ModelConfig, train=TrainConfig, data=DataConfig, parallel=ParallelConfig)

A recipe (``recipes.py``) returns a ``RunConfig``; ``--config FILE.toml`` and ``--section.key=value``
arguments override it (``apply_overrides``), values parsed to the field's type. Validation lives in
``__post_init__`` with messages that say what to change.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from bagualu.models.config import ModelConfig


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 300
    global_batch: int = 16  # sequences per optimizer step, over all ranks and micro-steps
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "auto"  # "auto": bf16 autocast where the platform's bf16 GEMMs are fast; or float32 / bfloat16
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    seed: int = 0
    log_every: int = 1
    eval_windows: int = 64
    checkpoint_every: int = 100  # steps between checkpoints; 0 = never
    checkpoint_keep: int = 3
    checkpoint_async: bool = True
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (less memory, ~1 more forward)
    compile: str = "none"  # torch.compile the model: none, powerfusion (fused memory-bound ops) or inductor
    checkpoint_dir: str = ""  # a local path or fsspec URL (s3://bucket/run/ckpt); empty: RUN_DIR/checkpoints

    def __post_init__(self):
        for name in ("steps", "global_batch", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.global_batch % self.grad_accum:
            raise ValueError(f"train.global_batch={self.global_batch} is not divisible by "
                             f"train.grad_accum={self.grad_accum}")
        if self.compile not in ("none", "powerfusion", "inductor"):
            raise ValueError(f"train.compile={self.compile!r} must be none, powerfusion or inductor")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"train.dtype={self.dtype!r} must be auto, float32 or bfloat16")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"train.warmup={self.warmup} must be in [0, train.steps={self.steps})")


@dataclass(kw_only=True)
class DataConfig:
    path: str = ""  # a prepared token dataset; empty: prepare the stdlib corpus into RUN_DIR/data
    vocab_size: int = 4096  # BPE size when preparing
    corpus_mb: float = 16.0


@dataclass(kw_only=True)
class ParallelConfig:
    ep: int = 0  # 0: all ranks for MoE models (1 for dense)
    shadow: str = "off"
    schedule: str = "all_to_all"


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def _parse(value, typ):
    origin = typing.get_origin(typ)
    if typ is bool or typ == "bool":
        if isinstance(value, bool):
            return value
        v = str(value).lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value in (None, "none", "None", "null"):
            return None
        return _parse(value, args[0])
    if typ in (int, float, str):
        return typ(value)
    return value


def apply_overrides(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """``{"train.lr": "3e-4", "model.num_layers": 2}`` → a new RunConfig (unknown keys are errors)."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    changes: dict[str, dict] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ValueError(f"unknown setting {key!r}: use SECTION.KEY with SECTION in {sorted(sections)}")
        obj = sections[section]
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            raise ValueError(f"unknown setting {key!r}; {section} has: {', '.join(sorted(fields))}")
        hints = typing.get_type_hints(type(obj))
        try:
            changes.setdefault(section, {})[name] = _parse(value, hints[name])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}={value!r}: {e}") from None
    new = {s: dataclasses.replace(sections[s], **c) for s, c in changes.items()}
    return dataclasses.replace(cfg, **new)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
