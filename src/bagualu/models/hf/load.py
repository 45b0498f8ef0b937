"""``from_pretrained``: a Hugging Face model directory → a ``CausalLM`` on the platform device.

The model is built on the meta device (no memory, no init kernels), materialised empty on the target
device in the target dtype, then every parameter is filled from the checkpoint exactly once; a
tensor that is missing, unexpected or mis-shaped is an error naming the file and the tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from bagualu.models.config import ModelConfig
from bagualu.models.errors import ModelLoadError
from bagualu.models.hf.config import ARCHS, parse_config
from bagualu.models.hf.safetensors_io import checkpoint_files, iter_tensors
from bagualu.models.hf.weights import IGNORED, hf_to_targets
from bagualu.models.transformer import CausalLM
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

CONFIG = "config.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def resolve_dtype(dtype: torch.dtype | str | None, default: str) -> torch.dtype:
    name = dtype if dtype is not None else default
    if isinstance(name, torch.dtype):
        return name
    name = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(
        str(name), str(name))
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype (try float32, bfloat16, float16)")
    return dt


def read_config(path: Path) -> tuple[ModelConfig, dict]:
    if not path.exists():
        raise ModelLoadError(path, None, "model directory does not exist")
    if not path.is_dir():
        raise ModelLoadError(path, None, "is not a directory (expected a Hugging Face model directory)")
    f = path / CONFIG
    if not f.is_file():
        raise ModelLoadError(path, CONFIG, "is missing; a Hugging Face model directory holds config.json "
                             "and model.safetensors (or sharded safetensors with an index)")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(path, CONFIG, f"is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(path, CONFIG, "must hold a JSON object")
    try:
        return parse_config(raw), raw
    except KeyError as e:
        raise ModelLoadError(path, CONFIG, f"lacks the required key {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise ModelLoadError(path, CONFIG, str(e)) from None


def materialize(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """An uninitialised model on ``device``: parameters in ``dtype``, buffers keep their own dtype."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for b in model.buffers():  # buffers are state with a defined start (e.g. a zero routing bias)
            b.zero_()
    model.tie_weights()  # to_empty replaces parameters, which unties shared ones
    return model


def _default_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    from bagualu.platform import current_platform

    return current_platform().current_device()


def from_pretrained(path: str | Path, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None) -> CausalLM:
    """Load a Hugging Face checkpoint; ``device`` defaults to the current platform's, ``dtype`` to the checkpoint's."""
    path = Path(path)
    cfg, raw = read_config(path)
    files = checkpoint_files(path)
    model = materialize(cfg, _default_device(device), resolve_dtype(dtype, cfg.dtype))
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    filled: dict[str, int] = {}  # name -> slices filled (experts count slices; others count 1)
    mtp: set[int] = set()  # checkpoint layers past num_hidden_layers that were skipped

    def skip(hf_name: str) -> bool:
        if IGNORED.search(hf_name):
            return True
        m = _LAYER.match(hf_name) if ARCHS[cfg.arch].mtp_layers else None
        if m and int(m[1]) >= cfg.num_layers:
            mtp.add(int(m[1]))
            return True
        return False

    with torch.no_grad():
        for fname, hf_name, t in iter_tensors(path, files, skip=skip):
            for tgt in hf_to_targets(cfg.arch, hf_name, tuple(t.shape)):
                if tgt.name not in params:
                    raise ModelLoadError(path, fname, f"holds unexpected tensor {hf_name!r} for a {cfg.arch} "
                                         f"model with this config.json (is the config for these weights?)")
                dst = params[tgt.name]
                if tgt.expert is not None:
                    dst = dst[tgt.expert]
                src = t if tgt.rows is None else t[:, tgt.rows]
                if tuple(dst.shape) != tuple(src.shape):
                    raise ModelLoadError(path, fname, f"tensor {hf_name!r} has shape {tuple(src.shape)} but the "
                                         f"config.json implies {tuple(dst.shape)}")
                dst.copy_(src)
                filled[tgt.name] = filled.get(tgt.name, 0) + (1 if tgt.expert is not None else dst.shape[0])
    if mtp:
        log.warning("%s: skipped checkpoint layers %s past num_hidden_layers=%d (multi-token-prediction modules, "
                    "which bagualu does not run; a model saved from this one will not have them)",
                    path, sorted(mtp), cfg.num_layers)
    _check_complete(path, files, model, params, filled)
    model.source_dir = path
    model.eval()
    log.debug("loaded %s (%s, %d tensors) from %s", cfg.arch, model.dtype, len(filled), path)
    return model


def _check_complete(path, files, model, params, filled) -> None:
    tied = model.config.tie_word_embeddings
    missing = []
    for name, p in params.items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("e_score_correction_bias") and name not in filled:
            continue  # optional in checkpoints: zero means "no balancing correction yet"
        need = p.shape[0] if p.dim() else 1
        if filled.get(name, 0) < need:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(path, files[0] if len(files) == 1 else "model.safetensors.index.json",
                             f"lacks tensors the config.json requires: {shown}")
