"""The GPU code generator: Triton kernels for CUDA (and ROCm) devices, checked on CPU by Triton's interpreter.

``TritonCodegen.build`` writes every kernel of a graph into one Python module (cached by content under
``$BAGUALU_CACHE_DIR/powerfusion/triton``), imports it — ``@triton.jit`` needs a source file — and wraps
each kernel in a ``TritonKernel``: check the input layouts the kernel was specialised for, allocate the
outputs (and column partials) on the inputs' device, launch the grid the mapping implies, then the
epilogue kernel, and raise on an out-of-range gather index as ATen would.

With ``TRITON_INTERPRET=1`` Triton runs the same kernels on CPU tensors (NumPy underneath): that is how
this generator is tested on machines without a GPU, and it can be forced there with
``torch.compile(..., backend="powerfusion", options={"codegen": "triton"})``. ``compile_ptx`` compiles
kernels for a GPU target without a GPU, which the tests use to check that Triton's real compiler accepts
every kernel the interpreter ran.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler.codegen.triton_expr import PRELUDE, Unsupported
from bagualu.compiler.codegen.triton_src import (
    MODULE_HEADER,
    TritonWriter,
    grid_of,
    is_pointwise,
    next_pow2,
)
from bagualu.compiler.ir import Kernel, Mapping
from bagualu.compiler.lower import IR_TO_TORCH
from bagualu.utils import env

_MODULES: dict[str, object] = {}
_IDENT = {"sum": 0, "max": float("-inf"), "min": float("inf")}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cache_dir() -> Path:
    return Path(env.get("BAGUALU_CACHE_DIR")) / "powerfusion" / "triton"


def load_module(source: str):
    """Import generated source from a file named by its hash (``triton.jit`` reads functions' source)."""
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"pf_{key}.py"
    if not path.exists():
        tmp = d / f".pf_{key}.{os.getpid()}.tmp"
        tmp.write_text(source)
        os.replace(tmp, path)
    name = f"bagualu_powerfusion_triton_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _MODULES[key] = mod
    return mod


def module_source(pairs: Sequence[tuple[Kernel, Mapping]], interpret: bool) -> str:
    lib = "" if interpret else "from triton.language.extra import libdevice"
    return MODULE_HEADER.format(libdevice=lib) + PRELUDE + "\n\n" + "\n\n\n".join(
        TritonWriter(k, m, interpret).write() for k, m in pairs) + "\n"


class TritonKernel:
    """A compiled kernel: ``kernel(*inputs) -> tuple(outputs)`` on the inputs' device."""

    def __init__(self, kernel: Kernel, mapping: Mapping, fn, final_fn, uses_err: bool, device_type: str):
        self.kernel = kernel
        self.mapping = mapping
        self.__name__ = kernel.name
        self.__module__ = __name__
        self.fn, self.final_fn = fn, final_fn
        self.grid = grid_of(kernel, mapping)
        self.nprog = self.grid[0] if mapping.parallel != "tiles" else 1
        self.uses_err = uses_err
        self.device_type = device_type
        self.in_layout = [(IR_TO_TORCH[b.dtype], b.shape, b.strides) for b in kernel.inputs]
        self.out_specs = [(b.shape, b.strides, IR_TO_TORCH[b.dtype]) for b in kernel.outputs]
        self.part_specs = [(self.nprog * cr.size, IR_TO_TORCH[cr.value.dtype], _IDENT[cr.kind])
                           for cr in kernel.col_reduces]

    def matches(self, inputs: Sequence[torch.Tensor]) -> bool:
        for t, (dt, shape, strides) in zip(inputs, self.in_layout):
            if t.dtype != dt or tuple(t.shape) != shape or (t.stride() != strides and t.numel() > 1) \
                    or t.device.type != self.device_type:
                return False
        return True

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dev = inputs[0].device if inputs else torch.device(self.device_type)
        outs = [torch.empty_strided(s, st, dtype=dt, device=dev) for s, st, dt in self.out_specs]
        parts = []
        for n, dt, ident in self.part_specs:
            if not dt.is_floating_point and ident != 0:
                ident = torch.iinfo(dt).min if ident < 0 else torch.iinfo(dt).max
            parts.append(torch.full((n,), ident, dtype=dt, device=dev))
        err = [torch.zeros(1, dtype=torch.int32, device=dev)] if self.uses_err else []
        self.fn[self.grid](*inputs, *outs, *parts, *err, 0)
        if self.final_fn is not None:
            self.final_fn[(1,)](*inputs, *outs, *parts, 0)
        if self.uses_err and int(err[0].item()):
            raise IndexError(f"powerfusion kernel {self.kernel.name}: an index of a gather/scatter is out of range "
                             f"(ops: {', '.join(self.kernel.ops)})")
        return tuple(outs)


class TritonCodegen:
    """Code generator for GPUs through Triton (registered by the cuda platform as ``compiler_codegen``)."""

    name = "triton"
    call_seconds = 6e-6  # a launch from Python
    fork_seconds = 0.0
    row_seconds = 1e-10

    def __init__(self) -> None:
        import triton.language as tl  # fails here (the regions stay ATen, with this reason) when absent

        if interpreting() and type(tl.zeros_like).__name__ != "InterpretedFunction":
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; Triton decides at import "
                               "whether its library is interpreted, so set it before")

    def cache_bytes(self) -> int:
        return 256 << 10  # a resident program's share of L2: a row re-read by a later pass comes from there

    def device_type(self) -> str:
        if interpreting():
            return "cpu"
        from bagualu.platform import current_platform

        return current_platform().device_type

    def candidates(self, kernel: Kernel) -> list[Mapping]:
        passes = sch.schedule(kernel)
        widest = max([p.space.numel for p in passes if p.space is not None] or [1])
        widths = sorted({max(16, min(next_pow2(widest), w)) for w in (256, 1024, 4096)}, reverse=True)
        mats = sch.materialize_candidates(kernel, passes)
        out = []
        if is_pointwise(passes):
            out += [Mapping(parallel="tiles", vector=w) for w in widths if w <= 1024]
        for w in widths:
            # a persistent tile keeps every value of its space in registers across passes: what the
            # cost model calls materialised (the writer needs no instruction for it)
            held = frozenset(v for v in mats if kernel.space_of(kernel.values[v]).numel <= w)
            out.append(Mapping(parallel="rows", vector=w, materialize=held))
            if kernel.rows >= 1024:
                out.append(Mapping(parallel="rows", vector=w, materialize=held, row_block=4))
        return out

    def unsupported(self, kernel: Kernel) -> str | None:
        """Why this generator cannot express ``kernel`` (None: it can)."""
        try:
            TritonWriter(kernel, self.candidates(kernel)[-1], interpreting()).write()
        except Unsupported as e:
            return str(e)
        return None

    def build(self, pairs: Sequence[tuple[Kernel, Mapping]]) -> list[TritonKernel]:
        if not pairs:
            return []
        mod = load_module(module_source(pairs, interpreting()))
        dev = self.device_type()
        out = []
        for k, m in pairs:
            final = getattr(mod, f"{k.name}_final", None)
            w = TritonWriter(k, m, interpreting())
            out.append(TritonKernel(k, m, getattr(mod, k.name), final, w.uses_err, dev))
        return out


