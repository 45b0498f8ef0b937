"""The CPU ``rms_norm`` / ``apply_rope`` / ``write_kv`` kernels (``ops/decode_ops_cpu.py``) against the reference;
outside inference mode, and without a compiler, the reference itself runs."""

from __future__ import annotations

import pytest
import torch

from bagualu.ops import decode_ops_cpu as dops
from bagualu.ops import kernel, native, paged_kv, reference

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def built():
    if dops.library() is None:
        pytest.skip("no C++ compiler: the reference is used")


@pytest.mark.parametrize("shape", [(1, 768), (5, 64), (3, 2, 100), (7,), (2, 13)])
def test_rms_norm(shape):
    x, w = torch.randn(*shape), torch.randn(shape[-1])
    with torch.inference_mode():
        got = kernel("rms_norm", "cpu")(x, w, 1e-5)
        strided = dops.rms_norm(torch.randn(4, 3 * shape[-1])[:, :shape[-1]], w, 1e-6)
    assert got.shape == x.shape and strided.shape == (4, shape[-1])
    torch.testing.assert_close(got, reference.rms_norm(x, w, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("B,H,G,S,Dh,Dr,cos_batch", [(3, 12, 4, 1, 64, 64, 3), (2, 4, 2, 5, 32, 16, 1),
                                                      (1, 8, 8, 7, 128, 128, 1), (4, 2, 1, 3, 10, 6, 4)])
def test_rope_is_bit_identical(B, H, G, S, Dh, Dr, cos_batch):
    qkv = torch.randn(B, S, (H + 2 * G) * Dh)  # q and k as strided views of a fused projection
    q = qkv[..., :H * Dh].view(B, S, H, Dh).transpose(1, 2)
    k = qkv[..., H * Dh:(H + G) * Dh].view(B, S, G, Dh).transpose(1, 2)
    cos, sin = torch.randn(cos_batch, S, Dr), torch.randn(cos_batch, S, Dr)
    with torch.inference_mode():
        got = kernel("apply_rope", "cpu")(q, k, cos, sin)
    want = reference.apply_rope(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_and_its_errors(dtype):
    kc, vc = torch.zeros(10, 4, 16, 64, dtype=dtype), torch.zeros(10, 4, 16, 64, dtype=dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    kv = torch.randn(5, 2, 4, 64)
    k, v = kv[:, 0], kv[:, 1]  # strided token rows
    slots = torch.tensor([0, 17, 159, 40, 3])
    with torch.inference_mode():
        kernel("write_kv", "cpu")(kc, vc, k, v, slots)
        with pytest.raises(ValueError, match=r"\[0, num_blocks\*block_size=160\); got min 0, max 160"):
            kernel("write_kv", "cpu")(kc, vc, k, v, torch.tensor([0, 1, 160, 2, 3]))
        with pytest.raises(ValueError, match="kv_heads"):
            kernel("write_kv", "cpu")(kc, vc, k[:, :2], v[:, :2], slots)
    paged_kv.write_kv(kc2, vc2, k, v, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


BF16 = torch.bfloat16


@pytest.mark.parametrize("shape", [(1, 768), (2048, 768), (5, 64), (3, 2, 100), (7,)])
def test_rms_norm_bf16_rounds_where_the_reference_rounds(shape):
    """bf16 x and weight (a bf16 model's large step): the normalised row and the weight product each rounded
    to bf16, as the reference's bf16 ops; the mean of squares sums in another order, so a normalised value
    may round one bf16 step away where that moves it across a rounding midpoint (1 in 300,000 at 2048 x 768)."""
    g = torch.Generator().manual_seed(shape[0])
    x, w = (torch.randn(*shape, generator=g) * 2).to(BF16), torch.randn(shape[-1], generator=g).to(BF16)
    with torch.inference_mode():
        got = kernel("rms_norm", "cpu")(x, w, 1e-5)
        strided = dops.rms_norm(torch.randn(4, 3 * shape[-1]).to(BF16)[:, :shape[-1]], w, 1e-6)
    want = reference.rms_norm(x, w, 1e-5)
    assert got.dtype is BF16 and got.shape == x.shape and strided.shape == (4, shape[-1]) and strided.dtype is BF16
    # one bf16 step of the rounded row, scaled by the weight, plus the product's own rounding step
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=1e-6)
    assert (got == want).float().mean() > 0.999


@pytest.mark.parametrize("B,H,G,S,Dh,Dr,cos_batch", [(2048, 12, 4, 1, 64, 64, 2048), (2, 4, 2, 5, 32, 16, 1),
                                                      (4, 2, 1, 3, 10, 6, 4)])
def test_rope_bf16_is_bit_identical(B, H, G, S, Dh, Dr, cos_batch):
    """bf16 q, k, cos, sin (many rows: split among the threads): each product and the sum rounded as the
    reference's bf16 ops round them, bit for bit; partial rotary passes the rest through."""
    g = torch.Generator().manual_seed(B + Dr)
    qkv = (torch.randn(B, S, (H + 2 * G) * Dh, generator=g) * 3).to(BF16)
    q = qkv[..., :H * Dh].view(B, S, H, Dh).transpose(1, 2)
    k = qkv[..., H * Dh:(H + G) * Dh].view(B, S, G, Dh).transpose(1, 2)
    cos, sin = torch.randn(cos_batch, S, Dr, generator=g).to(BF16), torch.randn(cos_batch, S, Dr, generator=g).to(BF16)
    with torch.inference_mode():
        got = kernel("apply_rope", "cpu")(q, k, cos, sin)
    want = reference.apply_rope(q, k, cos, sin)
    assert got[0].dtype is BF16 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_write_kv_bf16_rows_into_a_bf16_cache_and_its_errors():
    kc, vc = torch.zeros(10, 4, 16, 64, dtype=BF16), torch.zeros(10, 4, 16, 64, dtype=BF16)
    kc2, vc2 = kc.clone(), vc.clone()
    kv = torch.randn(5, 2, 4, 64).to(BF16)
    k, v = kv[:, 0], kv[:, 1]  # strided token rows
    slots = torch.tensor([0, 17, 159, 40, 3])
    with torch.inference_mode():
        kernel("write_kv", "cpu")(kc, vc, k, v, slots)
        with pytest.raises(ValueError, match=r"\[0, num_blocks\*block_size=160\); got min -1, max 3"):
            kernel("write_kv", "cpu")(kc, vc, k, v, torch.tensor([0, 1, -1, 2, 3]))
    paged_kv.write_kv(kc2, vc2, k, v, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and kc.abs().sum() > 0


def test_training_and_no_compiler_use_the_reference(monkeypatch, tmp_path):
    x = torch.randn(3, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    dops.rms_norm(x, w, 1e-5).sum().backward()  # not inference mode: the reference, with autograd
    assert x.grad is not None
    monkeypatch.setenv("BAGUALU_NO_NATIVE", "1")
    monkeypatch.setattr(dops, "_lib", False)
    native.load.cache_clear()
    try:
        q, k, cos, sin = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
        with torch.inference_mode():
            got = dops.apply_rope(q, k, cos, sin)
            y = dops.rms_norm(x.detach(), w.detach(), 1e-5)
        assert dops._lib is None
        assert torch.equal(got[0], reference.apply_rope(q, k, cos, sin)[0])
        torch.testing.assert_close(y, reference.rms_norm(x.detach(), w.detach(), 1e-5))
    finally:
        native.load.cache_clear()
        monkeypatch.setattr(dops, "_lib", False)


@pytest.mark.parametrize("shape", [(1, 32000), (5, 64), (3, 2, 100), (7,), (4, 15), (2, 1)])
def test_argmax_rows_equals_torch(shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g)
    with torch.inference_mode():
        got = kernel("argmax_rows", "cpu")(x)
        strided = kernel("argmax_rows", "cpu")(torch.randn(3, 2 * shape[-1], generator=g)[:, shape[-1]:])
    assert got.dtype is torch.int64 and torch.equal(got, x.argmax(-1))
    assert strided.shape == (3,)


def test_argmax_rows_ties_nan_infinities_and_signed_zeros():
    n = 100
    rows = torch.randn(8, n)
    rows[0, [17, 40, 99]] = 50.0                     # ties: the first wins
    rows[1, 60] = float("nan")                       # a NaN after the maximum wins
    rows[1, 5] = 80.0
    rows[2, [3, 90]] = float("nan")                  # the first of two NaNs
    rows[3] = float("-inf")                          # all -inf: index 0
    rows[4, 70] = float("inf")                       # +inf in the tail past the vector body
    rows[5] = -1.0
    rows[5, 33], rows[5, 20] = 0.0, -0.0             # -0.0 equals 0.0: the first of them
    rows[6, 99] = 9.0                                # the last element
    rows[7, :16] = float("-inf")                     # the maximum after a -inf vector
    want = rows.argmax(-1)
    with torch.inference_mode():
        got = kernel("argmax_rows", "cpu")(rows)
    assert want.tolist()[:3] == [17, 60, 3] and want[5].item() == 20  # what torch does, for the record
    assert torch.equal(got, want)


def test_argmax_rows_outside_inference_or_other_dtypes_is_torchs():
    x = torch.randn(3, 50)
    assert torch.equal(dops.argmax_rows(x), x.argmax(-1))  # not in inference mode: the reference
    with torch.inference_mode():
        xb = x.bfloat16()
        assert torch.equal(dops.argmax_rows(xb), xb.argmax(-1))
        with pytest.raises((RuntimeError, IndexError)):
            dops.argmax_rows(torch.empty(2, 0))
