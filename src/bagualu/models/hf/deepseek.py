"""config.json ⇄ ``ModelConfig`` pieces for DeepSeek-V2 (``deepseek_v2``) and DeepSeek-V3 (``deepseek_v3``).

Both use MLA attention, shared experts (``n_shared_experts * moe_intermediate_size``, no gate) and dense
first layers (``first_k_dense_replace``); they differ in routing: V2 softmax with "greedy" or
"group_limited_greedy" choice (router ``softmax_group``), V3 sigmoid scores with a balancing bias and
group-limited choice (``sigmoid_bias``). Defaults are those of the ``transformers`` config classes,
since checkpoints omit default values. Where ``transformers`` departs from DeepSeek's own code we follow
``transformers`` (what the parity tests check) and say so below.
"""

from __future__ import annotations

from bagualu.models.config import MLAConfig, ModelConfig, MoEConfig
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def _moe_layers(raw: dict, n: int, first_dense_default: int) -> tuple[bool, ...]:
    """MoE where ``i >= first_k_dense_replace and i % moe_layer_freq == 0`` (DeepSeek's rule).

    transformers ignores ``moe_layer_freq`` (every released checkpoint has 1, where both agree).
    """
    k = raw.get("first_k_dense_replace", first_dense_default) or 0
    freq = raw.get("moe_layer_freq") or 1
    return tuple(i >= k and i % freq == 0 for i in range(n))


def _parse_mla(raw: dict, v2: bool) -> MLAConfig:
    return MLAConfig(
        q_lora_rank=raw.get("q_lora_rank", 1536), kv_lora_rank=raw.get("kv_lora_rank", 512),
        qk_nope_head_dim=raw.get("qk_nope_head_dim", 128), qk_rope_head_dim=raw.get("qk_rope_head_dim", 64),
        v_head_dim=raw.get("v_head_dim", 128),
        # V2 always rotates adjacent pairs (as complex numbers); V3 makes it a switch, on by default
        rope_interleave=True if v2 else bool(raw.get("rope_interleave", True)), rope_complex=v2,
    )


def parse_mla_v2(raw: dict) -> MLAConfig:
    return _parse_mla(raw, v2=True)


def parse_mla_v3(raw: dict) -> MLAConfig:
    return _parse_mla(raw, v2=False)


def parse_moe_v3(raw: dict, n: int) -> tuple[MoEConfig, tuple[bool, ...]]:
    m = MoEConfig(num_experts=raw.get("n_routed_experts", 256), top_k=raw.get("num_experts_per_tok") or 8,
                  ffn_dim=raw.get("moe_intermediate_size", 2048), router="sigmoid_bias",
                  norm_topk_prob=bool(raw.get("norm_topk_prob", True)), num_groups=raw.get("n_group", 8) or 1,
                  topk_groups=raw.get("topk_group", 4) or 1,
                  routed_scaling_factor=raw.get("routed_scaling_factor", 2.5),
                  num_shared_experts=raw.get("n_shared_experts", 1) or 0)
    return m, _moe_layers(raw, n, first_dense_default=3)


def parse_moe_v2(raw: dict, n: int) -> tuple[MoEConfig, tuple[bool, ...]]:
    method = raw.get("topk_method", "greedy")
    if method not in V2_TOPK_METHODS:
        raise ValueError(f"topk_method={method!r} is not supported for deepseek_v2; supported: "
                         f"{', '.join(V2_TOPK_METHODS)}")
    if raw.get("num_experts_per_tok") is None:
        raise KeyError("num_experts_per_tok")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported for deepseek_v2 (shared experts have no biases here); "
                         "no released checkpoint sets it")
    if raw.get("norm_topk_prob"):
        log.warning("deepseek_v2 config sets norm_topk_prob=true, which transformers' DeepseekV2 router "
                    "ignores; bagualu ignores it too, to give the same logits")
    grouped = method == "group_limited_greedy"
    m = MoEConfig(num_experts=raw.get("n_routed_experts", 64), top_k=raw["num_experts_per_tok"],
                  ffn_dim=raw.get("moe_intermediate_size", 1407), router="softmax_group", norm_topk_prob=False,
                  num_groups=(raw.get("n_group") or 1) if grouped else 1,
                  topk_groups=(raw.get("topk_group") or 1) if grouped else 1,
                  routed_scaling_factor=raw.get("routed_scaling_factor", 1.0),
                  num_shared_experts=raw.get("n_shared_experts", 2) or 0)
    return m, _moe_layers(raw, n, first_dense_default=0)


