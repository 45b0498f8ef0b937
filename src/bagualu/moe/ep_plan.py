"""The expert-parallel plan: every decision of one MoE call, made identically on every rank of the EP
group from the all-gathered count matrix (so no further communication is needed to agree).

Legend: ep ranks in the EP group, E experts (global), e = E / ep per rank, r this rank.

    counts[s][x]   routes rank s's tokens chose for expert x               (all-gathered, host)
    kept[s][x]     of those, the ones capacity keeps: expert x accepts its first C routes in
                   (source rank, token) order — the single-process order of the concatenated batch
    shadow         experts replicated on every rank this call (FasterMoE): their routes never travel;
                   their weights are broadcast and their gradients reduced back to the owner

Shadowing is chosen by a cost model (``ShadowCost``): estimated time = slowest rank's expert compute
+ slowest rank's token traffic + the shadows' weight traffic (broadcast forward, reduce backward).
Hot experts are added greedily while the estimate drops (FasterMoE §4).
"""

from __future__ import annotations

from dataclasses import dataclass

from bagualu.moe.dispatch import capacity


@dataclass(frozen=True, kw_only=True)
class ShadowCost:
    """Per-route and per-expert costs; bandwidth in bytes/s of one rank's all-to-all, FLOP/s of its experts."""

    row_bytes: float  # one routed row there and back, forward and backward: 4 · D · elem
    row_flops: float  # forward + backward SwiGLU expert work per row: 3 · 6 · D · F
    expert_bytes: float  # one expert's weights: 3 · D · F · elem (moved twice: broadcast + reduce)
    link_bw: float
    flops: float


@dataclass(frozen=True)
class EPPlan:
    ep: int
    rank: int
    num_experts: int
    counts: list[list[int]]  # [ep][E]
    kept: list[list[int]]  # [ep][E]
    shadow: tuple[int, ...]  # ascending global expert ids

    @property
    def e(self) -> int:
        return self.num_experts // self.ep

    def exchanged(self, s: int) -> list[int]:
        """Routes of source s that travel, per global expert (shadowed experts excluded)."""
        sh = set(self.shadow)
        return [0 if x in sh else k for x, k in enumerate(self.kept[s])]

    def shadowed(self, s: int) -> list[int]:
        sh = set(self.shadow)
        return [k if x in sh else 0 for x, k in enumerate(self.kept[s])]

    def send_counts(self, dst: int) -> list[int]:
        """My rows for each local expert of ``dst`` (what I send it), in its expert order."""
        return self.exchanged(self.rank)[dst * self.e:(dst + 1) * self.e]

    def recv_counts(self, src: int) -> list[int]:
        """Rows ``src`` sends me, per local expert of mine."""
        return self.exchanged(src)[self.rank * self.e:(self.rank + 1) * self.e]

    @property
    def dropped(self) -> int:
        """Routes of this rank that capacity dropped."""
        return sum(self.counts[self.rank]) - sum(self.kept[self.rank])


def apply_capacity(counts: list[list[int]], cap: int | None) -> list[list[int]]:
    if cap is None:
        return [list(row) for row in counts]
    kept = [[0] * len(counts[0]) for _ in counts]
    for x in range(len(counts[0])):
        room = cap
        for s in range(len(counts)):
            kept[s][x] = min(counts[s][x], room)
            room -= kept[s][x]
    return kept


def estimate(kept: list[list[int]], shadow: set[int], ep: int, cost: ShadowCost) -> float:
    E = len(kept[0])
    e = E // ep
    comp, comm = [0.0] * ep, [0.0] * ep
    for x in range(E):
        owner = x // e
        for s in range(ep):
            rows = kept[s][x]
            if x in shadow:
                comp[s] += rows
            else:
                comp[owner] += rows
                if s != owner:
                    comm[s] += rows
                    comm[owner] += rows
    return (max(comp) * cost.row_flops / cost.flops + max(comm) * cost.row_bytes / cost.link_bw
            + len(shadow) * 2 * cost.expert_bytes / cost.link_bw)


def choose_shadows(kept: list[list[int]], ep: int, cost: ShadowCost, max_shadows: int) -> tuple[int, ...]:
    load = [sum(kept[s][x] for s in range(ep)) for x in range(len(kept[0]))]
    chosen: set[int] = set()
    best = estimate(kept, chosen, ep, cost)
    for x in sorted(range(len(load)), key=lambda x: -load[x])[:max_shadows]:
        t = estimate(kept, chosen | {x}, ep, cost)
        if t >= best:
            break
        chosen.add(x)
        best = t
    return tuple(sorted(chosen))


def make_plan(counts: list[list[int]], tokens: list[int], rank: int, *, top_k: int,
              capacity_factor: float | None, shadow: str | int, cost: ShadowCost | None) -> EPPlan:
    ep, E = len(counts), len(counts[0])
    cap = None if capacity_factor is None else capacity(capacity_factor, sum(tokens), top_k, E)
    kept = apply_capacity(counts, cap)
    if shadow == "off" or shadow == 0:
        chosen: tuple[int, ...] = ()
    elif shadow == "auto":
        if cost is None:
            raise ValueError("shadow='auto' needs a cost model (parallelize measures one)")
        chosen = choose_shadows(kept, ep, cost, max_shadows=max(1, E // ep))
    else:
        load = [sum(kept[s][x] for s in range(ep)) for x in range(E)]
        chosen = tuple(sorted(sorted(range(E), key=lambda x: (-load[x], x))[:int(shadow)]))
    return EPPlan(ep=ep, rank=rank, num_experts=E, counts=counts, kept=kept, shadow=chosen)


ROUND_OVERHEAD_S = 2e-4  # per extra exchange round (message latency + launch), measured order for gloo/NCCL


def choose_schedule(plan: EPPlan, cost: ShadowCost | None) -> str:
    """'pipelined' when overlapping can hide more than the extra rounds cost, else 'all_to_all'."""
    if cost is None:
        return "all_to_all"
    ep = plan.ep
    rows_in = sum(sum(plan.recv_counts(s)) for s in range(ep))
    rows_out = sum(sum(plan.send_counts(d)) for d in range(ep) if d != plan.rank)
    comp = rows_in * cost.row_flops / 3 / cost.flops
    comm = (rows_out + rows_in) * cost.row_bytes / 4 / cost.link_bw
    gain = min(comp, comm) * (ep - 1) / ep
    return "pipelined" if gain > (ep - 1) * ROUND_OVERHEAD_S else "all_to_all"
