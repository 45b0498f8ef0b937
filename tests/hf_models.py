"""Tiny randomly initialised ``transformers`` models of every architecture bagualu claims, for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

V = 256
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
MLA_COMMON = dict(COMMON, num_key_value_heads=4)  # MLA expands its latent to one key/value per head
# DeepSeek-V3's own long-context RoPE (yarn; mscale_all_dim also rescales the softmax), shrunk
DS_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}


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
        # MLA with q compression, interleaved rope, sigmoid routing in 4 groups, a dense first layer, yarn
        "deepseek_v3": T.DeepseekV3Config(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                          n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
                                          first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=24,
                                          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                          max_position_embeddings=64, rope_parameters=DS_YARN, **MLA_COMMON),
        "deepseek_v3-half-rope": T.DeepseekV3Config(intermediate_size=96, moe_intermediate_size=32,
                                                    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                                    n_group=1, topk_group=1, norm_topk_prob=False,
                                                    first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                                                    qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=16,
                                                    rope_interleave=False, attention_bias=True, **MLA_COMMON),
        # DeepSeek-V2-Lite-like: no q compression; V2's complex-number rope and group-limited softmax routing
        "deepseek_v2": T.DeepseekV2Config(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                          n_shared_experts=2, num_experts_per_tok=3, topk_method="group_limited_greedy",
                                          n_group=4, topk_group=2, routed_scaling_factor=1.5,
                                          first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=24,
                                          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, **MLA_COMMON),
        "deepseek_v2-greedy-yarn": T.DeepseekV2Config(intermediate_size=96, moe_intermediate_size=32,
                                                      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                                      topk_method="greedy", q_lora_rank=32, kv_lora_rank=24,
                                                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                                      max_position_embeddings=64, rope_parameters={
                                                          **DS_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
                                                      **MLA_COMMON),
    }


ARCH_OF = {"llama": "llama", "llama-tied-bias": "llama", "llama3-rope": "llama", "mixtral": "mixtral",
           "mixtral-sliding": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
           "qwen3_moe-no-renorm": "qwen3_moe", "deepseek-style": "dots1", "deepseek_v3": "deepseek_v3",
           "deepseek_v3-half-rope": "deepseek_v3", "deepseek_v2": "deepseek_v2",
           "deepseek_v2-greedy-yarn": "deepseek_v2"}


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


def save_byte_level_llama(path: Path, **overrides) -> Path:
    """The tiny Llama with the byte-level tokenizer's vocabulary (259: bytes, BOS 256, EOS 257), saved with
    that tokenizer: engine tests that need text in and out."""
    from bagualu.models.byte_tokenizer import byte_level_tokenizer

    cfg = hf_configs()["llama"]
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id = 259, 256, 257
    for k, v in overrides.items():
        setattr(cfg, k, v)
    save_hf_model(cfg, path)
    byte_level_tokenizer().save(path)
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error of a logit tensor."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
