"""config.json ⇄ ``ModelConfig`` for each supported Hugging Face architecture.

One ``ArchSpec`` per ``model_type``: how to read its keys (with the defaults its ``transformers``
config class uses, since checkpoints omit default values) and how to write them back. Unknown
keys of a loaded config are kept verbatim on save (``ModelConfig`` is the source of truth for the
keys we understand).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bagualu.models.config import MLAConfig, ModelConfig, MoEConfig
from bagualu.models.hf import deepseek
from bagualu.models.hf.rope import parse_rope, rope_to_hf


def _no_mla(raw: dict) -> None:
    return None


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    model_type: str
    architecture: str  # the class name transformers instantiates
    default_theta: float
    parse_moe: Callable[[dict, int], tuple[MoEConfig | None, tuple[bool, ...] | None]]
    moe_to_hf: Callable[[ModelConfig], dict]
    qk_norm: bool = False
    qkv_bias: Callable[[dict], bool] = lambda raw: bool(raw.get("attention_bias", False))
    o_bias: Callable[[dict], bool] = lambda raw: bool(raw.get("attention_bias", False))
    layer_types: Callable[[dict, int], tuple[str, ...] | None] = lambda raw, n: None
    parse_mla: Callable[[dict], MLAConfig | None] = _no_mla
    extra_to_hf: Callable[[ModelConfig], dict] = lambda c: {}  # keys beyond the common ones and the MoE's
    # checkpoints may hold multi-token-prediction layers after the last decoder layer (DeepSeek-V3 ships
    # one); loading skips them with a warning, since the model runs only the decoder layers
    mtp_layers: bool = False

    @property
    def uses_mla(self) -> bool:
        return self.parse_mla is not _no_mla


def _num_experts(raw: dict, default: int) -> int:
    # transformers 4.x writes num_experts; 5.x writes Qwen3-MoE's as num_local_experts
    return raw.get("num_experts", raw.get("num_local_experts", default))


def _qwen_moe_layers(raw: dict, n: int) -> tuple[bool, ...]:
    only = set(raw.get("mlp_only_layers") or [])
    step = raw.get("decoder_sparse_step", 1)
    ne = _num_experts(raw, 0)
    return tuple(i not in only and ne > 0 and (i + 1) % step == 0 for i in range(n))


def _window_layers(raw: dict, n: int) -> tuple[str, ...] | None:
    if raw.get("layer_types"):
        return tuple(raw["layer_types"])
    if raw.get("sliding_window") is None or raw.get("use_sliding_window") is False:
        return None
    start = raw.get("max_window_layers", n)
    return tuple("sliding_attention" if i >= start else "full_attention" for i in range(n))


def _none(raw, n):
    return None, None


def _mixtral_moe(raw, n):
    return MoEConfig(num_experts=raw.get("num_local_experts", 8), top_k=raw.get("num_experts_per_tok", 2),
                     ffn_dim=raw["intermediate_size"], router="softmax_topk", norm_topk_prob=True), None


def _qwen2_moe(raw, n):
    m = MoEConfig(num_experts=_num_experts(raw, 60), top_k=raw.get("num_experts_per_tok", 4),
                  ffn_dim=raw.get("moe_intermediate_size", 1408), norm_topk_prob=raw.get("norm_topk_prob", False),
                  shared_ffn_dim=raw.get("shared_expert_intermediate_size", 5632), shared_expert_gate=True)
    return m, _qwen_moe_layers(raw, n)


def _qwen3_moe(raw, n):
    m = MoEConfig(num_experts=_num_experts(raw, 128), top_k=raw.get("num_experts_per_tok", 8),
                  ffn_dim=raw.get("moe_intermediate_size", 768), norm_topk_prob=raw.get("norm_topk_prob", False))
    return m, _qwen_moe_layers(raw, n)


def _dots1_moe(raw, n):
    ns = raw.get("n_shared_experts") or 0
    m = MoEConfig(num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"],
                  ffn_dim=raw.get("moe_intermediate_size", 1408), router="sigmoid_bias",
                  norm_topk_prob=raw.get("norm_topk_prob", False), num_groups=raw.get("n_group") or 1,
                  topk_groups=raw.get("topk_group") or 1, routed_scaling_factor=raw.get("routed_scaling_factor", 1.0),
                  num_shared_experts=ns)
    k = raw.get("first_k_dense_replace") or 0
    return m, tuple(i >= k for i in range(n))


def _mixtral_to_hf(c: ModelConfig) -> dict:
    return {"num_local_experts": c.moe.num_experts, "num_experts_per_tok": c.moe.top_k}


def _qwen_layers_to_hf(c: ModelConfig) -> dict:
    only = [i for i, moe in enumerate(c.moe_layers or ()) if not moe]
    return {"num_experts": c.moe.num_experts, "num_experts_per_tok": c.moe.top_k,
            "moe_intermediate_size": c.moe.ffn_dim, "norm_topk_prob": c.moe.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": only}


def _qwen2_to_hf(c: ModelConfig) -> dict:
    return {**_qwen_layers_to_hf(c), "shared_expert_intermediate_size": c.moe.shared_ffn_dim,
            "qkv_bias": c.qkv_bias}


def _dots1_to_hf(c: ModelConfig) -> dict:
    m = c.moe
    k = next((i for i, moe in enumerate(c.moe_layers or ()) if moe), c.num_layers)
    if c.moe_layers and not all(c.moe_layers[k:]):
        raise ValueError("dots1 checkpoints need MoE layers to be exactly the layers after the first dense ones")
    return {"n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.ffn_dim,
            "n_shared_experts": m.num_shared_experts, "n_group": m.num_groups, "topk_group": m.topk_groups,
            "routed_scaling_factor": m.routed_scaling_factor, "norm_topk_prob": m.norm_topk_prob,
            "first_k_dense_replace": k}


ARCHS: dict[str, ArchSpec] = {
    s.model_type: s
    for s in [
        ArchSpec(model_type="llama", architecture="LlamaForCausalLM", default_theta=10000.0,
                 parse_moe=_none, moe_to_hf=lambda c: {}),
        ArchSpec(model_type="mixtral", architecture="MixtralForCausalLM", default_theta=1e6,
                 parse_moe=_mixtral_moe, moe_to_hf=_mixtral_to_hf, qkv_bias=lambda r: False,
                 o_bias=lambda r: False),
        ArchSpec(model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", default_theta=10000.0,
                 parse_moe=_qwen2_moe, moe_to_hf=_qwen2_to_hf, qkv_bias=lambda r: bool(r.get("qkv_bias", True)),
                 o_bias=lambda r: False, layer_types=_window_layers),
        ArchSpec(model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", default_theta=10000.0,
                 parse_moe=_qwen3_moe, moe_to_hf=_qwen_layers_to_hf, qk_norm=True, layer_types=_window_layers),
        ArchSpec(model_type="dots1", architecture="Dots1ForCausalLM", default_theta=10000.0,
                 parse_moe=_dots1_moe, moe_to_hf=_dots1_to_hf, qk_norm=True, layer_types=_window_layers),
        ArchSpec(model_type="deepseek_v2", architecture="DeepseekV2ForCausalLM", default_theta=10000.0,
                 parse_moe=deepseek.parse_moe_v2, moe_to_hf=deepseek.moe_v2_to_hf, parse_mla=deepseek.parse_mla_v2,
                 extra_to_hf=deepseek.v2_extra_to_hf),
        ArchSpec(model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM", default_theta=10000.0,
                 parse_moe=deepseek.parse_moe_v3, moe_to_hf=deepseek.moe_v3_to_hf, parse_mla=deepseek.parse_mla_v3,
                 extra_to_hf=deepseek.v3_extra_to_hf, mtp_layers=True),
    ]
}


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Raise ``KeyError`` (missing key) or ``ValueError`` (bad value); the loader adds the file name."""
    mt = raw.get("model_type")
    if mt not in ARCHS:
        raise ValueError(f"model_type {mt!r} is not supported; supported: {', '.join(ARCHS)}")
    spec = ARCHS[mt]
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r} is not supported (the family uses SwiGLU: 'silu')")
    n = raw["num_hidden_layers"]
    moe, moe_layers = spec.parse_moe(raw, n)
    layer_types = spec.layer_types(raw, n)
    window = raw.get("sliding_window")
    if mt in ("qwen2_moe", "qwen3_moe") and not raw.get("use_sliding_window", False):
        window, layer_types = None, None
    if layer_types is not None and "sliding_attention" not in layer_types:
        window, layer_types = None, None
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    mla = spec.parse_mla(raw)
    if mla is not None:  # the latent expands to one key/value per head; num_key_value_heads plays no part
        kv_heads = heads
    return ModelConfig(
        arch=mt,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw.get("intermediate_size", 0),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=None if mla is not None else raw.get("head_dim"),  # MLA's head_dim key is its rope width
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rope=parse_rope(raw, spec.default_theta),
        qkv_bias=spec.qkv_bias(raw),
        o_bias=spec.o_bias(raw),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=spec.qk_norm,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=window or None,
        layer_types=layer_types,
        moe=moe,
        moe_layers=moe_layers,
        mla=mla,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
    )


