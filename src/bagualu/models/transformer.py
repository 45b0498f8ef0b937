"""``CausalLM``: the decoder-only model family (Llama, Mixtral, Qwen2/3-MoE, dots1, DeepSeek-V2/V3 with MLA).

Legend: B batch, S sequence, D model dim, V vocab.

The module tree mirrors Hugging Face's (``model.embed_tokens``, ``model.layers.{i}...``, ``model.norm``,
``lm_head``), so state-dict names are HF names except for the MoE keys that ``models/hf/weights.py``
renames. Positions come from the attention mask (left padding gives every sequence positions 0, 1,
...), as ``transformers``' ``generate`` computes them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from bagualu.models.config import ModelConfig
from bagualu.models.layers import DecoderLayer, RMSNorm
from bagualu.models.rope import Rotary
from bagualu.moe import Experts, Router
from bagualu.ops.dense import Linear


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def make_masks(attention_mask_BS: torch.Tensor | None, S: int, windows: set[int | None],
               device: torch.device) -> dict[int | None, torch.Tensor | None]:
    """Boolean attention masks ``[B, S, S]`` (True = may attend) per sliding window (None = full).

    With no padding and no window the mask is None and attention runs causal without one. Every query
    may attend to itself, so a padding row is never all-masked (that would give NaN); padding rows'
    outputs are meaningless but finite.
    """
    if attention_mask_BS is None and windows == {None}:
        return {None: None}
    i = torch.arange(S, device=device)
    causal_SS = i[None, :] <= i[:, None]
    masks: dict[int | None, torch.Tensor | None] = {}
    for w in windows:
        m_SS = causal_SS if w is None else causal_SS & (i[:, None] - i[None, :] < w)
        m = m_SS.unsqueeze(0)
        if attention_mask_BS is not None:
            m = m & attention_mask_BS.bool()[:, None, :]
        masks[w] = m | torch.eye(S, dtype=torch.bool, device=device)
    return masks


class CausalLM(nn.Module):
    """``logits = model(input_ids, attention_mask=None, position_ids=None)`` → ``[B, S, V]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        self.source_dir: Path | None = None  # where tokenizer files are copied from on save
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids))

    def hidden_states(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None,
                      position_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[B, S, D]`` (the LM head's input)."""
        if input_ids_BS.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids_BS.shape)}")
        B, S = input_ids_BS.shape
        if attention_mask_BS is not None and attention_mask_BS.shape != (B, S):
            raise ValueError(f"attention_mask shape {tuple(attention_mask_BS.shape)} != input_ids shape {(B, S)}")
        dev = input_ids_BS.device
        if position_ids_BS is None:
            if attention_mask_BS is None:
                position_ids_BS = torch.arange(S, device=dev).expand(B, S)
            else:
                position_ids_BS = (attention_mask_BS.long().cumsum(-1) - 1).clamp_min(0)
        x_BSD = self.model.embed_tokens(input_ids_BS)
        cos_sin = self.rotary(position_ids_BS, x_BSD.dtype)
        windows = {layer.window for layer in self.model.layers}
        masks = make_masks(attention_mask_BS, S, windows, dev)
        for layer in self.model.layers:
            x_BSD = layer(x_BSD, cos_sin, masks[layer.window])
        return self.model.norm(x_BSD)

    def fuse_projections(self) -> None:
        """Inference only: fuse q/k/v and gate/up projections into single GEMMs (see the modules' method)."""
        for m in self.modules():
            if m is not self and hasattr(m, "fuse_projections"):
                m.fuse_projections()

    @torch.no_grad()
    def narrow_projections(self, dtype: torch.dtype) -> None:
        """Inference only, where the platform's ``linear`` reads ``dtype`` weights as stored
        (``ops.linear_weight_dtypes``): every projection the serving path multiplies through it — fused
        q/k/v and gate/up, o and down projections, experts, an untied LM head — stored in ``dtype``, the
        rest (embeddings, norms, routers, biases) and so the activations as they are. From a bf16 checkpoint
        loaded in fp32 this is exact: the same values in half the bytes a decode step streams."""
        for m in self.modules():  # each module fuses its projections first
            if m is not self and hasattr(m, "narrow_projections"):
                m.narrow_projections(dtype)
        if self.lm_head.weight is not self.model.embed_tokens.weight:
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.to(dtype), requires_grad=False)

    def on_moefy(self, settings: dict) -> None:
        """After ``bagualu.moe.moefy``: describe the upcycled model; a Llama becomes a Mixtral-style model."""
        import dataclasses

        from bagualu.models.config import MoEConfig

        moe = MoEConfig(num_experts=settings["num_experts"], top_k=settings["top_k"], ffn_dim=settings["ffn_dim"],
                        router=settings["router"], norm_topk_prob=settings.get("norm_topk_prob", True))
        arch = "mixtral" if self.config.arch == "llama" else self.config.arch
        self.config = dataclasses.replace(self.config, arch=arch, moe=moe, moe_layers=(True,) * self.config.num_layers)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random initialisation (normal(0, std) matrices, unit norms, zero biases), as HF's ``_init_weights``."""
        g = torch.Generator(device=self.device)
        if seed is not None:
            g.manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=g)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, Experts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    p.normal_(0.0, std, generator=g)
            elif isinstance(m, Router):
                m.weight.normal_(0.0, std, generator=g)
                if hasattr(m, "w_noise"):  # noisy_topk: zero noise weights, as Shazeer et al. start
                    m.w_noise.zero_()
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.zero_()
        self.tie_weights()

    def save_pretrained(self, path: str | Path, *, max_shard_size: int | str = "5GB") -> None:
        """Write the Hugging Face layout: config.json, safetensors (sharded + index when large), tokenizer."""
        from bagualu.models.hf.save import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)
