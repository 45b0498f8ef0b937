"""Rotary position embeddings: inverse frequencies for each scaling variant, and cos/sin per position.

Frequencies are computed exactly as Hugging Face ``transformers`` does (same dtypes, same formulas),
so positions rotate identically and loaded models reproduce its logits. Variants: default, linear
(position interpolation), dynamic (NTK, frequencies rescaled when the sequence outgrows the
original context), llama3 (Llama 3.1 band-wise smoothing), yarn (DeepSeek/Qwen long context).
"""

from __future__ import annotations

import math

import torch

from bagualu.models.config import ModelConfig, RopeConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(r: RopeConfig, dim: int, max_pos: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(r.theta, dim)
    old = r.original_max_position_embeddings or max_pos
    low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched ``scale`` times (also MLA's softmax scale)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(r: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    old = r.original_max_position_embeddings or max_pos
    factor = r.factor
    attention_factor = r.attention_factor
    if attention_factor is None:
        if r.mscale and r.mscale_all_dim:
            attention_factor = yarn_mscale(factor, r.mscale) / yarn_mscale(factor, r.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def corr_dim(rot: float) -> float:
        return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(r.theta))

    low, high = corr_dim(r.beta_fast), corr_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = r.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def inv_freq_and_scale(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rot_dim/2] fp32 on CPU, attention scaling of cos/sin)."""
    with torch.device("cpu"):  # real values even when the model is being built on the meta device
        return _inv_freq_and_scale(cfg, seq_len)


def _inv_freq_and_scale(cfg: ModelConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    r = cfg.rope
    dim = cfg.rope_dim
    max_pos = cfg.max_position_embeddings
    if r.type == "default":
        return _base_inv_freq(r.theta, dim), 1.0
    if r.type == "linear":
        return _base_inv_freq(r.theta, dim) / r.factor, 1.0
    if r.type == "llama3":
        return _llama3(r, dim, max_pos), 1.0
    if r.type == "yarn":
        return _yarn(r, dim, max_pos)
    # dynamic NTK: rescale the base once the sequence outgrows the original context
    orig = r.original_max_position_embeddings or max_pos
    seq_len = max(seq_len or 0, orig)
    theta = r.theta * ((r.factor * seq_len / orig) - (r.factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(theta, dim), 1.0


class Rotary:
    """cos/sin tables per position; frequencies live on the CPU and follow the input to its device."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.inv_freq, self.scale = inv_freq_and_scale(cfg)
        self._on: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # DeepSeek-V2 rotates in fp32 with fp32 tables whatever the model dtype; others use the model's
        self.fp32 = cfg.mla is not None and cfg.mla.rope_complex

    def rows(self, positions_T: torch.Tensor, dtype: torch.dtype, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``self(positions_T[None], dtype)`` without the batch dimension — cos/sin ``[T, rope_dim]`` for a flat run of
        positions, all below ``upto`` (a host int: no sync) — read from a table of the first positions, grown by
        doubling, where the frequencies do not depend on the sequence length (every type but dynamic NTK): two
        gathers per serving step instead of the eight ops that compute them, each of which runs cold after a
        decode step has streamed the weights."""
        if self.cfg.rope.type == "dynamic":
            cos, sin = self(positions_T.unsqueeze(0), dtype)
            return cos[0], sin[0]
        key = (positions_T.device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < upto:
            n = max(256, 1 << (upto - 1).bit_length())
            cos, sin = self(torch.arange(n, device=positions_T.device).unsqueeze(0), dtype)
            table = self._tables[key] = (cos[0], sin[0])
        return table[0].index_select(0, positions_T), table[1].index_select(0, positions_T)

    def __call__(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``[B, S, rope_dim]`` in ``dtype`` (fp32 for DeepSeek-V2's complex rotation)."""
        if self.fp32:
            dtype = torch.float32
        inv_freq = self.inv_freq
        if self.cfg.rope.type == "dynamic":
            seq_len = int(position_ids_BS.max()) + 1  # host sync (named): NTK base depends on length
            inv_freq = inv_freq_and_scale(self.cfg, seq_len)[0]
            inv_freq = inv_freq.to(position_ids_BS.device)
        else:
            dev = position_ids_BS.device
            if dev not in self._on:
                self._on[dev] = inv_freq.to(dev)
            inv_freq = self._on[dev]
        freqs = position_ids_BS.float().unsqueeze(-1) * inv_freq  # [B, S, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
