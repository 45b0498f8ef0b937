"""``ModelConfig``: the one description of every decoder-only model this package builds.

It is parallelism-free and format-free: Hugging Face ``config.json`` dialects are translated to and
from it in ``models/hf/config.py``. Validation happens here, with messages that say what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bagualu.moe.router import check_router_name

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.theta <= 0:
            raise ValueError(f"rope theta must be positive, got {self.theta}")
        if self.type != "default" and self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    num_experts: int
    top_k: int
    ffn_dim: int
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    shared_ffn_dim: int | None = None
    shared_expert_gate: bool = False

    def __post_init__(self):
        check_router_name(self.router)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one shared latent.

    Per token the KV cache would hold ``kv_lora_rank + qk_rope_head_dim`` numbers instead of
    ``2 * heads * head_dim``; each head's key is ``[k_nope (from the latent) | k_rope (shared by all heads)]``.
    Only the ``qk_rope_head_dim`` slice rotates, so RoPE frequencies are computed for that width.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: queries come straight from q_proj (DeepSeek-V2-Lite)
    # RoPE pairs: adjacent features (x0, x1), (x2, x3)... as DeepSeek trained (True), or the halves (x_i,
    # x_{i+d/2}) as Llama (False; transformers' deepseek_v3 with rope_interleave=false).
    rope_interleave: bool = True
    # DeepSeek-V2's form of the interleaved rotation: complex products in fp32, result left interleaved.
    # Equal to rope_interleave's up to feature order (which q.k does not see); differs only in bf16/fp16.
    rope_complex: bool = False

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"mla.{name}={getattr(self, name)} must be positive")
        if self.qk_nope_head_dim < 0:
            raise ValueError(f"mla.qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"mla.q_lora_rank={self.q_lora_rank} must be positive, or None for no query compression")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.rope_complex and not self.rope_interleave:
            raise ValueError("mla.rope_complex=True rotates adjacent pairs; it needs rope_interleave=True")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str  # the Hugging Face model_type this config round-trips to (llama, mixtral, ...)
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" | "sliding_attention"
    moe: MoEConfig | None = None
    moe_layers: tuple[bool, ...] | None = None  # per layer: MoE block (True) or dense MLP
    mla: MLAConfig | None = None  # multi-head latent attention instead of grouped-query attention
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs every KV head to serve the same number of query heads"
            )
        if self.mla is not None:
            self._check_mla()
        elif self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                             "set head_dim explicitly")
        for name in ("layer_types", "moe_layers"):
            v = getattr(self, name)
            if v is not None and len(v) != self.num_layers:
                raise ValueError(f"{name} has {len(v)} entries but num_layers={self.num_layers}")
        if self.moe_layers is not None and any(self.moe_layers) and self.moe is None:
            raise ValueError("moe_layers marks MoE layers but no moe config is given")

    def _check_mla(self) -> None:
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} with MLA: the latent expands into one key and value "
                             f"per head, so set num_kv_heads=num_heads={self.num_heads}")
        if self.qk_norm:
            raise ValueError("qk_norm=True is not available with MLA (its latents have their own norms); "
                             "set qk_norm=False")
        if self.rope.partial_rotary_factor != 1.0:
            raise ValueError(f"rope.partial_rotary_factor={self.rope.partial_rotary_factor} with MLA: the rotated "
                             "width is mla.qk_rope_head_dim; set partial_rotary_factor=1.0")

    @property
    def dim_head(self) -> int:
        """Per-head width of grouped-query attention (MLA's widths live in ``mla``)."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Features per head that RoPE rotates: MLA's rope slice, else ``dim_head * partial_rotary_factor``."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return int(self.dim_head * self.rope.partial_rotary_factor)

    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None:
            return False
        return True if self.moe_layers is None else self.moe_layers[i]

    def window(self, i: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
