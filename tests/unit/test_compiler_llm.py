"""PowerFusion on the LLM subgraph suite: compiled vs eager, forward and backward, fp32 and bf16.

Each case also pins the fusion it must achieve (how many kernels, no ATen fallback of a claimed op):
a compiler that silently stopped fusing would still be "correct", so the count is part of the spec.
bf16 results are held to the error eager itself makes against an fp64 reference (fusion computes in
fp32 without intermediate rounding, so it may be closer to the truth than eager, never much further).

Every case runs through both code generators: C (the CPU's) and Triton (the GPU's), the latter under
Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``); ``test_compiler_triton`` also compiles
each Triton kernel for a real GPU target.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from codegens import CODEGENS, device_for

from bagualu.compiler import explain
from bagualu.compiler.report import _fresh
from bagualu.ops.reference import apply_rope


pytestmark = pytest.mark.usefixtures("powerfusion_env")


def rms_residual(x, r, w):
    h = x + r
    hf = h.float()
    return h, w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def swiglu(g, u):
    return F.silu(g) * u


def softmax(x):
    return torch.softmax(x, dim=-1)


def cross_entropy(x, t):
    return F.cross_entropy(x.float(), t)


def router(logits):
    """Softmax over experts, top-6, renormalise, per-expert counts (a static-shape bincount)."""
    p = logits.float().softmax(-1)
    w, i = p.topk(6, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    flat = i.flatten()
    counts = torch.zeros(logits.shape[-1], dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat))
    return w, i, counts


def layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


def rope(q, k, cos, sin):
    return apply_rope(q, k, cos, sin)


def _args(name, dtype, g):
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    if name == "rms_residual":
        return [r(48, 256), r(48, 256), r(256)]
    if name == "swiglu":
        return [r(48, 384), r(48, 384)]
    if name == "softmax":
        return [r(6, 32000) * 4]
    if name == "cross_entropy":
        return [r(6, 32000) * 2, torch.randint(0, 32000, (6,), generator=g)]
    if name == "router":  # distinct logits per row (exact in bf16): top-k of tied values has no single answer
        return [torch.stack([torch.randperm(64, generator=g) for _ in range(96)]).to(dtype) * 0.125 - 4]
    if name == "layer_norm":
        return [r(48, 256), r(256), r(256)]
    if name == "rope":
        return [r(2, 4, 16, 32), r(2, 2, 16, 32), r(2, 16, 32), r(2, 16, 32)]
    raise KeyError(name)


FNS = {"rms_residual": rms_residual, "swiglu": swiglu, "softmax": softmax, "cross_entropy": cross_entropy,
       "router": router, "layer_norm": layer_norm, "rope": rope}
# case -> (kernels in forward, kernels in backward or None when not differentiated)
FUSION = {"rms_residual": (1, None), "swiglu": (1, 1), "softmax": (1, None), "cross_entropy": (1, 1),
          "router": (1, None), "layer_norm": (1, 1), "rope": (1, None)}


def _run(fn, args, backward):
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = []
    if backward:
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs) if o.requires_grad)
        grads = list(torch.autograd.grad(loss, [a for a in args if a.requires_grad]))
    return list(outs) + grads


def _inputs(name, dtype, backward, seed=0):
    args = _args(name, dtype, torch.Generator().manual_seed(seed))
    return [a.requires_grad_() if backward and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("codegen", CODEGENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(FNS))
def test_llm_subgraph_matches_eager(name, dtype, codegen):
    options = {"codegen": codegen}
    backward = FUSION[name][1] is not None
    fn = FNS[name]
    args = _inputs(name, dtype, backward)
    if device_for(codegen) != "cpu":  # Triton on a GPU machine
        args = [a.detach().to(device_for(codegen)).requires_grad_(a.requires_grad) for a in args]
    ex = explain(fn, *[a.detach().requires_grad_(a.requires_grad) for a in args], backward=backward, measure=False,
                 options=options)
    fw = [k for k in ex.kernels if not k.graph.startswith("backward")]
    bw = [k for k in ex.kernels if k.graph.startswith("backward")]
    assert len(fw) == FUSION[name][0], str(ex)
    if backward:
        assert len(bw) == FUSION[name][1], str(ex)
    assert not ex.fallback_ops(vendor=False), str(ex)
    assert set(ex.codegens) == {codegen}, str(ex)

    compiled = torch.compile(_fresh(fn), backend="powerfusion", options=options)
    got = _run(compiled, args, backward)
    want = _run(fn, args, backward)
    if name == "router":  # indices: compare the experts chosen, not the order of equal probabilities
        assert torch.equal(got[2], want[2]) and got[2].sum() == 6 * args[0].shape[0]
        torch.testing.assert_close(got[1].sort(-1).values, want[1].sort(-1).values)
        torch.testing.assert_close(got[0], want[0])
        return
    if dtype == torch.float32:
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, atol=2e-5, rtol=2e-5)
        return
    ref = _run(fn, [a.detach().double().requires_grad_(a.requires_grad) if a.is_floating_point() else a
                    for a in args], backward)
    for g_, w_, r_ in zip(got, want, ref):
        err_ours = (g_.double() - r_).abs().max().item()
        err_eager = (w_.double() - r_).abs().max().item()
        assert err_ours <= 2 * err_eager + 1e-3 * r_.abs().max().item() + 1e-6, (name, err_ours, err_eager)


def test_router_counts_are_exact_in_one_kernel():
    logits = torch.randn(333, 64, generator=torch.Generator().manual_seed(3))
    ex = explain(router, logits, measure=False)
    assert len(ex.kernels) == 1 and {"topk", "scatter_add"} <= {o.split(".")[1] for o in ex.kernels[0].ops if "." in o}
    w, i, counts = torch.compile(router, backend="powerfusion")(logits)
    torch.testing.assert_close(counts, torch.bincount(i.flatten(), minlength=64))
    torch.testing.assert_close(w.sum(-1), torch.ones(333))
    # softmax -> top-k -> renormalise became top-k of the logits -> softmax of the k (rewrites.py)
    assert any("renormalised top-k of a softmax" in n for n in ex.notes), str(ex)
    assert ex.kernels[0].ops[0] == "aten.topk.default", ex.kernels[0].ops  # no softmax over all experts


@pytest.mark.parametrize("dtype,n", [(torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 13),
                                     (torch.float32, 136)])
def test_topk_rows_with_nan_and_infinities_match_eager(dtype, n):
    """Largest and smallest k, for a row read in place (fp32, a plain load), a computed row and a bf16 row:
    NaN ranks above every number in both directions (ATen), infinities are ordinary. Values distinct, so
    the indices are defined. n=136: candidates found 64 elements at a time, the last word partial."""
    g = torch.Generator().manual_seed(7)
    x = (torch.stack([torch.randperm(n, generator=g) for _ in range(40)]).float() * 0.25 - 3).to(dtype)
    x[3, 5] = x[4, 0] = x[4, n - 1] = float("nan")
    x[5, 2], x[6, 7] = float("inf"), float("-inf")
    x[7, :] = float("nan")
    for k in (1, 6, 8):
        for largest in (True, False):
            def f(t, k=k, largest=largest):
                return torch.topk(t, k, dim=-1, largest=largest), torch.topk(t * 2, k, dim=-1, largest=largest)
            torch._dynamo.reset()
            got = torch.compile(f, backend="powerfusion", dynamic=False)(x)
            for (gv, gi), (wv, wi) in zip(got, f(x)):
                torch.testing.assert_close(gv, wv, equal_nan=True, msg=f"k={k} largest={largest}")
                ok = ~torch.isnan(wv).any(-1)  # NaN rows: ATen orders equal NaNs arbitrarily
                assert torch.equal(gi[ok], wi[ok]), (k, largest)


@pytest.mark.parametrize("n", [16, 48, 64, 72])
def test_topk_rows_with_many_ties_pick_the_right_values(n):
    """Rows of few distinct values (many ties, whole rows equal, -inf runs): the bound from the lane maxima (16
    lanes on AVX-512 CPUs when n % 16 == 0, else 8) must keep every value that can be in the top k. Values equal
    eager's; the indices point at them, distinct."""
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 4, (64, n), generator=g).float()
    x[1, :] = 2.0
    x[2, : n // 2] = float("-inf")
    x[3, :] = float("-inf")
    for k in (1, 6, 8):
        def f(t, k=k):
            return torch.topk(t, k, dim=-1)
        torch._dynamo.reset()
        gv, gi = torch.compile(f, backend="powerfusion", dynamic=False)(x)
        wv, _ = f(x)
        assert torch.equal(gv, wv), k
        assert torch.equal(x.gather(-1, gi), gv), k
        assert all(len(set(r)) == k for r in gi.tolist()), k


def test_router_rewrite_leaves_graphs_that_read_the_probabilities():
    def router_and_probs(logits):
        p = logits.softmax(-1)
        w, i = p.topk(4, dim=-1)
        return w / w.sum(-1, keepdim=True), i, p.mean(0)  # p itself is read (a load-balancing loss would)

    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    ex = explain(router_and_probs, logits, measure=False)
    assert not any("rewrite" in n for n in ex.notes), str(ex)
    got = torch.compile(router_and_probs, backend="powerfusion")(logits)
    for g_, w_ in zip(got, router_and_probs(logits)):
        torch.testing.assert_close(g_, w_)


def test_softmax_is_one_kernel_with_materialised_exponentials():
    """max / sum-of-exp / normalise over a 32000-wide row: the exps computed once, kept per row."""
    ex = explain(softmax, torch.randn(4, 32000), measure=False)
    (k,) = ex.kernels
    assert "m[" in k.mapping and "m[]" not in k.mapping, k.mapping
