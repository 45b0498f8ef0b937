"""``LLM``: the offline API — load a model directory, generate for a list of prompts, in vLLM's convention.

    llm = bagualu.LLM("path/to/hf_dir", r_workers=2)
    outs = llm.generate(["Hello", [1, 2, 3]], bagualu.SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].outputs[0].finish_reason

Options are ``EngineConfig`` fields. Outputs come back in prompt order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from bagualu.engine.config import EngineConfig
from bagualu.engine.core import EngineCore
from bagualu.engine.outputs import RequestOutput
from bagualu.engine.params import SamplingParams
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

Prompt = str | list[int]


def normalize_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """A string, a list of token ids, or a list of either → a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]
    for p in prompts:
        if not (isinstance(p, str) or (isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p))):
            raise TypeError(f"a prompt must be a string or a list of token ids; got {type(p).__name__}")
    return [p if isinstance(p, str) else list(p) for p in prompts]


def resolve_dtypes(model_dir: str, config: EngineConfig):
    """(dtype to load the weights in, dtype to store the projections in, config with ``kv_cache_dtype``
    filled in).

    A half-precision model on a platform whose half GEMMs are slower than fp32 (measured; bf16 on AVX2
    CPUs runs ~100x slower than fp32 there) loads in fp32 — bf16 values are exact in fp32, so the model is
    the same, only the rounding of each GEMM's output differs — and keeps the KV cache in the half dtype,
    which halves the R-part's memory traffic. With ``gemm_dtype="auto"`` its projections then go back to
    the half dtype where the platform's ``linear`` reads such weights as stored (bf16 on CPU): the
    activations stay fp32, and a decode step streams half the bytes.
    """
    import dataclasses

    import torch

    from bagualu.models.hf.load import _default_device, read_config, resolve_dtype
    from bagualu.ops.reference import gemm_via_fp32
    from bagualu.ops import linear_weight_dtypes

    cfg, _ = read_config(Path(model_dir))
    dtype = resolve_dtype(config.dtype, cfg.dtype)
    kv = resolve_dtype(config.kv_cache_dtype, str(dtype).removeprefix("torch.")) if config.kv_cache_dtype else dtype
    weights = projections = dtype
    if config.gemm_dtype != "model" and gemm_via_fp32(dtype, _default_device(config.device).type):
        weights = torch.float32
        projections = dtype if config.gemm_dtype == "auto" and dtype in linear_weight_dtypes() else weights
        log.info("engine: %s GEMMs are slower than fp32 on this platform; they run in fp32 (projection weights "
                 "stored in %s), KV cache in %s", dtype, projections, kv)
    return weights, projections, dataclasses.replace(config, kv_cache_dtype=str(kv).removeprefix("torch."))


def load_engine(model_dir: str, config: EngineConfig, tokenizer=None) -> EngineCore:
    """Load a Hugging Face directory into an ``EngineCore`` (the one loader of ``LLM`` and ``bagualu serve``).
    ``tokenizer``: a loaded tokenizer, a directory to load one from, or None for ``model_dir``'s."""
    from bagualu.models import from_pretrained, load_tokenizer

    weights_dtype, projections, config = resolve_dtypes(model_dir, config)  # a bad directory fails here
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer or model_dir)
    model = from_pretrained(model_dir, device=config.device, dtype=weights_dtype)
    if projections != weights_dtype:
        model.narrow_projections(projections)
    return EngineCore(model, tokenizer, config)


class LLM:
    def __init__(self, model: str, *, tokenizer: str | None = None, **options):
        self.engine = load_engine(model, EngineConfig(**options), tokenizer)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_model(cls, model, tokenizer, **options) -> "LLM":
        """An engine over an already-loaded ``CausalLM`` (tests, notebooks)."""
        self = cls.__new__(cls)
        self.engine = EngineCore(model, tokenizer, EngineConfig(**options))
        self.tokenizer = tokenizer
        self._ids = itertools.count()
        return self

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = normalize_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts; give one or one each")
        ids = []
        for p, sp in zip(prompts, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, p, sp)
            ids.append(rid)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req", dynamic_ncols=True)
        try:
            while len(done) < len(ids):
                for out in self.engine.step(finished_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    m = self.engine.metrics
                    bar.set_postfix(running=m.num_running, waiting=m.num_waiting, kv=f"{m.kv_usage:.0%}",
                                    refresh=False)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            self.engine.step()  # drain the aborted outputs
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in ids]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
