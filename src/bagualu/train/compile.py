"""``train.compile``: the model's forward and backward through ``torch.compile`` (PowerFusion or Inductor).

The model is compiled in place (``nn.Module.compile``), so parameter names, checkpoints and the export
are those of the eager model. Each MoE layer's dispatch stays eager (``torch._dynamo.disable``): its
token counts are a host sync that sizes the exchange, which Dynamo would break the graph on anyway,
and under expert parallelism it runs collectives inside autograd Functions. Attention blocks, norms,
the residual stream and the loss around it compile; with ``powerfusion`` their memory-bound operators
become fused kernels, GEMMs and attention stay with the vendor library.
"""

from __future__ import annotations

import torch
from torch import nn

from bagualu.moe import MoE

BACKENDS = ("none", "powerfusion", "inductor")


def compile_model(model: nn.Module, backend: str, options: dict | None = None) -> int:
    """Compile ``model`` in place with ``backend`` (one of ``BACKENDS``; "none" does nothing) and the
    back-end's ``options``; returns how many MoE layers stay eager."""
    if backend not in BACKENDS:
        raise ValueError(f"train.compile={backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "none":
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, MoE):
            m.forward = torch._dynamo.disable(m.forward)
            n += 1
    model.compile(backend=backend, options=options)
    return n
