"""Which stores of a C kernel go through a staging chunk: the decisions the writer (``cpp.py``) and the cost
model (through ``CppCodegen.converts_staged``) share.

A staged store writes its chunk of the loop (``PREFETCH_CHUNK`` elements) to a small aligned array; after the
chunk the array is copied to the output — with non-temporal stores for a streamed store (``Mapping.stream``:
no write-allocate read of the line), and, for a bf16 output on a CPU with AVX512-BF16, converted 32 values at
a time by ``vcvtne2ps2bf16`` from fp32 (``cpp_prelude``'s ``pf_store_bf16``/``pf_stream_bf16``) instead of
GCC's vectorised software rounding (~10 instructions per 16 lanes plus the packing).
"""

from __future__ import annotations

import functools

from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler.index import Expr, Var
from bagualu.compiler.ir import Kernel, Mapping

# a streamed store's loop writes at least this much per run (else plain stores): shorter runs (RoPE's
# 64-element halves of a head, 256 bytes in fp32) were measured slower streamed (2.55 -> 3.12 ms), the
# staging costing more than the write-allocate traffic it saves
STREAM_MIN_BYTES = 1024
# a converted store's loop has at least this many elements
CVT_MIN_ELEMS = 64
# micro-ops costly enough that a pass computing one per element hides the burst of stores each staged chunk
# ends with (see converts)
HEAVY_OPS = frozenset({"exp", "sigmoid", "tanh", "log", "log1p", "log2", "expm1", "erf", "pow", "sin", "cos",
                       "atan2"})


@functools.cache
def bf16_conversion_in_hardware() -> bool:
    """The CPU converts fp32 to bf16 in one instruction (AVX512-BF16's vcvtne2ps2bf16; its subnormal check
    needs AVX512-DQ): ``-march=native`` builds then have ``__AVX512BF16__``, which ``pf_store_bf16`` uses."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512_bf16", "avx512dq"} <= flags
    except OSError:
        pass
    return False


def _contiguous(e: Expr, lv: Var) -> bool:
    return e.linear_in(lv) and e.coeff(lv) == 1 and not e.indirects()


def streams(k: Kernel, it: sch.Item, e: Expr, lv: Var) -> bool:
    """Whether store item ``it``, at index ``e`` in a loop over ``lv``, is streamed under ``Mapping.stream``:
    contiguous along the loop, over a run of at least ``STREAM_MIN_BYTES``."""
    return it.kind == "store" and lv.size * k.outputs[it.obj.buf].itemsize >= STREAM_MIN_BYTES and _contiguous(e, lv)


def heavy(p: sch.Pass) -> bool:
    """Pass ``p`` computes a transcendental function per element."""
    return any(v.op in HEAVY_OPS for v in sch.values_needed([it.value for it in p.items]))


def may_convert(strip_mined: bool, reduces: bool) -> bool:
    """Whether a pass's stores may be staged for conversion at all: on a CPU with the instruction, and, for a
    pass that reduces, only when its loop is strip-mined anyway (prefetching or streaming): each chunk ends its
    reductions' vectors in a horizontal sum, which costs about what the conversions save."""
    return bf16_conversion_in_hardware() and (strip_mined or not reduces)


def converts(k: Kernel, p: sch.Pass, it: sch.Item, e: Expr, lv: Var, streamed: bool) -> bool:
    """Whether store ``it`` of pass ``p`` (index ``e`` in the loop over ``lv``), in a pass ``may_convert``
    allows, is staged in fp32 for the conversion instruction: a bf16 store contiguous along the loop, either
    streamed (staged anyway) or in a pass that computes a transcendental function per element. A light pass
    loses by it: its chunk's stores, issued in one burst after the loop instead of spread through it, each
    wait for their line to be read first (a row buffer scaled into a bf16 output, one Zen 5 core: 3.5 ms
    spread, 5.3 ms staged, 1.9 ms staged and streamed, which reads no line)."""
    return (k.outputs[it.obj.buf].dtype == "bf16" and lv.size >= CVT_MIN_ELEMS and _contiguous(e, lv)
            and (streamed or heavy(p)))


def converts_staged(k: Kernel, p: sch.Pass, m: Mapping) -> bool:
    """The cost model's view: whether pass ``p``'s bf16 stores are converted in hardware under mapping ``m``
    (every one of them; a pass reducing counts as strip-mined when ``m`` prefetches or streams)."""
    if p.space is None:
        return False
    stores = [it for it in p.items if it.kind == "store" and k.outputs[it.obj.buf].dtype == "bf16"]
    reduces = any(it.kind in ("reduce", "colreduce") for it in p.items)
    lv = p.space.vars[-1]
    return bool(stores) and may_convert(m.prefetch or m.stream, reduces) and all(
        converts(k, p, it, it.obj.index, lv, m.stream and streams(k, it, it.obj.index, lv)) for it in stores)
