"""Code generators: fusion-IR kernels -> runnable callables for one kind of chip.

A platform names its generator by dotted path under ``kernel_backends["compiler_codegen"]`` (the CPU
platform names ``bagualu.compiler.codegen.cpu:CppCodegen``), so vendor tool chains (Triton, a
vendor's C compiler) are imported only on the chip that uses them. A generator provides:

- ``candidates(kernel) -> list[Mapping]``: the mappings worth considering on this chip (the search
  scores them with the shared cost model and, optionally, by measuring);
- ``build(pairs) -> list[callable]``: one callable per ``(kernel, mapping)``, taking the kernel's input
  tensors and returning its output tensors, all built together (one compiler run per graph).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from bagualu.compiler.ir import Kernel, Mapping


class CodeGenerator(Protocol):
    name: str

    def candidates(self, kernel: Kernel) -> list[Mapping]: ...

    def build(self, pairs: Sequence[tuple[Kernel, Mapping]]) -> list[Callable[..., tuple[torch.Tensor, ...]]]: ...