def compile_ptx(pairs: Sequence[tuple[Kernel, Mapping]], arch: int = 90) -> dict[str, int]:
    """Compile kernels as a GPU gets them (libdevice, no interpreter) for NVIDIA ``sm_<arch>`` — no GPU
    needed — and return kernel name -> bytes of PTX; raises ``RuntimeError`` with the compiler's message.

    Runs in a fresh interpreter: Triton decides at import whether its own library functions are
    interpreted, so a process that imported it with ``TRITON_INTERPRET=1`` cannot compile for real.
    """
    source = module_source(pairs, interpret=False)
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"ptx_{hashlib.sha256(source.encode()).hexdigest()[:24]}.py"
    path.write_text(source)
    sigs = {}
    for k, m in pairs:
        ptrs = [f"*{_tt(b.dtype)}" for b in k.inputs + k.outputs] + [f"*{_tt(cr.value.dtype)}" for cr in k.col_reduces]
        sigs[k.name] = ptrs + (["*i32"] if TritonWriter(k, m, False).uses_err else []) + ["i64"]
        if k.col_reduces or k.final_stores:
            sigs[f"{k.name}_final"] = ptrs + ["i64"]
    env_ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "bagualu.compiler.codegen.gpu", str(path), str(arch), json.dumps(sigs)],
                       env=env_, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"Triton failed to compile {path} for sm_{arch}:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _compile_main(path: str, arch: str, sigs_json: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location("bagualu_powerfusion_ptx", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = {}
    for name, types in json.loads(sigs_json).items():
        jit = getattr(mod, name)
        sig = dict(zip(jit.arg_names, types))
        ck = triton.compile(ASTSource(fn=jit, signature=sig, constexprs={}), target=GPUTarget("cuda", int(arch), 32))
        out[name] = len(ck.asm["ptx"])
    print(json.dumps(out))


def _tt(dtype: str) -> str:
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "f64": "fp64", "i64": "i64", "i32": "i32", "b8": "i1",
            "i8": "i8", "u8": "u8"}[dtype]


if __name__ == "__main__":
    _compile_main(*sys.argv[1:4])
