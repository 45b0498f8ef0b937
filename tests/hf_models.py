"""Tiny randomly initialised ``transformers`` models of every architecture bagualu claims, for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

V = 256
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def hf_configs() -> dict[str, "transformers.PretrainedConfig"]:
    """One config per architecture, each exercising its distinctive features."""
    T = transformers
    return {
        "llama": T.LlamaConfig(intermediate_size=96, **COMMON),
        "llama-tied-bias": T.LlamaConfig(intermediate_size=96, tie_word_embeddings=True, attention_bias=True,
                                         mlp_bias=True, **COMMON),
        "llama3-rope": T.LlamaConfig(intermediate_size=96, max_position_embeddings=64, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **COMMON),
        "mixtral": T.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **COMMON),
        "mixtral-sliding": T.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                           sliding_window=5, **COMMON),
        "qwen2_moe": T.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                      num_experts_per_tok=3, shared_expert_intermediate_size=80,
                                      decoder_sparse_step=1, mlp_only_layers=[1], **COMMON),
        "qwen3_moe": T.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                      num_experts_per_tok=3, norm_topk_prob=True, head_dim=24, **COMMON),
        "qwen3_moe-no-renorm": T.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                                num_experts_per_tok=2, norm_topk_prob=False, **COMMON),
        "deepseek-style": T.Dots1Config(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                        n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
                                        **COMMON),
    }


ARCH_OF = {"llama": "llama", "llama-tied-bias": "llama", "llama3-rope": "llama", "mixtral": "mixtral",
           "mixtral-sliding": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
           "qwen3_moe-no-renorm": "qwen3_moe", "deepseek-style": "dots1"}


def make_hf_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # non-zero, so the balancing bias is exercised
                b.copy_(torch.randn_like(b) * 0.05)
    return model


def save_hf_model(config, path: Path, seed: int = 0):
    model = make_hf_model(config, seed)
    model.save_pretrained(path)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error of a logit tensor."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
