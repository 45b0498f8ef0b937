"""Parallelism-free model definitions and their Hugging Face adapters.

    model = bagualu.models.from_pretrained("path/to/hf_dir")      # device: the platform's
    logits_BSV = model(input_ids_BS, attention_mask_BS)
    model.save_pretrained("out_dir")                              # transformers loads it
    tok = bagualu.models.load_tokenizer("path/to/hf_dir")
"""

from bagualu.models.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig
from bagualu.models.errors import ModelLoadError
from bagualu.models.hf.config import ARCHS
from bagualu.models.hf.load import from_pretrained
from bagualu.models.transformer import CausalLM


def from_config(config: ModelConfig, *, device=None, dtype=None, seed: int | None = 0) -> CausalLM:
    """A randomly initialised model (normal(0, 0.02)) built on the meta device, materialised on ``device``."""
    from bagualu.models.hf.load import _default_device, materialize, resolve_dtype

    model = materialize(config, _default_device(device), resolve_dtype(dtype, config.dtype))
    model.init_weights(seed=seed)
    return model


def load_tokenizer(path):
    from bagualu.models.tokenizer import load_tokenizer as _load

    return _load(path)


SUPPORTED_ARCHS = tuple(ARCHS)

__all__ = ["CausalLM", "ModelConfig", "MoEConfig", "MLAConfig", "RopeConfig", "ModelLoadError", "from_pretrained",
           "from_config", "load_tokenizer", "SUPPORTED_ARCHS"]
