"""Algebraic rewrites of an ATen graph before partitioning: the same values, fewer operations.

``renormalized_topk_softmax`` — the MoE router of Mixtral/Qwen/DeepSeek with ``norm_topk_prob``:
``p = softmax(x); w, i = topk(p, k); w = w / w.sum()``. Softmax is increasing in each logit, so the top-k
of ``p`` are the top-k of ``x``; and ``exp(x_j - m) / S`` renormalised over the chosen ``j`` is
``exp(x_j - m') / sum exp(x_j' - m')`` for any row constant — the softmax denominator and the row max over
all experts cancel. The graph becomes ``w, i = topk(x, k); w = softmax(w)``: k exponentials per row
instead of E, and no pass over the row for its max and sum. Equal in exact arithmetic; in floating point
the weights differ by rounding only. (Indices can differ from eager's where two logits differ but their
rounded probabilities tie, i.e. where eager's own choice between them is arbitrary.) It applies only when
nothing else reads the probabilities or the un-normalised top-k values.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

aten = torch.ops.aten


def _is(n, target) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target == target


def _last_dim(node: fx.Node, dims) -> bool:
    nd = node.meta["val"].dim()
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, nd - 1)


def _only_users(n: fx.Node, users: set) -> bool:
    return set(n.users) == users


def _match(t: fx.Node):
    """The nodes of the pattern ending in topk ``t``, or None."""
    if not _is(t, aten.topk.default) or "val" not in t.meta:
        return None
    args = list(t.args) + [None] * (5 - len(t.args))
    d, k = args[0], args[1]
    dim = args[2] if args[2] is not None else t.kwargs.get("dim", -1)
    largest = args[3] if args[3] is not None else t.kwargs.get("largest", True)
    sorted_ = args[4] if args[4] is not None else t.kwargs.get("sorted", True)
    if not largest or not _is(d, aten.div.Tensor) or not _only_users(d, {t}):
        return None
    e, s = d.args
    if not (_is(e, aten.exp.default) and _is(s, aten.sum.dim_IntList) and s.args[0] is e
            and _only_users(e, {d, s}) and _only_users(s, {d})):
        return None
    sub = e.args[0]
    if not (_is(sub, aten.sub.Tensor) and _only_users(sub, {e})):
        return None
    x, a = sub.args
    if not (_is(a, aten.amax.default) and a.args[0] is x and _only_users(a, {sub})):
        return None
    if not all(_last_dim(x, dims) for dims in ([dim], a.args[1], s.args[1])):
        return None
    if not (a.args[2] if len(a.args) > 2 else False) or not (s.args[2] if len(s.args) > 2 else False):
        return None
    items = {u.args[1]: u for u in t.users if u.target.__name__ == "getitem"}
    if set(items) - {0, 1} or len(items) != len(t.users) or 0 not in items:
        return None
    v = items[0]
    sums = [u for u in v.users if _is(u, aten.sum.dim_IntList) and _last_dim(v, u.args[1])
            and (u.args[2] if len(u.args) > 2 else False)]
    if len(sums) != 1:
        return None
    s2 = sums[0]
    divs = [u for u in v.users if _is(u, aten.div.Tensor) and u.args == (v, s2)]
    if len(divs) != 1 or not _only_users(v, {s2, divs[0]}) or not _only_users(s2, {divs[0]}):
        return None
    return x, k, dim, sorted_, items, divs[0]


def renormalized_topk_softmax(gm: fx.GraphModule) -> int:
    """Apply the router rewrite wherever it matches; returns how many times."""
    done = 0
    for t in list(gm.graph.nodes):
        m = _match(t)
        if m is None:
            continue
        x, k, dim, sorted_, items, r = m
        fake = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes])
        g = gm.graph

        def node(target, *args):
            n = g.call_function(target, args)
            vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
            with fake:
                n.meta["val"] = target(*vals)
            return n

        import operator

        with g.inserting_before(t):
            t2 = node(aten.topk.default, x, k, dim, True, sorted_)
            v2 = node(operator.getitem, t2, 0)
            i2 = node(operator.getitem, t2, 1)
            mx = node(aten.amax.default, v2, [dim], True)
            ex = node(aten.exp.default, node(aten.sub.Tensor, v2, mx))
            w = node(aten.div.Tensor, ex, node(aten.sum.dim_IntList, ex, [dim], True))
        r.replace_all_uses_with(w)
        if 1 in items:
            items[1].replace_all_uses_with(i2)
        g.eliminate_dead_code()
        done += 1
    if done:
        g.lint()
        gm.recompile()
    return done
