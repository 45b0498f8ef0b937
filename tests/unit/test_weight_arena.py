"""``bagualu.memory.weight_arena``: a module's weights moved into one huge-page-backed buffer in module order."""

from __future__ import annotations

import torch
from torch import nn

from bagualu.memory import huge_pages as hp
from bagualu.memory.weight_arena import ALIGN, module_storages, pack_module


class Fused(nn.Module):
    """Two linears whose weights are views of one fused tensor attribute, as ``Attention.fuse_projections``
    leaves them, plus a buffer and a parameter of another dtype."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 48), nn.Linear(32, 16, bias=False)
        self.fused = torch.cat([self.a.weight.detach(), self.b.weight.detach()])
        self.a.weight = nn.Parameter(self.fused[:48], requires_grad=False)
        self.b.weight = nn.Parameter(self.fused[48:], requires_grad=False)
        self.register_buffer("scale", torch.full((7,), 0.5))
        self.narrow = nn.Parameter(torch.randn(3, 5).bfloat16())
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.cat([self.a(x), self.b(x)], -1) * self.scale.sum()
        return self.out(h) + self.narrow.float().sum()


def test_packs_every_storage_once_in_module_order_keeping_values_and_views():
    torch.manual_seed(0)
    m = Fused()
    x = torch.randn(4, 32)
    want = m(x)
    groups = module_storages(m)
    # a module's own parameters, buffers and tensor attributes, then its children's; the fused weight is one
    # storage with three tensor objects (the attribute and the two views)
    assert [len(g) for g in groups] == [1, 1, 3, 1, 1, 1]
    first = [g[0] for g in groups]
    assert first[0] is m.narrow and first[1] is m.scale and first[2] is m.fused and first[3] is m.a.bias
    sizes = [g[0].untyped_storage().nbytes() for g in groups]

    report = pack_module(m)
    assert report.storages == 6 and report.tensors == 8
    assert report.nbytes == sum(-(-n // ALIGN) * ALIGN for n in sizes)
    ptrs = [g[0].untyped_storage().data_ptr() for g in module_storages(m)]
    assert len(set(ptrs)) == 1  # one storage now: the arena
    starts = [t.data_ptr() for t in (m.narrow, m.scale, m.fused, m.a.bias, m.out.weight, m.out.bias)]
    assert starts == sorted(starts) and starts[0] % hp.HUGE == 0  # in module order, from a 2 MiB boundary
    assert all(s % ALIGN == 0 for s in starts)
    # the views still view the fused weight
    assert m.a.weight.data_ptr() == m.fused.data_ptr() and m.b.weight.data_ptr() == m.fused[48:].data_ptr()
    assert not m.a.weight.requires_grad and m.narrow.requires_grad and isinstance(m.narrow, nn.Parameter)
    assert torch.equal(m(x), want)
    if report.huge_pages.mode in ("always", "madvise"):
        assert report.huge_pages.spans == 1 and report.huge_pages.advised_bytes >= report.nbytes


def test_inference_tensors_and_an_empty_module():
    with torch.inference_mode():
        m = nn.Linear(8, 8)
        want = m.weight.clone()
    r = pack_module(m)
    assert r.storages == 2 and torch.equal(m.weight, want)
    assert pack_module(nn.ReLU()).nbytes == 0
