"""The CPU code generator: C with OpenMP and SIMD, built by the system compiler, called through ctypes.

``CppCodegen.build`` writes every kernel of a graph into one translation unit (one compiler run per
graph, ~0.3 s, cached on disk by content), loads it and wraps each function in a ``CpuKernel``: check the
input layouts the kernel was specialised for, allocate outputs, pass data pointers, raise on an
out-of-range gather index as ATen would.

Outputs of at least ``POOL_MIN_BYTES`` come from a small per-kernel pool: with glibc's default malloc,
every fresh allocation above its mmap threshold (up to 32 MiB) is new pages, faulted in on each call at
a tenth of the memory bandwidth. A pooled buffer is handed out again only when nothing else holds it —
no Python reference, no other TensorImpl (autograd saves outputs as shallow copies, views share the
storage), checked through the tensor's and its storage's use counts — so reuse is never visible.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path
from typing import Sequence

import torch

from bagualu.compiler.codegen import build as cbuild
from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler.codegen.cpp import kernel_source
from bagualu.compiler.codegen.cpp_prelude import PRELUDE
from bagualu.compiler.codegen.cpp_stage import converts_staged, streams
from bagualu.compiler.cost import traffic
from bagualu.compiler.ir import Kernel, Mapping
from bagualu.compiler.lower import IR_TO_TORCH

POOL_MIN_BYTES = 8 << 20
POOL_PER_OUTPUT = 2


class _Pool:
    def __init__(self, shape, strides, dtype):
        self.shape, self.strides, self.dtype = tuple(shape), tuple(strides), dtype
        self.free: list[torch.Tensor] = []

    def get(self) -> torch.Tensor:
        lst = self.free
        for i in range(len(lst)):
            # refs: the list slot and getrefcount's argument; the tensor impl held by this object alone
            if sys.getrefcount(lst[i]) == 2 and lst[i]._use_count() == 1 \
                    and torch._C._storage_Use_Count(lst[i].untyped_storage()._cdata) == 2:
                return lst[i]
        t = torch.empty_strided(self.shape, self.strides, dtype=self.dtype)
        if len(lst) < POOL_PER_OUTPUT:
            lst.append(t)
        return t


class CpuKernel:
    """A compiled kernel: ``kernel(*inputs) -> tuple(outputs)``."""

    def __init__(self, kernel: Kernel, fn, mapping: Mapping):
        self.kernel = kernel
        self.mapping = mapping
        self.__name__ = kernel.name
        self.__module__ = __name__
        self.fn = fn
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int64
        self.in_layout = [(IR_TO_TORCH[b.dtype], b.shape, b.strides) for b in kernel.inputs]
        self.nbuf = len(kernel.inputs) + len(kernel.outputs)
        self.pools = []
        self.out_specs = []
        for b in kernel.outputs:
            dt = IR_TO_TORCH[b.dtype]
            if b.numel * b.itemsize >= POOL_MIN_BYTES:
                self.pools.append(_Pool(b.shape, b.strides, dt))
                self.out_specs.append(None)
            else:
                self.pools.append(None)
                self.out_specs.append((b.shape, b.strides, dt))

    def matches(self, inputs: Sequence[torch.Tensor]) -> bool:
        for t, (dt, shape, strides) in zip(inputs, self.in_layout):
            if t.dtype != dt or tuple(t.shape) != shape or (t.stride() != strides and t.numel() > 1) \
                    or t.device.type != "cpu":
                return False
        return True

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for pool, spec in zip(self.pools, self.out_specs):
            outs.append(pool.get() if pool is not None else torch.empty_strided(spec[0], spec[1], dtype=spec[2]))
        ptrs = (ctypes.c_void_p * self.nbuf)(*[t.data_ptr() for t in inputs], *[t.data_ptr() for t in outs])
        err = self.fn(ptrs, torch.get_num_threads(), 0)
        if err:
            raise IndexError(f"powerfusion kernel {self.kernel.name}: an index of a gather/scatter is out of range "
                             f"(ops: {', '.join(self.kernel.ops)})")
        return tuple(outs)


@functools.cache
def data_cache_bytes() -> dict[int, int]:
    """Level -> size of CPU 0's data or unified cache at that level, from sysfs (Linux); empty when unknown."""
    out: dict[int, int] = {}
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            level = int((d / "level").read_text())
            size = (d / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        try:
            out[level] = max(out.get(level, 0), int(size.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return out


def last_level_cache_bytes() -> int:
    """Size of CPU 0's highest-level data or unified cache; 0 when unknown."""
    caches = data_cache_bytes()
    return caches[max(caches)] if caches else 0


def _streamable(kernel: Kernel, passes) -> bool:
    """Some store is contiguous along its pass's innermost loop, over a run the writer would stream."""
    return any(streams(kernel, it, it.obj.index, p.space.vars[-1])
               for p in passes if p.space is not None for it in p.items if it.kind == "store")


def _tileable(passes) -> bool:
    """Only stores, each pass over a space of at least two variables: (row, head) pairs are independent."""
    return bool(passes) and all(p.space is not None and len(p.space.vars) >= 2 and
                                all(it.kind == "store" for it in p.items) for p in passes)


@functools.cache
def simd_lanes() -> int:
    """fp32 lanes of a reduction loop's ``simdlen``: two vectors of the widest the CPU has. On AVX-512 CPUs GCC
    (tuned for AVX2 parts by ``-march=native`` when it does not know the model) implements ``simdlen(16)``
    with 256-bit registers; ``simdlen(32)`` gets 512-bit ones, twice the work per instruction on cores with
    full-width units (an exp-bound bf16 softmax: 1.2x here, Zen 5)."""
    return 32 if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX") else 16


class CppCodegen:
    """Code generator for host CPUs (registered by the cpu platform as ``compiler_codegen``)."""

    name = "cpp"

    def candidates(self, kernel: Kernel) -> list[Mapping]:
        passes = sch.schedule(kernel)
        mats = sch.materialize_candidates(kernel, passes)
        has_red = any(p.space is not None and any(it.kind == "reduce" for it in p.items) for p in passes)
        out = []
        pars = ["rows", "serial"] if kernel.rows > 1 else ["serial"]
        if _tileable(passes):
            pars.append("tiles")
        space_passes = [p.space.name for p in passes if p.space is not None]
        multipass = len(space_passes) != len(set(space_passes))
        read, write = traffic(kernel)
        streams = [False, True] if read + write > self.llc_bytes() > 0 and _streamable(kernel, passes) else [False]
        for par in pars:
            for vec in ([0, simd_lanes()] if has_red else [0]):
                for mat in ([frozenset(), frozenset(mats)] if mats else [frozenset()]):
                    for pf in ([False, True] if multipass and par != "tiles" else [False]):
                        for nt in streams:
                            out.append(Mapping(parallel=par, vector=vec, materialize=mat, prefetch=pf, stream=nt))
        return out

    def llc_bytes(self) -> int:
        """The last-level cache (0 when unknown): a kernel moving more than this streams its stores."""
        return last_level_cache_bytes()

    def converts_staged(self, k: Kernel, p, m: Mapping) -> bool:
        """Whether this generator converts pass ``p``'s bf16 stores with the CPU's instruction under ``m`` (the
        cost model's store cost follows)."""
        return converts_staged(k, p, m)

    def l1_bytes(self) -> int:
        """The first-level data cache (0 when unknown): row buffers beyond it spill to the next level."""
        return data_cache_bytes().get(1, 0)

    def source(self, pairs: Sequence[tuple[Kernel, Mapping]]) -> str:
        return PRELUDE + "\n\n".join(kernel_source(k, m) for k, m in pairs) + "\n"

    def build(self, pairs: Sequence[tuple[Kernel, Mapping]]) -> list[CpuKernel]:
        if not pairs:
            return []
        lib, _secs, _hit = cbuild.build(self.source(pairs))
        return [CpuKernel(k, getattr(lib, k.name), m) for k, m in pairs]
