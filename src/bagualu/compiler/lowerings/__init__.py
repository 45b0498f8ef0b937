"""Per-operator lowering rules: ATen op -> IR values at an index (see ``lower.py`` for the method).

Each rule is ``rule(ctx, node, idx) -> Value`` for the node's value at multi-index ``idx``. Pointwise
rules pull operands at the broadcast index; layout rules rewrite the index; reductions open an inner
space; ``cat``/``constant_pad_nd`` become selects on index comparisons (the code generator splits the
inner loop at those boundaries, so no branch is left in the vectorised loop). Which of these the
compiler *claims* (and tests against eager with OpInfo) is listed in ``claims.py``.
"""

from bagualu.compiler.lowerings import layout, pointwise, reduce  # noqa: F401  (each registers its rules)
