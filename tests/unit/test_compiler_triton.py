"""PowerFusion's Triton code generator beyond the shared suites (which run it under Triton's interpreter):
every kernel it writes for the LLM subgraphs compiles for a real GPU target with Triton's own compiler
(no GPU needed), what it cannot express stays ATen with the reason reported, and gathers are checked.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from codegens import device_for
from test_compiler_llm import FNS, FUSION, _inputs

from bagualu.compiler import explain
from bagualu.compiler.codegen.gpu import (
    TritonCodegen,
    compile_ptx,
    interpreting,
    module_source,
)
from bagualu.compiler.graph import REPORTS, SEQ

TRITON = {"codegen": "triton"}


pytestmark = pytest.mark.usefixtures("powerfusion_env")


def _since(seq: int):
    return [r for r in REPORTS if r.seq >= seq]  # REPORTS is bounded: count by sequence number, not length


def _device() -> str:
    return device_for("triton")


def test_every_llm_subgraph_kernel_compiles_for_sm90():
    """The kernels the interpreter ran, regenerated as the GPU gets them (libdevice, native bf16
    rounding), through Triton's compiler down to PTX for an H100/H200 (sm_90)."""
    start = SEQ[0]
    for name in FNS:
        for dtype in (torch.float32, torch.bfloat16):
            backward = FUSION[name][1] is not None
            args = [a.to(_device()).detach().requires_grad_(a.requires_grad) for a in _inputs(name, dtype, backward)]
            explain(FNS[name], *args, backward=backward, measure=False, options=TRITON)
    pairs = [(k.kernel, k.call.runner.mapping) for r in _since(start) for k in r.kernels if r.codegen == "triton"]
    assert len(pairs) >= 20
    for i, (k, _) in enumerate(pairs):  # one module: names must be distinct
        k.name = f"k{i}"
    ptx = compile_ptx(pairs, arch=90)
    assert {k.name for k, _ in pairs} <= set(ptx), sorted(ptx)
    assert all(n > 1000 for n in ptx.values())


def test_libdevice_functions_compile_for_the_gpu_and_fall_back_in_the_interpreter():
    def f(x, y):
        return torch.atan2(x * 2, y) + x

    x, y = torch.randn(8, 33), torch.randn(8, 33)
    ex = explain(f, x, y, measure=False, options=TRITON)
    got = torch.compile(f, backend="powerfusion", options=TRITON)(x, y)
    torch.testing.assert_close(got, f(x, y))
    if interpreting():
        reasons = [f[3] for f in ex.fallbacks if f[2] == "aten.atan2.default"]
        assert reasons and "libdevice" in reasons[0], str(ex)
    start = SEQ[0]
    explain(f, x, y, measure=False, options={"codegen": "cpp"})  # the kernel, as the C generator fuses it
    pairs = [(k.kernel, k.call.runner.mapping) for r in _since(start) for k in r.kernels]
    pairs = [(k, TritonCodegen().candidates(k)[0]) for k, _ in pairs]
    assert pairs and "libdevice.atan2" in module_source(pairs, interpret=False)
    assert compile_ptx(pairs)


def test_gather_index_out_of_range_raises_like_aten():
    def f(x, i):
        return torch.gather(x * 2, 1, i)

    x = torch.randn(4, 10, device=_device())
    good = torch.randint(0, 10, (4, 3), device=_device())
    g = torch.compile(f, backend="powerfusion", options=TRITON)
    torch.testing.assert_close(g(x, good), f(x, good))
    with pytest.raises(IndexError, match="out of range"):
        g(x, torch.full((4, 3), 10, device=_device()))


def test_unusable_tile_width_is_refused():
    from bagualu.compiler.codegen.triton_expr import Unsupported
    from bagualu.compiler.codegen.triton_src import TritonWriter
    from bagualu.compiler.ir import Mapping

    start = SEQ[0]
    explain(FNS["softmax"], torch.randn(2, 100), measure=False, options=TRITON)
    (k,) = [k.kernel for r in _since(start) for k in r.kernels]
    with pytest.raises(Unsupported, match="power of two"):
        TritonWriter(k, Mapping(parallel="rows", vector=100), True)
    with pytest.raises(Unsupported, match="only stores"):
        TritonWriter(k, Mapping(parallel="tiles", vector=128), True)


def test_a_whole_tensor_sum_read_by_an_epilogue_over_a_space():
    """A column reduction down to one accumulator (x.sum()) that the epilogue reads at every element of a
    space: the accumulator's load is a scalar (Triton rejects a block mask on a scalar pointer)."""
    def f(x, w):
        return x.sum() * w + x.sum(0)

    x, w = torch.randn(37, 6, device=_device()), torch.randn(6, device=_device())
    start = SEQ[0]
    got = torch.compile(f, backend="powerfusion", options=TRITON)(x, w)
    torch.testing.assert_close(got, f(x, w))
    kernels = [k for r in _since(start) for k in r.kernels]
    assert any(k.kernel.final_stores for k in kernels), [k.kernel.pretty() for k in kernels]