def _check_moe(c: ModelConfig, router: str) -> None:
    m = c.moe
    if m.router != router:
        raise ValueError(f"{c.arch} checkpoints route with {router!r}, not moe.router={m.router!r}; "
                         f"set moe.router={router!r} (or pick another arch)")
    if m.shared_expert_gate:
        raise ValueError(f"{c.arch} shared experts have no gate; set moe.shared_expert_gate=False")
    if m.shared_ffn_dim not in (None, m.num_shared_experts * m.ffn_dim):
        raise ValueError(f"{c.arch} shared experts are n_shared_experts * moe_intermediate_size wide; "
                         f"moe.shared_ffn_dim={m.shared_ffn_dim} != {m.num_shared_experts} * {m.ffn_dim} "
                         "(leave shared_ffn_dim=None)")


def _moe_to_hf(c: ModelConfig) -> dict:
    m = c.moe
    return {"n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.ffn_dim,
            "n_shared_experts": m.num_shared_experts, "routed_scaling_factor": m.routed_scaling_factor}


def moe_v3_to_hf(c: ModelConfig) -> dict:
    _check_moe(c, "sigmoid_bias")
    m = c.moe
    return {**_moe_to_hf(c), "n_group": m.num_groups, "topk_group": m.topk_groups,
            "norm_topk_prob": m.norm_topk_prob, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}


def moe_v2_to_hf(c: ModelConfig) -> dict:
    _check_moe(c, "softmax_group")
    m = c.moe
    if m.norm_topk_prob:
        raise ValueError("transformers' deepseek_v2 never renormalises the top-k weights; set moe.norm_topk_prob=False")
    method = "group_limited_greedy" if m.num_groups > 1 else "greedy"
    return {**_moe_to_hf(c), "n_group": m.num_groups, "topk_group": m.topk_groups, "topk_method": method,
            "norm_topk_prob": False, "scoring_func": "softmax"}


def _attn_and_layers_to_hf(c: ModelConfig) -> dict:
    if c.mla is None:
        raise ValueError(f"{c.arch} checkpoints use MLA attention; set mla=MLAConfig(...)")
    if c.mlp_bias:
        raise ValueError(f"{c.arch} MLPs have no biases; set mlp_bias=False")
    if c.qkv_bias != c.o_bias:
        raise ValueError(f"{c.arch} has one attention_bias flag; qkv_bias={c.qkv_bias} and o_bias={c.o_bias} "
                         "must be equal")
    moe = tuple(c.is_moe_layer(i) for i in range(c.num_layers))
    k = next((i for i, is_moe in enumerate(moe) if is_moe), c.num_layers)
    if not all(moe[k:]):
        raise ValueError(f"{c.arch} in transformers makes every layer from first_k_dense_replace on an MoE layer; "
                         f"moe_layers={list(moe)} is not of that form")
    a = c.mla
    return {"q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
            "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim, "qk_head_dim": a.qk_head_dim,
            "head_dim": a.qk_rope_head_dim, "num_key_value_heads": c.num_heads, "attention_bias": c.qkv_bias,
            "first_k_dense_replace": k, "moe_layer_freq": 1}


def v3_extra_to_hf(c: ModelConfig) -> dict:
    # the multi-token-prediction layers a loaded checkpoint had are not kept, so the saved one has none
    return {**_attn_and_layers_to_hf(c), "rope_interleave": c.mla.rope_interleave, "num_nextn_predict_layers": 0}


def v2_extra_to_hf(c: ModelConfig) -> dict:
    out = _attn_and_layers_to_hf(c)
    if not c.mla.rope_interleave:
        raise ValueError("deepseek_v2 always rotates adjacent pairs; set mla.rope_interleave=True "
                         "(or save as deepseek_v3, which has rope_interleave=false)")
    return {**out, "mlp_bias": False}
