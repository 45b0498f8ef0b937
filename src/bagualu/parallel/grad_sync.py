"""MoDa gradient synchronisation: expert parameters over their ``dp`` replicas, everything else over
all ranks; bucketed, launched during backward, finished before ``backward()`` returns.

Why the scale is 1/world for *both* kinds (the contract: EP×DP training is the same mathematics as one
process on the global batch with a mean loss, L = (1/world) Σ_r L_r):
- a replicated parameter gets ∂L_r/∂w on each rank → all-reduce(sum) over the world, ÷ world;
- an expert shard already holds Σ_{r in its EP group} ∂L_r/∂w (the all-to-all's backward brought the
  gradients of every rank that routed to it) → all-reduce(sum) over its dp replicas covers all ranks,
  and it too is ÷ world (not ÷ dp) — with dp = 1 it is scaled without any communication.

Mechanics: ``register_post_accumulate_grad_hook`` on every parameter; when the last parameter of a
bucket (~25 MB, in reverse registration order ≈ backward order) has its gradient, the bucket's grads
are flattened and an async all-reduce starts; the hook of the very last parameter waits for all of
them and writes the averaged gradients back. Every parameter must get a gradient in every backward
(the experts' autograd Function guarantees it for idle experts); one that does not is reported by
``finish()`` by name. ``no_sync()`` skips synchronisation for gradient accumulation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    group: object | None
    ready: int = 0
    flat: torch.Tensor | None = None
    work: object | None = None


@dataclass
class GradSync:
    world: int
    buckets: list[_Bucket] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    enabled: bool = True
    _seen: set = field(default_factory=set)  # ids of parameters whose gradient arrived this backward
    _total: int = 0

    def _hook(self, bucket: _Bucket):
        def hook(p: torch.Tensor) -> None:
            if not self.enabled:
                return
            bucket.ready += 1
            self._seen.add(id(p))
            if bucket.ready == len(bucket.params):
                self._launch(bucket)
            if len(self._seen) == self._total:
                self.finish()
        return hook

    def _launch(self, b: _Bucket) -> None:
        if b.group is None:
            return
        b.flat = torch.cat([p.grad.reshape(-1) for p in b.params])
        b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket, write back grad ÷ world. Called by the last hook; safe to call again."""
        if not self._seen:
            return
        if len(self._seen) != self._total:
            missing = [n for b in self.buckets for p in b.params if id(p) not in self._seen
                       for n in [self.names[id(p)]]]
            raise RuntimeError(f"gradient sync: {len(missing)} parameter(s) got no gradient in this "
                               f"backward ({', '.join(missing[:5]) or 'unknown'}); every parameter must take part "
                               "in the loss, or be frozen (requires_grad=False) on every rank")
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                off = 0
                for p in b.params:
                    n = p.grad.numel()
                    p.grad.copy_(b.flat[off:off + n].view_as(p.grad))
                    off += n
            if self.world > 1:
                for p in b.params:
                    p.grad.div_(self.world)
            b.ready, b.flat, b.work = 0, None, None
        self._seen.clear()

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (gradient accumulation); the next synced backward syncs the sum."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


def install_grad_sync(model: nn.Module, *, expert_params: set[int], expert_group, world_group, world: int,
                      bucket_bytes: int = 25 << 20) -> GradSync:
    sync = GradSync(world=world)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sync.names = {id(p): n for n, p in named}
    for is_expert in (True, False):
        group = expert_group if is_expert else world_group
        bucket, size = None, 0
        for _, p in reversed(named):  # reverse registration order ≈ the order backward produces grads
            if (id(p) in expert_params) != is_expert:
                continue
            if bucket is None or size >= bucket_bytes:
                bucket, size = _Bucket(params=[], group=group), 0
                sync.buckets.append(bucket)
            bucket.params.append(p)
            size += p.numel() * p.element_size()
    for b in sync.buckets:
        for p in b.params:
            p.register_post_accumulate_grad_hook(sync._hook(b))
    sync._total = sum(len(b.params) for b in sync.buckets)
    return sync
