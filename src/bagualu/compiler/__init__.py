"""PowerFusion (L3): an operator-fusion compiler for memory-intensive operators, as a ``torch.compile`` back-end.

``torch.compile(model, backend="powerfusion")`` → AOTAutograd (forward and backward) → partition into
fusion regions (GEMMs, convolutions, attention stay with the vendor library) → the fusion IR (``ir.py``:
loads, local buffers, micro-ops, reductions, stores, an explicit parallel mapping) → search over mappings
with a cost model and optional measurement (``search.py``) → a code generator per chip (``codegen/``).
``explain(fn, *args)`` reports what happened. Nothing is compiled or probed at import.
"""

from bagualu.compiler.backend import powerfusion

__all__ = ["powerfusion", "explain"]


def __getattr__(name):
    if name == "explain":
        from bagualu.compiler.report import explain

        return explain
    raise AttributeError(name)
