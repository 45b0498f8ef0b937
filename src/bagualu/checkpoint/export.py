"""Hugging Face export of any committed checkpoint, in one process: ``bagualu export RUN_DIR OUT``.

A checkpoint carries what an export needs besides the tensors: ``model_config.json`` (the run's
``ModelConfig``, lossless) and the training tokenizer (``tokenizer.json``, ``tokenizer_config.json``),
written by rank 0 into the checkpoint before its manifest. The tensors are DCP shards; expert weights
were saved as DTensor shards over the EP axis (each rank wrote its experts). Loading into the *full*
model's plain tensors in one process makes DCP's load planner read every shard into its slice of the
global tensor — the merge is DCP's resharding, no gather and no process group.

Which checkpoint: ``SRC`` may be a run directory (its ``config.json`` names ``train.checkpoint_dir``,
default ``RUN_DIR/checkpoints``), a checkpoints directory, or one ``step-N`` directory; any of them a
local path or an fsspec URL. Default: the newest complete one (torn or corrupt ones are skipped, with a
warning); ``step=N`` picks one, and refuses a torn or corrupt one with an error saying why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from bagualu.checkpoint.manager import (MANIFEST, _STEP, _quiet_single_process, check_checkpoint, list_checkpoints,
                                        storage_reader)
from bagualu.models import MLAConfig, ModelConfig, MoEConfig, RopeConfig, from_config
from bagualu.storage.fs import filesystem, join
from bagualu.utils.logging import get_logger

log = get_logger(__name__)
MODEL_CONFIG = "model_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def checkpoint_files(model_cfg: ModelConfig, tokenizer) -> dict[str, bytes]:
    """The extra files every checkpoint of a run carries (``CheckpointManager.save(files=...)``)."""
    files = {MODEL_CONFIG: json.dumps(dataclasses.asdict(model_cfg), indent=1).encode()}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for name in TOKENIZER_FILES:
            files[name] = (Path(tmp) / name).read_bytes()
    return files


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d["rope"] = RopeConfig(**d["rope"])
    d["moe"] = MoEConfig(**d["moe"]) if d.get("moe") else None
    d["mla"] = MLAConfig(**d["mla"]) if d.get("mla") else None
    for key in ("layer_types", "moe_layers"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return ModelConfig(**d)


def checkpoints_dir(src: str) -> str:
    """The checkpoints directory of a run directory (or ``src`` itself when it is one)."""
    fs, path = filesystem(src)
    cfg_path = join(path, "config.json")
    if fs.isfile(cfg_path):
        try:
            ckpt = json.loads(fs.cat_file(cfg_path)).get("train", {}).get("checkpoint_dir")
        except ValueError:
            ckpt = None
        if ckpt:
            return ckpt
    if fs.isdir(join(path, "checkpoints")):
        return join(str(src).rstrip("/"), "checkpoints")
    return str(src)


def resolve_checkpoint(src: str | os.PathLike, step: int | None = None) -> str:
    """The checkpoint to export from ``src`` (see the module docstring); errors say what exists instead."""
    src = str(src)
    fs, path = filesystem(src)
    if _STEP.match(os.path.basename(path.rstrip("/"))) or fs.isfile(join(path, MANIFEST)):
        if not fs.isdir(path):
            raise FileNotFoundError(f"checkpoint {src} does not exist")
        if step is not None and _STEP.match(os.path.basename(path.rstrip("/"))) and \
                int(_STEP.match(os.path.basename(path.rstrip("/")))[1]) != step:
            raise ValueError(f"--step {step} contradicts the checkpoint directory {src}; give the run directory")
        problem = check_checkpoint(src)
        if problem:
            raise ValueError(f"checkpoint {src} cannot be exported: {problem}")
        return src
    if not fs.exists(path):
        raise FileNotFoundError(f"{src} does not exist; give a run directory (bagualu train --run-dir) or a "
                                f"checkpoints directory")
    ckpt_dir = checkpoints_dir(src)
    entries = list_checkpoints(ckpt_dir)
    committed = [s for s, _, torn in entries if not torn]
    listing = ", ".join(map(str, committed)) or "none"
    if not entries:
        raise FileNotFoundError(f"no checkpoint in {src} (looked in {ckpt_dir}); checkpoints are written every "
                                f"train.checkpoint_every steps of `bagualu train`")
    if step is not None:
        found = [(p, torn) for s, p, torn in entries if s == step]
        if not found:
            raise ValueError(f"step {step} has no checkpoint in {ckpt_dir}; committed steps: {listing}")
        path_, torn = found[-1]  # a committed one sorts after a torn one of the same step
        if torn:
            raise ValueError(f"checkpoint {path_} is torn (its write never committed: no manifest.json) and cannot "
                             f"be exported; committed steps: {listing}")
        problem = check_checkpoint(path_)
        if problem:
            raise ValueError(f"checkpoint {path_} cannot be exported: {problem}; committed steps: {listing}")
        return path_
    for _, p, torn in reversed(entries):
        problem = "its write never committed (no manifest.json)" if torn else check_checkpoint(p)
        if problem is None:
            return p
        log.warning("skipping checkpoint %s: %s", p, problem)
    raise ValueError(f"no complete checkpoint in {ckpt_dir}: every one is torn or corrupt (see the warnings)")


@torch.no_grad()
def load_checkpoint_model(ckpt: str, *, dtype: str = "float32"):
    """``(model, tokenizer files)`` from checkpoint ``ckpt``: the full model (all experts) in one process."""
    fs, path = filesystem(ckpt)
    if not fs.isfile(join(path, MODEL_CONFIG)):
        raise ValueError(f"checkpoint {ckpt} has no {MODEL_CONFIG} (written by an older bagualu); it cannot be "
                         f"exported")
    cfg = model_config_from_dict(json.loads(fs.cat_file(join(path, MODEL_CONFIG))))
    model = from_config(cfg, device="cpu", dtype="float32", seed=None)
    state = {f"model.{n}": p for n, p in model.named_parameters()}
    state.update({f"model.{n}": b for n, b in model.named_buffers()})
    with _quiet_single_process():
        import torch.distributed.checkpoint as dcp

        dcp.load(state, storage_reader=storage_reader(ckpt), no_dist=True)  # experts: every shard into its slice
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    tok_files = {n: fs.cat_file(join(path, n)) for n in TOKENIZER_FILES if fs.isfile(join(path, n))}
    return model.eval(), tok_files


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
                      dtype: str = "float32") -> dict:
    """Write checkpoint (``step`` or the newest complete) of ``src`` as a Hugging Face directory ``out``."""
    ckpt = resolve_checkpoint(src, step)
    model, tok_files = load_checkpoint_model(ckpt, dtype=dtype)
    out = Path(out)
    model.save_pretrained(out)
    for name, data in tok_files.items():
        (out / name).write_bytes(data)
    step_no = int(_STEP.match(os.path.basename(ckpt.rstrip("/")))[1])
    return {"checkpoint": ckpt, "step": step_no, "arch": model.config.arch, "out": str(out),
            "params": sum(p.numel() for p in model.parameters())}
