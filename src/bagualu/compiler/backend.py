"""``torch.compile(fn, backend="powerfusion")``: the Dynamo back-end entry point.

Registered under the ``torch_dynamo_backends`` entry-point group (pyproject.toml), which Dynamo scans
when it meets a backend name it does not know, so ``backend="powerfusion"`` works without importing
``bagualu`` first. The FX graph Dynamo captures goes through AOTAutograd with our decomposition table:
forward and backward become separate ATen graphs (the min-cut partitioner decides what the forward saves
and what the backward recomputes — it prefers saving row statistics over whole activations), and each
is compiled by ``graph.compile_graph``. Inference graphs take the same path without a backward.

``options`` (``torch.compile(..., options={...})``): ``{"partition": "default"}`` uses AOTAutograd's
default partitioner (save everything the backward reads) instead of min-cut rematerialisation;
``{"codegen": "cpp" | "triton"}`` picks a code generator instead of the platform's (``"triton"`` on CPU
tensors runs under Triton's interpreter, ``TRITON_INTERPRET=1``: how the GPU generator is tested);
``{"dynamic_batch": True}`` compiles a graph whose sizes vary in one symbol (a serving engine's token
count) once for every size instead of once per size (``dynamic.py``).
"""

from __future__ import annotations

from typing import Any

import torch


def _boxed(compiled) -> Any:
    """``compiled`` (a graph ``compile_graph`` made) in AOTAutograd's boxed calling convention, run with Dynamo's
    frame callback off: a backward runs inside whatever frame called ``backward()``, which may be one Dynamo
    is compiling, and Dynamo must not trace the regions' Python. One switch per graph call, rather than
    ``torch._disable_dynamo`` on every region call: that wrapper costs ~6 us a call here, ~25 us with cold
    caches, on a ~1 ms router kernel. A graph module is called through its ``forward`` (``nn.Module.__call__``
    only adds hook checks)."""
    run = compiled.forward if isinstance(compiled, torch.fx.GraphModule) else compiled
    try:
        from torch._C._dynamo.eval_frame import set_eval_frame
    except ImportError:  # another torch: the public (slower) way
        from functorch.compile import make_boxed_func

        return make_boxed_func(torch._disable_dynamo(run))

    def call(args):
        prior = set_eval_frame(None)
        try:
            return run(*args)
        finally:
            set_eval_frame(prior)

    call._boxed_call = True
    return call


def _aot_kwargs(options: dict | None) -> dict:
    from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

    from bagualu.compiler.decompositions import decomposition_table
    from bagualu.compiler.graph import compile_graph

    options = dict(options or {})
    from bagualu.compiler.graph import CODEGENS

    part = options.pop("partition", "min_cut")
    codegen = options.pop("codegen", None)
    dynamic_batch = bool(options.pop("dynamic_batch", False))
    if options:
        raise ValueError(f"unknown powerfusion option(s) {sorted(options)}; known: ['codegen', 'dynamic_batch', "
                         f"'partition']")
    if part not in ("min_cut", "default"):
        raise ValueError(f"powerfusion option partition={part!r}; use 'min_cut' or 'default'")
    if codegen is not None and codegen not in CODEGENS:
        raise ValueError(f"powerfusion option codegen={codegen!r}; known: {sorted(CODEGENS)}")

    def compiler(label):
        def fn(g: torch.fx.GraphModule, inputs):
            return _boxed(compile_graph(g, inputs, label, codegen, dynamic_batch))
        return fn

    return dict(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                inference_compiler=compiler("inference"), decompositions=decomposition_table(),
                partition_fn=min_cut_rematerialization_partition if part == "min_cut" else default_partition)


def powerfusion(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict | None = None):
    from torch._functorch.aot_autograd import aot_module_simplified

    return aot_module_simplified(gm, example_inputs, **_aot_kwargs(options))


def aot_compile(fn, options: dict | None = None):
    """The back-end without Dynamo: ``fn`` (tensors in, tensors out, no data-dependent Python control
    flow) traced by AOTAutograd and compiled like a Dynamo graph. Tracing skips Dynamo's bytecode
    analysis, which is most of the compile time of small functions (the OpInfo suite uses it)."""
    from torch._functorch.aot_autograd import aot_function

    kw = _aot_kwargs(options)
    kw.pop("inference_compiler")
    return aot_function(fn, **kw)
