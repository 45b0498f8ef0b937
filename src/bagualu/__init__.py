"""BaGuaLu (八卦炉): system software to train and serve Mixture-of-Experts language models on any accelerator.

Nothing heavy happens at import: subpackages (``bagualu.models``, ``bagualu.platform``, ...) are
imported by the user or on first attribute access.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("bagualu")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_SUBMODULES = ("cli", "engine", "models", "moe", "ops", "platform", "utils")
_ENGINE_NAMES = ("LLM", "SamplingParams", "EngineConfig")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"bagualu.{name}")
    if name in _ENGINE_NAMES:  # bagualu.LLM / bagualu.SamplingParams, as vllm.LLM
        return getattr(importlib.import_module("bagualu.engine"), name)
    raise AttributeError(f"module 'bagualu' has no attribute {name!r}")
