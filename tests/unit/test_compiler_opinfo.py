"""Every operator PowerFusion claims, tested with PyTorch's own OpInfo samples: compiled vs eager.

Iterates ``bagualu.compiler.claims.CLAIMS`` — the list the partitioner takes its fusible set from — so
an op cannot be fused without passing here. Per claim and dtype: the first ``claim.samples`` usable
OpInfo samples run in one function compiled by the back-end's AOTAutograd path (``aot_compile``: the
Dynamo front end is tested elsewhere and would triple the time), forward and, where the claim and the
OpInfo support autograd, backward; every ATen op the claim lists must show up in a fused kernel.
Tolerances per dtype: fp32 1e-5; bf16 PyTorch's defaults, else no worse than twice eager's own error
against an fp64 reference (fusion skips eager's intermediate roundings).

Each case runs through both code generators: C (the CPU's) and Triton (the GPU's, under Triton's
interpreter on CPU tensors). A claim the Triton generator cannot express under the interpreter
(``libdevice`` functions) is skipped there with that reason, visibly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("expecttest")  # torch.testing._internal needs it

from codegens import CODEGENS, device_for  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

from bagualu.compiler.backend import aot_compile  # noqa: E402
from bagualu.compiler.claims import CLAIMS, Claim  # noqa: E402
from bagualu.compiler.report import record  # noqa: E402

OPS = {(o.name, o.variant_test_name): o for o in op_db}
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64, "bool": torch.bool}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2)}


pytestmark = pytest.mark.usefixtures("powerfusion_env")


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for a in x for t in _tensors(a)]
    if isinstance(x, dict):
        return [t for a in x.values() for t in _tensors(a)]
    return []


def _usable(s, kind: str) -> bool:
    ts = _tensors([s.input, s.args, s.kwargs])
    if not ts and kind != "creation":
        return False
    if kind == "layout" and any(t.dim() == 0 for t in _tensors([s.args, s.kwargs])):
        return False  # a tensor offset (narrow's start) is read on the host: a graph break, not a layout
    return all(t.numel() > 0 for t in ts) and not any(t.is_complex() for t in ts)


def _map(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map(a, fn) for a in x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    return x


def _consume(t: torch.Tensor) -> torch.Tensor:
    """A pointwise reader, so a layout/creation op is fused into a kernel rather than left as a view."""
    if t.dtype == torch.bool:
        return torch.logical_not(t)
    if t.dtype.is_floating_point:
        return t * 1.5
    return t + 1


def _program(op, samples, kind):
    """``run(*tensors)``: every sample's op on the given tensors (in ``_tensors(samples)`` order)."""
    def run(*tensors):
        it = iter(tensors)
        outs = []
        for s0 in samples:
            s = type(s0)(_map(s0.input, lambda _: next(it)), args=_map(s0.args, lambda _: next(it)),
                         kwargs=_map(s0.kwargs, lambda _: next(it)))
            x = s.input
            if kind == "layout" and isinstance(x, torch.Tensor):
                x = _consume(x)  # the view then applies to a value computed in the graph, as in a model
            r = op(x, *s.args, **s.kwargs)
            for t in _tensors(r):
                outs.append(_consume(t) if kind in ("layout", "creation") else t)
        return outs
    return run


def _grads(outs, leaves):
    loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs) if o.requires_grad)
    return list(torch.autograd.grad(loss, leaves, allow_unused=True)) if leaves else []


def _close(got, want, dtype, ref=None):
    """Per-dtype tolerance; for bf16 failing it, ``ref()`` (the fp64 result) decides."""
    try:
        torch.testing.assert_close(got, want, equal_nan=True, **TOL.get(dtype, {}))
    except AssertionError:
        if dtype != torch.bfloat16 or ref is None:
            raise
        ref = ref()
        err_ours = (got.double() - ref).abs().nan_to_num().max().item()
        err_eager = (want.double() - ref).abs().nan_to_num().max().item()
        assert err_ours <= 2 * err_eager + 1e-6, (err_ours, err_eager)


CASES = [pytest.param(c, d, id=f"{c.opinfo}{'.' + c.variant if c.variant else ''}-{d}") for c in CLAIMS
         for d in c.dtypes]


@pytest.mark.parametrize("codegen", CODEGENS)
@pytest.mark.parametrize("claim,dtype", CASES)
def test_claimed_op_matches_eager(claim: Claim, dtype: str, codegen: str):
    if codegen == "triton":
        from bagualu.compiler.codegen.gpu import interpreting
        from bagualu.compiler.codegen.triton_expr import INTERPRETER_UNSUPPORTED

        if interpreting() and {a.split(".")[1] for a in claim.aten} & INTERPRETER_UNSUPPORTED:
            pytest.skip("needs libdevice, which Triton's interpreter lacks (compiled for the GPU instead)")
    device = device_for(codegen)
    op = OPS[(claim.opinfo, claim.variant)]
    dt = DT[dtype]
    backward = claim.backward and dt.is_floating_point and op.supports_autograd
    torch.manual_seed(0)
    samples = [s for s in op.sample_inputs(device, dt, requires_grad=backward) if _usable(s, claim.kind)]
    samples = samples[:claim.samples]
    assert samples, f"OpInfo {claim.opinfo!r} has no usable {dtype} sample"
    tensors = [t for s in samples for t in _tensors([s.input, s.args, s.kwargs])]
    leaves = [t for t in tensors if t.requires_grad]
    prog = _program(op, samples, claim.kind)

    with record(measure=False) as ex:
        got = aot_compile(prog, options={"codegen": codegen})(*tensors)
        got_g = _grads(got, leaves) if backward else []
    want = prog(*tensors)
    want_g = _grads(want, leaves) if backward else []

    fused = {o for k in ex.kernels for o in k.ops}
    missing = [a for a in claim.aten if a not in fused]
    assert not missing, f"claimed {missing} not fused:\n{ex}"
    memo = {}

    def fp64():  # the reference, computed only if a bf16 result misses the plain tolerance
        if not memo:
            t64 = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                   for t in tensors]
            outs = prog(*t64)
            memo["out"] = [o.detach() for o in outs]
            memo["grad"] = _grads(outs, [t for t in t64 if t.requires_grad]) if backward else []
        return memo

    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g, w, dt, lambda i=i: fp64()["out"][i])
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        if w is None:
            assert g is None or not g.any()
            continue
        _close(g, w, dt, lambda i=i: fp64()["grad"][i])


def test_every_claim_names_a_real_opinfo_and_aten_op():
    from bagualu.compiler.claims import fusible

    assert all((c.opinfo, c.variant) in OPS for c in CLAIMS)
    assert len(fusible()) >= 60
