"""Named model shapes (flavours): tiny ones for tests, demos and CI; realistic ones come with training.

A flavour is a function returning a ``ModelConfig``; ``bagualu init-model FLAVOUR DIR`` saves a randomly
initialised one with a byte-level tokenizer as a Hugging Face directory.
"""

from __future__ import annotations

from typing import Callable

from bagualu.models.config import MLAConfig, ModelConfig, MoEConfig

BYTE_VOCAB = 320  # 256 bytes + 3 specials, padded to a multiple of 64


def _tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=BYTE_VOCAB, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                num_kv_heads=2, max_position_embeddings=2048, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    base.update(kw)
    return ModelConfig(**base)


FLAVOURS: dict[str, Callable[[], ModelConfig]] = {
    "tiny-llama": lambda: _tiny(arch="llama", tie_word_embeddings=True),
    "tiny-mixtral": lambda: _tiny(arch="mixtral", intermediate_size=256,
                                  moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=256)),
    "tiny-qwen2-moe": lambda: _tiny(arch="qwen2_moe", qkv_bias=True, moe=MoEConfig(
        num_experts=16, top_k=4, ffn_dim=64, norm_topk_prob=False, shared_ffn_dim=256, shared_expert_gate=True),
        moe_layers=(True,) * 4),
    "tiny-qwen3-moe": lambda: _tiny(arch="qwen3_moe", qk_norm=True, moe=MoEConfig(
        num_experts=16, top_k=4, ffn_dim=64), moe_layers=(True,) * 4),
    "tiny-deepseek": lambda: _tiny(arch="dots1", qk_norm=True, moe=MoEConfig(
        num_experts=16, top_k=4, ffn_dim=64, router="sigmoid_bias", num_groups=4, topk_groups=2,
        routed_scaling_factor=2.5, num_shared_experts=2), moe_layers=(False, True, True, True)),
    # DeepSeek-V3's layout shrunk: MLA (q and kv compressed, 16 of 48 query/key features rotated), one shared
    # expert, sigmoid routing over 4 groups, a dense first layer
    "tiny-deepseek-v3": lambda: _tiny(arch="deepseek_v3", num_kv_heads=4, mla=MLAConfig(
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32), moe=MoEConfig(
        num_experts=16, top_k=4, ffn_dim=64, router="sigmoid_bias", num_groups=4, topk_groups=2,
        routed_scaling_factor=2.5, num_shared_experts=1), moe_layers=(False, True, True, True)),
}


def flavour(name: str) -> ModelConfig:
    try:
        return FLAVOURS[name]()
    except KeyError:
        raise ValueError(f"unknown flavour {name!r}; known: {', '.join(FLAVOURS)}") from None
