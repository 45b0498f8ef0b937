"""``save_pretrained``: write a ``CausalLM`` as a Hugging Face directory that ``transformers`` loads.

config.json (transformers 4.x dialect, which 5.x reads too; unknown keys of the source config kept),
safetensors weights (per-expert tensors, sharded with an index above ``max_shard_size``), and the
tokenizer files copied from the directory the model was loaded from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bagualu.models.hf.config import config_to_hf
from bagualu.models.hf.safetensors_io import parse_size, write_sharded
from bagualu.models.hf.weights import iter_hf_tensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


def save_pretrained(model, path: str | Path, *, max_shard_size: int | str = "5GB") -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    extra = None
    src = model.source_dir
    if src is not None and (src / "config.json").is_file():
        extra = json.loads((src / "config.json").read_text())
    hf = config_to_hf(cfg, extra)
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    state = model.state_dict()
    write_sharded(path, iter_hf_tensors(cfg.arch, state, cfg.tie_word_embeddings), parse_size(max_shard_size))
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if src is not None and src.resolve() != path.resolve():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, path / name)
