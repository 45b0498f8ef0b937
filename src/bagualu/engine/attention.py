"""The R-part interface: attention over the KV cache, wherever the cache lives.

FastDecode splits each decoder layer in two: the S-part (projections, MLP/MoE, LM head — shared weights,
batch-friendly, on the accelerator) and the R-part (attention over each sequence's own KV cache —
memory-bound, no shared weights). The runner computes q/k/v for a micro-batch and ``submit``s them; the
back-end writes k/v into the cache and computes attention; ``wait`` returns the output. ``prepare`` hands
over a micro-batch's metadata (block tables, lengths, slots) once per step, not once per layer. ``submit`` may
return before the work is done so the runner can compute the S-part of the other micro-batch meanwhile.

- ``LocalAttention``: one KV pool in this process on the model's device (the ``in_process`` mode);
  ``submit`` computes at once.
- ``bagualu.engine.rworkers.RWorkerAttention``: one pool per CPU worker process (the FastDecode mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagualu.engine.batch import StepInputs
from bagualu.ops import kernel
from bagualu.ops.decoder_layers import LayerStack


@dataclass(frozen=True)
class KVSpec:
    """Shape of one pool's cache: per layer ``[num_blocks, G, block_size, Dh]`` for keys and values."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    windows: tuple[int | None, ...]  # per layer sliding window (None = full)
    scale: float

    @property
    def bytes_per_block(self) -> int:
        elt = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * elt


def allocate_cache(spec: KVSpec, device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Key/value caches, one pair per layer. Uninitialised: attention reads only positions a step has
    written, and on the host untouched pages cost no memory until the cache fills."""
    shape = (spec.num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim)
    return [(torch.empty(shape, dtype=spec.dtype, device=device), torch.empty(shape, dtype=spec.dtype, device=device))
            for _ in range(spec.num_layers)]


def attend(cache: tuple[torch.Tensor, torch.Tensor], spec: KVSpec, layer: int, q_THDh: torch.Tensor,
           k_TGDh: torch.Tensor, v_TGDh: torch.Tensor, block_tables_SM: torch.Tensor, context_lens_S: torch.Tensor,
           query_start_loc_S1: torch.Tensor, slot_mapping_T: torch.Tensor, out: torch.Tensor | None = None,
           platform: str | None = None):
    """Write this step's keys/values into the cache, then attend: the whole R-part of one layer.
    ``platform``: whose kernels to use (default the current platform's; R-workers pass ``"cpu"``)."""
    k_cache, v_cache = cache
    kernel("write_kv", platform)(k_cache, v_cache, k_TGDh, v_TGDh, slot_mapping_T)
    return kernel("paged_attention", platform)(q_THDh, k_cache, v_cache, block_tables_SM, context_lens_S, query_start_loc_S1,
                                     spec.scale, spec.windows[layer], out=out)


class LocalAttention:
    """The R-part in this process, over one KV pool on ``device``."""

    def __init__(self, spec: KVSpec, device: torch.device):
        self.spec = spec
        self.num_pools = 1
        self.cache = allocate_cache(spec, device)
        self._out: dict[int, torch.Tensor] = {}
        self._meta: dict[int, tuple[torch.Tensor, ...]] = {}

    def prepare(self, mb: int, step: StepInputs) -> None:
        """Once per step and micro-batch: move its attention metadata to the device."""
        ps = step.pools[0]
        dev = self.cache[0][0].device
        self._meta[mb] = (ps.block_tables_SM.to(dev), ps.context_lens_S.to(dev), ps.query_start_loc_S1.to(dev),
                          ps.slot_mapping_T.to(dev))

    def submit(self, layer: int, mb: int, q_THDh, k_TGDh, v_TGDh) -> None:
        bt, ctx, qsl, slots = self._meta[mb]
        self._out[mb] = attend(self.cache[layer], self.spec, layer, q_THDh, k_TGDh, v_TGDh, bt, ctx, qsl, slots)

    def wait(self, layer: int, mb: int) -> torch.Tensor:
        return self._out.pop(mb)

    def run_layers(self, mb: int, stack: LayerStack, x_TD: torch.Tensor, cos_TDr: torch.Tensor,
                  sin_TDr: torch.Tensor) -> torch.Tensor:
        """All layers of the model for micro-batch ``mb`` (S- and R-part together, as the
        ``decoder_layers`` operator); returns the new hidden states."""
        bt, ctx, qsl, slots = self._meta[mb]
        return kernel("decoder_layers")(x_TD, stack, self.cache, cos_TDr, sin_TDr, bt, ctx, qsl, slots)

    def close(self) -> None:
        self.cache = []
