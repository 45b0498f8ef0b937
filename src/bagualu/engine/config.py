"""``EngineConfig``: every knob of the serving engine, validated on construction.

``LLM(model_dir, **options)`` and ``bagualu serve --option`` both build one. The KV cache is sized by
``num_kv_blocks`` (per pool) when given, else by ``kv_cache_memory`` bytes in total (split evenly over the
R-workers' pools), else by a default: a quarter of the device's free memory, at most 4 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from bagualu.engine.scheduler import ADMISSION_POLICIES, SchedulerConfig

ATTENTION_MODES = ("in_process", "r_workers")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    dtype: str | None = None
    """Model dtype (float32, bfloat16, float16); None = the checkpoint's. A half dtype whose GEMMs the
    platform measures slower than fp32 (bf16 on CPUs without bf16 units) keeps its KV cache in that dtype
    but runs the weights in fp32 — see ``gemm_dtype``."""
    kv_cache_dtype: str | None = None
    """None = ``dtype``."""
    gemm_dtype: str = "auto"
    """Where the platform's half-precision GEMM is slower than fp32 (bf16 on CPUs without bf16 units), the
    GEMMs run in fp32 with fp32 activations; ``auto`` then keeps the projection weights in ``dtype`` if the
    platform's ``linear`` reads them as stored (half the bytes per decode step), ``float32`` widens them
    too. Elsewhere ``auto`` runs the model in ``dtype`` but a small step (a few decoding sequences: up to
    ``engine.core.FP32_ACTIVATION_ROWS`` tokens) with fp32 activations over the same half weights, where the
    platform's ``linear`` reads them as stored — faster there, and closer to fp32 — and, where the platform
    multiplies half operands natively, a step of up to 256 tokens with fp32 activations rounded to ``dtype``
    at each projection's input (autocast's rule); ``float32`` means ``dtype``. ``model``: always ``dtype``,
    weights and activations."""
    device: str | None = None
    """Where the S-part runs; None = the current platform's device."""
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    max_model_len: int | None = None
    """Context limit (prompt + output); None = the model's max_position_embeddings."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    prefix_caching: bool = True
    admission: str | None = None
    """``greedy`` or ``steady`` (see ``engine.scheduler``); None = steady with R-workers, else greedy."""
    kv_target: float = 1.0
    r_workers: int = 0
    """0 = the R-part runs in-process on the device; N > 0 = N CPU worker processes own the KV cache."""
    r_worker_threads: int | None = None
    """Threads per R-worker (None: an even share of the cores this process may run on, its affinity mask; of half
    of them where the S-part runs on an accelerator and its driver needs the rest)."""
    micro_batches: int | None = None
    """Micro-batches per step (None: 2 with R-workers and the S-part on an accelerator, so S and R overlap; else
    1: where the S-part runs on the CPU too the two parts share its cores and memory bandwidth, and a second
    micro-batch only reads the weights twice per step)."""
    seed: int = 0
    fused_layers: bool = True
    """With in-process attention and a model the ``decoder_layers`` operator covers (GQA attention, SwiGLU
    MLPs or MoE blocks with a plain top-k router: Llama, Mixtral, Qwen2-MoE), run each step's layers as that
    operator — on CPU one native call per step instead of 25-40 Python-level calls per layer; with attention
    in R-workers, as the operator's halves around it (one native call per layer boundary). False keeps the
    per-layer loop (the two compute the same)."""
    huge_pages: bool = True
    """On CPU, pack the model's weights into one buffer in the order a decode step reads them
    (``memory.weight_arena``) and back it with transparent huge pages (``memory.huge_pages``): a decode step
    streams every weight from DRAM, and on 4 KiB pages pays a TLB miss and a prefetcher restart every 4 KiB
    (batch-1 decode 9-13% faster on a Zen 5 box; packing, which also puts the weights under 2 MiB on huge
    pages, 2-4% more). Where the kernel's THP mode is ``never`` the weights are packed only."""
    packed_weights: bool = True
    """Where the platform's kernels have tiles for repacked weights — on CPU, fp32 weights on AVX-512, and bf16
    ones on AVX512-BF16 for a bf16 model's mid-size steps that multiply bf16 operands
    (``LayerStack.half_operands``; with AMX, on its tile units, every step from one token up:
    ``runner.MATRIX_UNIT_PACKED_MIN_ROWS``) — steps of at least ``runner.PACKED_MIN_ROWS`` tokens use a repacked copy of
    the layers' projections and of the LM head (``ops.linear_cpu.pack_bf16``, ``pack_f32``): no horizontal
    sums; at 32 rows, 1.3x (bf16) and 1.4x (fp32) the multiply rate. In an MoE layer (expert widths multiples
    of 16) every expert such a step routes rows to uses its packed copy (small Mixtral bf16: decode step at 64
    sequences 18.0 -> 16.1 ms, at 32 11.4 -> 11.1, with experts of >= 8 rows packed; every routed expert:
    32 sequences 9.97 -> 9.65, fp32 18.7 -> 17.4). Costs one more copy of those weights in memory (the
    head's made at start, the layers' on the layer operator's first step; logged); batch-1 steps and large
    prefill steps keep the originals. False: no copy."""
    speculative_tokens: int = 0
    """Speculative decoding by prompt lookup (``engine.speculative``): up to this many draft tokens per
    decoding sequence and step, copied from where its last tokens occurred before; 0 = off. Outputs are
    exact (greedy ones equal those without it)."""
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 2
    """The longest and shortest suffix (in tokens) looked up for a draft."""
    speculative_max_seqs: int = 8
    """No drafts in a step with more sequences running than this: a large batch is compute-bound, where a
    rejected draft costs what it computed (vLLM's ``disable_by_batch_size``)."""

    def __post_init__(self):
        if self.gemm_dtype not in ("auto", "float32", "model"):
            raise ValueError(f"gemm_dtype={self.gemm_dtype!r} must be 'auto', 'float32' or 'model'")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size={self.block_size} must be one of 8, 16, 32, 64, 128")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} must be >= 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory={self.kv_cache_memory} must be a positive number of bytes")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2")
        if self.r_workers < 0:
            raise ValueError(f"r_workers={self.r_workers} must be >= 0 (0 = attention in-process)")
        if self.r_worker_threads is not None and self.r_worker_threads < 1:
            raise ValueError(f"r_worker_threads={self.r_worker_threads} must be >= 1")
        if self.micro_batches is not None and self.micro_batches not in (1, 2):
            raise ValueError(f"micro_batches={self.micro_batches} must be 1 or 2")
        if self.speculative_max_seqs < 1:
            raise ValueError(f"speculative_max_seqs={self.speculative_max_seqs} must be >= 1")
        if self.speculative_tokens < 0:
            raise ValueError(f"speculative_tokens={self.speculative_tokens} must be >= 0 (0 = off)")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} and prompt_lookup_max="
                             f"{self.prompt_lookup_max} must satisfy 1 <= min <= max")
        if self.admission is not None and self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission={self.admission!r} is not one of {ADMISSION_POLICIES}")
        self.scheduler_config()  # validates the scheduler's share

    @property
    def attention_mode(self) -> str:
        return "r_workers" if self.r_workers else "in_process"

    def num_micro_batches(self, s_part_on_cpu: bool) -> int:
        return self.micro_batches or (2 if self.r_workers and not s_part_on_cpu else 1)

    def r_worker_thread_count(self, s_part_on_cpu: bool, cores: int) -> int:
        if self.r_worker_threads is not None:
            return self.r_worker_threads
        return max(1, cores // (max(self.r_workers, 1) * (1 if s_part_on_cpu else 2)))

    def scheduler_config(self) -> SchedulerConfig:
        admission = self.admission or ("steady" if self.r_workers else "greedy")
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               admission=admission, kv_target=self.kv_target)
