"""The fusion IR on its own: lowering regions and evaluating the IR with the reference interpreter.

No C++ here: ``interp.run_kernel`` is the IR's executable spec, so these tests pin the lowering (every
region's kernel equals the region's own ATen ops) and the shape of the row program (how many passes,
what may be materialised) independently of any code generator.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler.decompositions import decomposition_table
from bagualu.compiler.graph import RegionCall
from bagualu.compiler.interp import run_kernel
from bagualu.compiler.partition import partition


def _trace(fn, *args):
    return make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*args)


def _regions_equal_their_aten_ops(fn, *args):
    gm = _trace(fn, *args)
    part = partition(gm)
    assert part.kernels, "nothing was fused"
    env = {}
    it = iter(args)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(it)
    # evaluate the original graph to get every region's real inputs
    interp = torch.fx.Interpreter(gm)
    vals = {}
    orig_run = interp.run_node

    def run_node(n):
        vals[n] = orig_run(n)
        return vals[n]
    interp.run_node = run_node
    interp.run(*args)
    for region, k in zip(part.regions, part.kernels):
        inputs = [vals[i] for i in region.inputs]
        got = run_kernel(k, inputs[:len(k.inputs)])
        want = RegionCall(region, None, k.name).fallback_module()(*inputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, equal_nan=True)
    return part


def test_rmsnorm_residual_is_one_kernel_of_two_passes():
    def f(x, r, w):
        h = x + r
        return h, w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    part = _regions_equal_their_aten_ops(f, torch.randn(6, 40), torch.randn(6, 40), torch.randn(40))
    (k,) = part.kernels
    passes = sch.schedule(k)
    assert [len(p.items) for p in passes] == [2, 1]  # (sum of squares + store h), (store y)
    assert k.rows == 6 and [v.size for v in k.spaces[0].vars] == [40]


def test_softmax_has_three_passes_and_offers_materialising_exp():
    part = _regions_equal_their_aten_ops(lambda x: torch.softmax(x, -1), torch.randn(3, 50))
    (k,) = part.kernels
    passes = sch.schedule(k)
    assert len(passes) == 3
    (vid,) = sch.materialize_candidates(k, passes)
    assert k.values[vid].op == "exp"


def test_layernorm_backward_column_reductions_share_the_row_loop():
    x = torch.randn(8, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    b = torch.randn(24, requires_grad=True)

    def f(x, w, b, g):
        out = F.layer_norm(x, (24,), w, b)
        return torch.autograd.grad(out, (x, w, b), g)
    part = _regions_equal_their_aten_ops(f, x, w, b, torch.randn(8, 24))
    bw = [k for k in part.kernels if k.col_reduces]
    assert len(bw) == 1 and len(bw[0].col_reduces) == 2 and len(bw[0].final_stores) == 2


def test_cross_entropy_gathers_the_target_logit_by_index_substitution():
    x, t = torch.randn(5, 30), torch.randint(0, 30, (5,))
    part = _regions_equal_their_aten_ops(lambda x, t: F.cross_entropy(x, t), x, t)
    (k,) = part.kernels
    loads = [v for v in k.values if v.op == "load" and v.attrs["expr"].indirects()]
    assert len(loads) == 1  # x[t, target[t]]: one indirect load per row, no gathered copy


@pytest.mark.parametrize("case", ["cat_pad", "permute_view", "topk_scatter", "where_iota"])
def test_layout_and_index_ops_lower_exactly(case):
    if case == "cat_pad":
        def f(a, b):
            return F.pad(torch.cat([a * 2, -b], dim=-1), (1, 2)) + 1
        args = (torch.randn(4, 3, 5), torch.randn(4, 3, 7))
    elif case == "permute_view":
        def f(a):
            return (a.permute(0, 2, 1).reshape(6, -1) * 3).sum(-1)
        args = (torch.randn(2, 4, 3),)
    elif case == "topk_scatter":
        def f(a):
            v, i = (a * 2).topk(3, dim=-1)
            flat = i.flatten()
            return v.sum(-1), torch.zeros(10, dtype=torch.int64).scatter_add(0, flat, torch.ones_like(flat))
        args = (torch.randn(7, 10),)
    else:
        def f(a):
            idx = torch.arange(a.shape[-1])
            return torch.where(idx < 3, a, a.exp()).amax(-1)
        args = (torch.randn(5, 9),)
    _regions_equal_their_aten_ops(f, *args)


def test_unsupported_dtype_is_a_reasoned_fallback():
    part = partition(_trace(lambda x: x * 2 + 1, torch.randn(4, dtype=torch.float64).to(torch.complex64)))
    assert not part.kernels and part.fallbacks and all("complex" in f.reason for f in part.fallbacks)
