"""Expert GEMMs under bf16 autocast (fp32 master weights), both ways the experts may run them: as bf16
GEMMs, or on the fp32 units where the platform measures bf16 GEMMs slower (``gemm_via_fp32``). Either
way the output and every gradient stay within bf16 error of the fp32 computation."""

from __future__ import annotations

import pytest
import torch

import bagualu.moe.experts as experts
from bagualu.moe import Experts

pytestmark = pytest.mark.unit


COUNTS = [12, 0, 30, 7, 20, 1, 16, 10]  # rows per expert (one idle), as a dispatch hands them over


def _run(m, x, autocast: bool):
    m.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(xi, COUNTS)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.float().detach(), xi.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("via_fp32", [False, True])
def test_autocast_experts_close_to_fp32(monkeypatch, via_fp32):
    torch.manual_seed(0)
    m = Experts(8, 64, 96)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(sum(COUNTS), 64)
    y32, dx32, g32 = _run(m, x, autocast=False)
    monkeypatch.setattr(experts, "gemm_via_fp32", lambda dtype, device_type: via_fp32 and dtype == torch.bfloat16)
    y16, dx16, g16 = _run(m, x, autocast=True)
    rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(y16, y32) < 3e-2 and rel(dx16, dx32) < 3e-2
    assert g16.keys() == g32.keys() and all(g16[k].dtype == torch.float32 for k in g16)
    for k in ("gate_proj", "up_proj", "down_proj"):
        assert rel(g16[k], g32[k]) < 3e-2, k
