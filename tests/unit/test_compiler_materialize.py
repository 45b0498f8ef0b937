"""Materialised values in the C code generator: a value that later passes of a row reuse is kept in a row
buffer, or — when the pass that computes it also stores it whole to an fp32 or bf16 output, and nothing is
streamed — read back from that output (one stream of stores less). Both equal eager."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bagualu.compiler import search
from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler.codegen.cpp import kernel_source

pytestmark = pytest.mark.usefixtures("powerfusion_env")


def rmsnorm(x, r, w):  # h = x + r is an output and what the second pass normalises
    h = x + r
    hf = h.float()
    return h, w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def softmax(x):  # exp(x - max) is reused by the second pass but is no output
    return torch.softmax(x * 1.5, -1)


def _run(fn, args, stream, monkeypatch):
    """Compile with every materialisation candidate kept and ``stream`` forced; returns the output and the
    sources of the kernels built."""
    choose, sources = search.choose, []

    def forced(k, gen):
        c = choose(k, gen)
        mats = frozenset(sch.materialize_candidates(k, sch.schedule(k)))
        m = dataclasses.replace(c.mapping, materialize=mats, stream=stream, parallel="rows")
        sources.append(kernel_source(k, m))
        return dataclasses.replace(c, mapping=m)

    monkeypatch.setattr(search, "choose", forced)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="powerfusion")(*args)
    monkeypatch.undo()
    return out, sources


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_materialised_output_is_read_back(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(6, 515, generator=g).to(dtype), torch.randn(6, 515, generator=g).to(dtype),
            torch.randn(515, generator=g).to(dtype)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    want = rmsnorm(*args)
    for stream in (False, True):
        got, srcs = _run(rmsnorm, args, stream, monkeypatch)
        for o, w in zip(got, want):
            torch.testing.assert_close(o, w, **tol)
        src = "\n".join(srcs)
        read_back = "(pf_bf2f(out0[" if dtype == torch.bfloat16 else "(out0["  # h read from the output it went to
        if stream:  # streamed stores bypass the cache: the row buffer stays
            assert "__restrict mat" in src and read_back not in src
        else:
            assert "__restrict mat" not in src and read_back in src


def test_a_materialised_value_that_is_no_output_keeps_its_buffer(monkeypatch):
    x = torch.randn(5, 1037)
    got, srcs = _run(softmax, [x], False, monkeypatch)
    torch.testing.assert_close(got, softmax(x), rtol=1e-5, atol=1e-6)
    assert any("__restrict mat" in s for s in srcs)


def _kernels(fn, args, monkeypatch):
    """The kernels ``fn`` compiles to (forward and backward), as the search sees them."""
    choose, seen = search.choose, []

    def spy(k, gen):
        seen.append((k, gen))
        return choose(k, gen)

    monkeypatch.setattr(search, "choose", spy)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="powerfusion")(*args)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.sum().backward()
    monkeypatch.undo()
    return seen


def _cost_with_and_without(k, gen, vid):
    from bagualu.compiler import cost

    mc = cost.machine(gen)
    base = dataclasses.replace(gen.candidates(k)[0], materialize=frozenset(), stream=False)
    return (cost.predict(k, dataclasses.replace(base, materialize=frozenset({vid})), mc),
            cost.predict(k, base, mc))


def test_the_cost_model_charges_the_row_buffer_a_materialised_value_is_written_to(monkeypatch):
    """Materialising trades recomputation for a store to a row buffer and a read back. A cross-entropy
    backward's one-hot (an index compare and a select) is cheaper to recompute than to store and reload
    (measured on a Zen 5: the kernel 9.6 -> 8.5 ms without the buffer); a softmax's exp is not. A value the
    pass also stores whole to an output is read back from there, so its buffer store is not charged."""
    from bagualu.compiler import cost

    x = torch.randn(64, 1000, requires_grad=True)
    t = torch.randint(0, 1000, (64,))
    seen = _kernels(lambda x: torch.nn.functional.cross_entropy(x, t), [x], monkeypatch)
    bwd = [(k, g) for k, g in seen if sch.materialize_candidates(k, sch.schedule(k))]
    assert bwd, [k.pretty() for k, _ in seen]
    k, gen = bwd[-1]
    (onehot,) = sch.materialize_candidates(k, sch.schedule(k))
    assert k.values[onehot].op == "where", k.pretty()
    kept, recomputed = _cost_with_and_without(k, gen, onehot)
    assert recomputed < kept
    (k, gen), = _kernels(softmax, [torch.randn(64, 1000)], monkeypatch)
    (e,) = [v for v in sch.materialize_candidates(k, sch.schedule(k)) if k.values[v].op == "exp"]
    kept, recomputed = _cost_with_and_without(k, gen, e)
    assert kept < recomputed
    (k, gen), = _kernels(rmsnorm, [torch.randn(64, 1000), torch.randn(64, 1000), torch.randn(1000)], monkeypatch)
    (h,) = sch.materialize_candidates(k, sch.schedule(k))
    base = dataclasses.replace(gen.candidates(k)[0], materialize=frozenset({h}), stream=False, parallel="rows")
    assert h in sch.materialized_outputs(k, sch.schedule(k), base)
    assert h not in sch.materialized_outputs(k, sch.schedule(k), dataclasses.replace(base, stream=True))
    mc = cost.machine(gen)
    charged = cost.predict(k, base, mc)
    monkeypatch.setattr(cost, "MAT_STORE_OPS", 100 * cost.MAT_STORE_OPS)
    assert cost.predict(k, base, mc) == charged  # read back from its output: no buffer store to charge
