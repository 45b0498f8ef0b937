"""Partition an ATen FX graph into fusion regions of memory-intensive ops; everything else stays ATen.

Greedy in topological order: a fusible node joins the region of its producers when the merged region
still lowers to one kernel (``lower_region`` is the judge, so the partitioner never promises what the
IR cannot express) and no path leaves the region and comes back (a cycle). Otherwise it starts a new
region. GEMMs, convolutions, attention, embeddings and every op without a lowering stay ATen; each
such decision is recorded with its reason (``Fallback``) for ``explain`` and the log.

Layout and creation ops (views, ``full``, ``arange``) are *free*: they cost nothing in a kernel, so a
free node whose inputs are outside every region is duplicated into each region that reads it (and left
in the graph for other readers) rather than forcing a copy; a view of a region's result that is read
outside is left to ATen too (a view of the stored result), so no region stores a copy of a layout.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from bagualu.compiler import lowerings  # noqa: F401  (fills LOWERINGS)
from bagualu.compiler.claims import fusible, node_dtype
from bagualu.compiler.ir import Kernel
from bagualu.compiler.lower import LOWERINGS, LoweringError, Region, lower_region

aten = torch.ops.aten
prims = torch.ops.prims

VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
         aten.t.default, aten.transpose.int, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
         aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.alias.default,
         aten.split_with_sizes.default, aten.split.Tensor, aten.unbind.int, prims.broadcast_in_dim.default}
CREATION = {aten.full.default, aten.scalar_tensor.default, aten.arange.start_step, aten.arange.default,
            aten.arange.start, prims.iota.default, aten.full_like.default}
# ops the vendor library does better; falling back on them is the design, not a failure
VENDOR = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.convolution.default,
          aten.convolution_backward.default, aten.embedding.default, aten.embedding_dense_backward.default,
          aten._scaled_dot_product_flash_attention_for_cpu.default,
          aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
          aten._scaled_dot_product_efficient_attention.default,
          aten._scaled_dot_product_flash_attention.default, aten.matmul.default}
SUPPORTED_DTYPES = {torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool}
MAX_REGION_NODES = 200


@dataclass
class Fallback:
    node: str
    op: str
    reason: str
    vendor: bool = False


@dataclass
class Partition:
    regions: list[Region] = field(default_factory=list)
    kernels: list[Kernel] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)


def op_name(node: fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def is_free(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        src = node.args[0]
        return isinstance(src, fx.Node) and src.target in VIEWS
    return node.target in VIEWS or node.target in CREATION


def _tensor_metas(node: fx.Node) -> list[torch.Tensor]:
    v = node.meta.get("val")
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    return [x for x in vals if isinstance(x, torch.Tensor)]


def why_not_fusible(node: fx.Node) -> str | None:
    """None when ``node`` may join a region; otherwise the reason it stays ATen."""
    if node.op != "call_function":
        return "not an operator call"
    claimed = fusible()
    if node.target is operator.getitem:
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.target not in claimed:
            return "item of an op that is not fused"
    elif node.target not in claimed:
        if node.target in VENDOR:
            return "vendor library op (GEMM/convolution/attention/embedding)"
        return "lowering exists but is not claimed (no OpInfo test)" if node.target in LOWERINGS \
            else "no lowering for this op"
    metas = _tensor_metas(node)
    if not metas:
        return "no tensor result"
    ins = [m for a in node.all_input_nodes for m in _tensor_metas(a)]
    if node.target is not operator.getitem:
        dt = node_dtype(ins, metas[0])
        if dt not in claimed[node.target]:
            return f"dtype {dt} is not claimed for this op (claimed: {sorted(str(d) for d in claimed[node.target])})"
    for m in metas + ins:
        if m.dtype not in SUPPORTED_DTYPES:
            return f"dtype {m.dtype} not supported"
        if m.numel() == 0:
            return "zero-size tensor"
        if any(not isinstance(s, int) for s in m.shape):
            return "symbolic shape"
    return None


class _Partitioner:
    def __init__(self, gm: fx.GraphModule, score=None):
        self.gm = gm
        self.score = score  # kernel -> predicted seconds; merges must not predict slower than separate
        self._alone: dict[fx.Node, float] = {}
        self.nodes = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.anc: dict[fx.Node, int] = {}
        for n in self.nodes:
            m = 0
            for a in n.all_input_nodes:
                m |= self.anc[a] | (1 << self.pos[a])
            self.anc[n] = m
        self.region_of: dict[fx.Node, int] = {}
        self.members: dict[int, set[fx.Node]] = {}
        self.kernel_of: dict[int, Kernel] = {}
        self.result = Partition()
        self.reason: dict[fx.Node, str] = {}

    def mask(self, nodes) -> int:
        m = 0
        for n in nodes:
            m |= 1 << self.pos[n]
        return m

    def creates_cycle(self, nodes: set[fx.Node]) -> bool:
        """True when some node outside ``nodes`` is both a descendant and an ancestor of the set."""
        m = self.mask(nodes)
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in nodes and self.anc[a] & m:
                    return True
        return False

    def shared_free(self, node: fx.Node, into: set[fx.Node]) -> set[fx.Node]:
        """Free producers of ``node`` whose inputs lie outside every region: duplicated into the region."""
        out: set[fx.Node] = set()
        stack = [a for a in node.all_input_nodes]
        while stack:
            a = stack.pop()
            if a in out or a in into or a in self.region_of or not is_free(a) or why_not_fusible(a):
                continue
            if all(i not in self.region_of for i in a.all_input_nodes):
                out.add(a)
                stack.extend(a.all_input_nodes)
        return out

    def region(self, nodes: set[fx.Node], shared: set[fx.Node]) -> Region:
        allm = nodes | shared
        ordered = sorted(allm, key=self.pos.__getitem__)
        outputs = []
        for n in sorted(nodes, key=self.pos.__getitem__):
            if not isinstance(n.meta.get("val"), torch.Tensor):
                continue
            if any(u not in nodes for u in n.users):
                outputs.append(n)
        return Region(ordered, [], outputs, set(nodes))

    def try_lower(self, nodes: set[fx.Node], name: str) -> tuple[Kernel | None, Region, str | None]:
        nodes = set(nodes)
        shared = self._eject_layout_outputs(nodes)
        for n in nodes | shared:
            shared |= self.shared_free(n, nodes)
        r = self.region(nodes, shared)
        if not any(not is_free(n) for n in nodes):
            return None, r, "only layout ops"
        try:
            k = lower_region(r, name, self.score)
        except LoweringError as e:
            return None, r, str(e)
        # the ATen fallback of the region needs every outside input, the kernel only those it loads
        for n in r.nodes:
            for a in n.all_input_nodes:
                if a not in allm_of(r) and a not in r.inputs:
                    r.inputs.append(a)
        return k, r, None

    def run(self) -> Partition:
        next_id = 0
        for n in self.nodes:
            if isinstance(n.meta.get("val"), (tuple, list)):
                continue  # a multi-output op joins a region with its first fused item (getitem)
            why = why_not_fusible(n)
            src = n.args[0] if n.target is operator.getitem else None
            if why is None and src is not None and src not in self.region_of:
                why = why_not_fusible(src)
            if why is not None:
                if n.op == "call_function":
                    self.reason[n] = why
                    if src is not None:
                        self.reason.setdefault(src, why)
                continue
            extra = {src} if src is not None else set()
            ins = list(n.all_input_nodes) + (list(src.all_input_nodes) if src is not None else [])
            producers = sorted({self.region_of[a] for a in ins if a in self.region_of})
            # siblings: regions already reading one of n's inputs (horizontal fusion saves the re-read)
            siblings = sorted({self.region_of[u] for a in ins if not is_free(n) for u in a.users
                               if u in self.region_of} - set(producers))
            placed = False
            # try joining all producer regions at once, then each alone (largest first)
            options = ([producers] if len(producers) > 1 else []) + \
                sorted(([p] for p in producers), key=lambda p: -len(self.members[p[0]])) + \
                ([producers + [s_] for s_ in siblings] if producers else [[s_] for s_ in siblings])
            for opt in options:
                merged = set().union(*(self.members[r] for r in opt)) | {n} | extra
                if len(merged) > MAX_REGION_NODES or self.creates_cycle(merged):
                    continue
                k, _, err = self.try_lower(merged, f"k{opt[0]}")
                if k is None:
                    self.reason.setdefault(n, err or "")
                    continue
                if self.score is not None and not is_free(n) and not self._worth_it(k, opt, n, extra):
                    continue
                keep = opt[0]
                for r in opt[1:]:
                    for m in self.members.pop(r):
                        self.region_of[m] = keep
                    self.kernel_of.pop(r, None)
                self.members[keep] = merged
                for m in merged:
                    self.region_of[m] = keep
                if k is not None:
                    self.kernel_of[keep] = k
                placed = True
                break
            if placed:
                self.reason.pop(n, None)
                continue
            if is_free(n):
                continue  # stays ATen (a view of an ATen result) or is duplicated into its readers
            k, _, err = self.try_lower({n} | extra, f"k{next_id}")
            if k is None:
                self.reason[n] = err or "does not lower"
                continue
            self.members[next_id] = {n} | extra
            for m in self.members[next_id]:
                self.region_of[m] = next_id
            self.kernel_of[next_id] = k
            next_id += 1
        return self.finish()

    def _worth_it(self, merged: Kernel, opt: list[int], n: fx.Node, extra: set[fx.Node]) -> bool:
        """The merged kernel is predicted no slower than the regions and ``n`` run separately."""
        if n not in self._alone:
            k, _, _ = self.try_lower({n} | extra, "k_alone")
            self._alone[n] = self.score(k) if k is not None else float("inf")
        separate = self._alone[n] + sum(self.score(self.kernel_of[r]) for r in opt if r in self.kernel_of)
        return self.score(merged) <= separate

    def finish(self) -> Partition:
        built = []
        for rid in sorted(self.members, key=lambda r: min(self.pos[n] for n in self.members[r])):
            nodes = set(self.members[rid])
            if not any(not is_free(n) for n in nodes):
                continue
            k, r, err = self.try_lower(nodes, "k")
            if k is None:  # should not happen (every merge was checked); keep ATen, never a wrong result
                for n in nodes:
                    self.reason.setdefault(n, f"region failed to lower after partitioning: {err}")
                continue
            built.append((r, k))
        for r, _ in self._break_cycles(built):
            for n in r.owned:
                self.reason.setdefault(n, "fusing it would order two fused regions both ways (a cycle)")
        for i, (r, k) in enumerate(b for b in built if b[0] is not None):
            k.name = f"k{i}"
            self.result.regions.append(r)
            self.result.kernels.append(k)
        fused = {n for r in self.result.regions for n in r.nodes}
        for n, why in self.reason.items():
            if n.target is operator.getitem:
                continue  # an item of an unfused op is not an operator; its op is reported
            if n not in fused and n.target not in VIEWS and n.target not in CREATION:
                self.result.fallbacks.append(Fallback(n.name, op_name(n), why, n.target in VENDOR))
        return self.result

    def _break_cycles(self, built: list) -> list:
        """Drop regions until the graph of regions and outside nodes is acyclic; returns the dropped ones.

        Node-level acyclicity of each region does not make the condensed graph acyclic: a view a region
        leaves outside (read by another region) can order two regions both ways. Rare; the smaller region
        of the cycle goes back to ATen.
        """
        dropped = []
        while True:
            live = [b for b in built if b[0] is not None]
            owner = {n: i for i, (r, _) in enumerate(live) for n in r.owned}
            deps: dict = {}
            for n in self.nodes:
                if n not in owner:
                    deps[n] = {owner.get(a, a) for a in n.all_input_nodes}
            for i, (r, _) in enumerate(live):
                deps[i] = {owner.get(a, a) for a in r.inputs} - {i}
            done: set = set()
            progress = True
            while progress:
                progress = False
                for u, d in deps.items():
                    if u not in done and d <= done:
                        done.add(u)
                        progress = True
            stuck = [i for i in range(len(live)) if i not in done]
            if not stuck:
                return dropped
            victim = min(stuck, key=lambda i: len(live[i][0].owned))
            j = built.index(live[victim])
            dropped.append(built[j])
            built[j] = (None, None)

    def _eject_layout_outputs(self, nodes: set[fx.Node]) -> set[fx.Node]:
        """A view read outside its region stays an ATen view of the stored base (no copy of a layout).

        Removes such views from ``nodes`` (the kernel's outputs are then their bases) and returns them: they
        are still inlined (duplicated) into the region's own readers. Region membership is unchanged, so a
        later reader of the view can still join the region.
        """
        ejected: set[fx.Node] = set()
        changed = True
        while changed:
            changed = False
            for n in sorted(nodes, key=self.pos.__getitem__, reverse=True):
                if n.target in VIEWS and n.target not in (aten.split_with_sizes.default, aten.split.Tensor,
                                                          aten.unbind.int) \
                        and any(u not in nodes for u in n.users) and len(nodes) > 1:
                    nodes.discard(n)
                    ejected.add(n)
                    changed = True
        return ejected


def allm_of(r: Region) -> set[fx.Node]:
    return set(r.nodes)


def partition(gm: fx.GraphModule, score=None) -> Partition:
    """Regions (with their lowered kernels) and the fallbacks of ``gm`` (nodes must carry ``meta['val']``).

    ``score(kernel) -> seconds`` (the cost model) arbitrates each merge: fusing must not be predicted
    slower than keeping the pieces apart (horizontal fusion of unrelated shapes, say). Without it every
    merge that lowers is taken.
    """
    return _Partitioner(gm, score).run()
