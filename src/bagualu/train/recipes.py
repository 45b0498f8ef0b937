"""Recipes: Python functions returning a ``RunConfig``. Tiny ones run on a laptop CPU in minutes;
realistic shapes are what a GPU cluster would run (and fail fast here with a memory estimate).
"""

from __future__ import annotations

from typing import Callable

from bagualu.models.config import ModelConfig, MoEConfig, RopeConfig
from bagualu.train.config import DataConfig, RunConfig, TrainConfig


def tiny_moe() -> RunConfig:
    """A Mixtral-style MoE of ~13M parameters: 6 layers, 8 experts top-2, trained for 300 steps."""
    model = ModelConfig(arch="mixtral", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=6,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=1024, rope=RopeConfig(theta=1e4),
                        moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=512))
    return RunConfig(model=model, train=TrainConfig(), data=DataConfig())


def tiny_dense() -> RunConfig:
    model = ModelConfig(arch="llama", vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=1024)
    return RunConfig(model=model, train=TrainConfig(), data=DataConfig())


def mixtral_8x7b() -> RunConfig:
    model = ModelConfig(arch="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, max_position_embeddings=32768, rope=RopeConfig(theta=1e6),
                        moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=14336))
    return RunConfig(model=model, train=TrainConfig(global_batch=512, seq_len=4096, lr=3e-4, warmup=2000,
                                                    steps=100_000), data=DataConfig(vocab_size=32000))


def qwen_moe() -> RunConfig:
    """Qwen1.5-MoE-A2.7B shape: 60 fine-grained experts top-4 plus a gated shared expert."""
    model = ModelConfig(arch="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_layers=24,
                        num_heads=16, num_kv_heads=16, max_position_embeddings=8192, qkv_bias=True,
                        rope=RopeConfig(theta=1e6),
                        moe=MoEConfig(num_experts=60, top_k=4, ffn_dim=1408, norm_topk_prob=False,
                                      shared_ffn_dim=5632, shared_expert_gate=True))
    return RunConfig(model=model, train=TrainConfig(global_batch=512, seq_len=4096, lr=3e-4, warmup=2000,
                                                    steps=100_000), data=DataConfig(vocab_size=151936))


def deepseek_moe_16b() -> RunConfig:
    """DeepSeek-MoE-16B shape: 64 routed experts top-6, 2 shared, first layer dense."""
    model = ModelConfig(arch="qwen2_moe", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                        num_layers=28, num_heads=16, num_kv_heads=16, max_position_embeddings=4096,
                        moe=MoEConfig(num_experts=64, top_k=6, ffn_dim=1408, norm_topk_prob=False,
                                      num_shared_experts=2),
                        moe_layers=(False,) + (True,) * 27)
    return RunConfig(model=model, train=TrainConfig(global_batch=512, seq_len=4096, lr=4.2e-4, warmup=2000,
                                                    steps=100_000), data=DataConfig(vocab_size=102400))


RECIPES: dict[str, Callable[[], RunConfig]] = {
    "tiny-moe": tiny_moe, "tiny-dense": tiny_dense, "mixtral-8x7b": mixtral_8x7b, "qwen-moe": qwen_moe,
    "deepseek-moe-16b": deepseek_moe_16b,
}


def recipe(name: str) -> RunConfig:
    try:
        return RECIPES[name]()
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None
