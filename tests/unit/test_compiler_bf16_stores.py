"""bf16 outputs converted by the CPU's instruction (AVX512-BF16 ``vcvtne2ps2bf16``) from an fp32 staging chunk:
where the C code generator does it (streamed stores, and passes computing a transcendental function), and
that it rounds every value as the software conversion does — subnormals (which the instruction reads as
zero), ties, NaNs, infinities, the largest floats — in whole vectors, mixed vectors and ragged tails. On a
CPU without the instruction the generator never stages (checked too), so these run everywhere."""

from __future__ import annotations

import struct

import pytest
import torch

from bagualu.compiler import graph as G
from bagualu.compiler.codegen import cpp_stage, cpu

pytestmark = pytest.mark.usefixtures("powerfusion_env")


def _bits(*words: int) -> list[float]:
    return [struct.unpack("<f", struct.pack("<I", w))[0] for w in words]


def _special_row(n: int, g: torch.Generator) -> torch.Tensor:
    """n fp32 values: random normals, then (scattered) subnormals, ties to even at the bf16 rounding point,
    NaNs with payloads and signs, infinities, the largest finite floats, zeros."""
    x = torch.randn(n, generator=g) * 100
    special = torch.tensor(_bits(
        0x00000001, 0x80000001, 0x007FFFFF, 0x00400000, 0x00018000,  # subnormals
        0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF,  # ties (to even, both ways), just below a tie
        0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FA12345,  # quiet and signalling NaNs, payloads, signs
        0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF,  # infinities, largest finite (rounds to inf)
        0x00000000, 0x80000000, 0x00800000))  # zeros, smallest normal
    idx = torch.randperm(n, generator=g)[:len(special)]
    x[idx] = special
    return x


def _as_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """The reference rounding (nearest even; NaNs quieted with their sign and payload kept), as int16."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = torch.isnan(x)
    r = torch.where(nan, (u >> 16) | 0x40, r)
    return (r & 0xFFFF).to(torch.int32)


def _fn(x, e):
    return (x * torch.exp(e)).to(torch.bfloat16)  # exp(0) = 1 exactly: the output is x rounded to bf16


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("width", [32, 1037, 2048 + 19])  # a whole vector; chunks with ragged tails
def test_converted_stores_round_as_the_software_conversion(compile_streamed, stream, width):
    g = torch.Generator().manual_seed(width)
    x = torch.stack([_special_row(width, g) for _ in range(3)])
    x[1] = torch.randn(width, generator=g)  # a row without subnormals: every vector on the fast path
    out, kernels = compile_streamed(_fn, (x, torch.zeros_like(x)), stream)
    assert kernels
    got = out.view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(got, _as_bf16_bits(x))


def _kernel(fn, *args):
    torch._dynamo.reset()
    start = G.SEQ[0]
    torch.compile(fn, backend="powerfusion")(*args)
    (k,) = [k.kernel for r in G.REPORTS if r.seq >= start for k in r.kernels]
    return k


def _body(k, m) -> str:
    return cpu.CppCodegen().source([(k, m)]).split(f"int64_t {k.name}(", 1)[1]


def test_where_the_generator_stages_bf16_stores(monkeypatch):
    """Staged for the instruction: the bf16 stores of a pass with a transcendental function, and streamed
    ones; not a light pass's plain stores (their burst after each chunk waits on write-allocate reads), nor
    fp32 outputs, nor anything on a CPU without the instruction."""
    x = torch.randn(4, 700)
    heavy = _kernel(lambda a, b: (a * torch.exp(b)).to(torch.bfloat16), x, x)
    light = _kernel(lambda a: (a * 3).to(torch.bfloat16), x)
    wide = _kernel(lambda a, b: a * torch.exp(b), x, x)
    hw = cpp_stage.bf16_conversion_in_hardware()
    assert ("pf_store_bf16(&out0" in _body(heavy, cpu.Mapping())) == hw
    assert "pf_store_bf16(" not in _body(light, cpu.Mapping())
    assert ("pf_stream_bf16(&out0" in _body(light, cpu.Mapping(stream=True))) == hw  # rows of 1400 bytes
    for m in (cpu.Mapping(), cpu.Mapping(stream=True)):
        assert "pf_store_bf16(" not in _body(wide, m) and "pf_stream_bf16(" not in _body(wide, m)
    monkeypatch.setattr(cpp_stage, "bf16_conversion_in_hardware", lambda: False)
    for k in (heavy, light):
        for m in (cpu.Mapping(), cpu.Mapping(stream=True)):
            body = _body(k, m)
            assert "pf_store_bf16(" not in body and "pf_stream_bf16(" not in body