_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor")


def config_to_hf(c: ModelConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config.json dict in the transformers 4.x dialect (which 5.x also reads)."""
    spec = ARCHS[c.arch]
    if (c.mla is not None) != spec.uses_mla:
        mla_archs = [a for a, s in ARCHS.items() if s.uses_mla]
        raise ValueError(f"arch={c.arch!r} {'does not use' if c.mla is not None else 'needs'} MLA attention "
                         f"(mla={c.mla}); MLA architectures: {', '.join(mla_archs)}")
    _check_expressible(c)
    out = {k: v for k, v in (extra or {}).items() if k not in _ROPE_KEYS}
    out.update(
        architectures=[spec.architecture], model_type=c.arch, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.dim_head, hidden_act="silu", rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        torch_dtype=c.dtype,
    )
    out.pop("dtype", None)
    if c.arch == "llama":
        out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    elif c.arch in ("qwen3_moe", "dots1"):
        out["attention_bias"] = c.qkv_bias
    out.update(rope_to_hf(c.rope))
    if c.sliding_window is not None:
        out["sliding_window"] = c.sliding_window
        if c.layer_types is not None:
            out["layer_types"] = list(c.layer_types)
        if c.arch in ("qwen2_moe", "qwen3_moe"):
            out["use_sliding_window"] = True
    elif c.arch in ("mixtral", "dots1", "qwen2_moe", "qwen3_moe"):
        out["sliding_window"] = None
        out.pop("layer_types", None)
        if c.arch in ("qwen2_moe", "qwen3_moe"):
            out["use_sliding_window"] = False
    if c.moe is not None:
        out.update(spec.moe_to_hf(c))
    out.update(spec.extra_to_hf(c))
    return out


def _check_expressible(c: ModelConfig) -> None:
    """Refuse to write a config.json that would make transformers build a different model."""
    problems = []
    if c.arch == "llama" and c.moe is not None:
        problems.append("a Llama checkpoint cannot hold MoE layers (an upcycled Llama saves as mixtral)")
    if c.arch == "mixtral":
        if c.qkv_bias or c.o_bias:
            problems.append("Mixtral has no attention biases")
        m = c.moe
        if m is not None and not (m.router in ("softmax_topk", "topk_softmax") and
                                  (m.norm_topk_prob or m.router == "topk_softmax")):
            problems.append(f"Mixtral routes softmax → top-k → renormalise, not router={m.router!r} "
                            f"with norm_topk_prob={m.norm_topk_prob}")
        if m is not None and (m.shared_ffn_dim or m.num_shared_experts):
            problems.append("Mixtral has no shared experts")
        if c.moe_layers is not None and not all(c.moe_layers):
            problems.append("every Mixtral layer is an MoE layer")
    if problems:
        raise ValueError(f"cannot save as {c.arch!r}: " + "; ".join(problems))
