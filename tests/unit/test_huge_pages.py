"""``bagualu.memory.huge_pages``: transparent huge pages under large host tensors (the serving engine's weights)."""

from __future__ import annotations

import gc

import pytest
import torch

import bagualu
from bagualu.memory import huge_pages as hp
from hf_models import save_byte_level_llama

MiB = 1 << 20


def anon_huge_bytes(lo: int, hi: int) -> int:
    """AnonHugePages of the mappings overlapping ``[lo, hi)``, from /proc/self/smaps (advising a range splits the
    mapping that held it, so there are several)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a < hi and lo < b
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total


def test_storage_ranges_count_each_storage_once():
    big = torch.empty(40 * MiB, dtype=torch.uint8)
    other = torch.empty(3 * MiB, dtype=torch.uint8)
    r = hp.storage_ranges([big[5:], big[:MiB], other, None, torch.empty(0)])
    assert sorted(r) == r and len(r) == 2
    assert (big.data_ptr(), big.data_ptr() + 40 * MiB) in r and (other.data_ptr(), other.data_ptr() + 3 * MiB) in r


def test_huge_spans_are_whole_pages_inside_merged_stretches():
    H = hp.HUGE
    # one 40 MiB storage starting mid-page: the whole pages inside it
    assert hp.huge_spans([(H + 100, H + 100 + 40 * MiB)]) == [(2 * H, 21 * H)]
    # small neighbours (1.5 MiB each, 64 bytes apart, as malloc places them) make one stretch; a far one does not
    small = [(4 * H + i * (1536 * 1024 + 64), 4 * H + i * (1536 * 1024 + 64) + 1536 * 1024) for i in range(8)]
    far = (64 * H + 10, 64 * H + 10 + MiB)
    assert hp.huge_spans(small + [far]) == [(4 * H, 10 * H)]
    # nothing under one whole page
    assert hp.huge_spans([(H + 1, 2 * H + 5)]) == []
    assert hp.huge_spans([]) == []


def test_advising_keeps_contents_and_reports_what_the_kernel_did():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16 * MiB // 4, generator=g)  # 16 MiB
    want = t.clone()
    r = hp.advise_huge_pages([t])
    assert torch.equal(t, want)
    assert r.mode == hp.thp_mode()
    if r.mode not in ("always", "madvise"):
        assert r.spans == 0 and r.advised_bytes == 0
        pytest.skip(f"transparent huge pages are {r.mode} here")
    assert r.spans >= 1 and 14 * MiB <= r.advised_bytes <= 16 * MiB
    if r.collapsed_bytes:  # the kernel (>= 6.1) says it collapsed them: the mapping holds huge pages now
        assert anon_huge_bytes(t.data_ptr(), t.data_ptr() + 16 * MiB) >= r.collapsed_bytes
    else:
        assert r.collapse_error is not None
    t.mul_(2)  # still ordinary, writable memory
    assert torch.equal(t, want * 2)


def test_no_tensor_or_small_tensors_advise_nothing():
    r = hp.advise_huge_pages([torch.ones(10), torch.ones(100, 100)])
    assert r.spans == 0 and r.advised_bytes == 0 and r.collapsed_bytes == 0


def test_engine_outputs_do_not_depend_on_huge_pages(tmp_path):
    path = save_byte_level_llama(tmp_path, max_position_embeddings=96)
    sp = bagualu.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for on in (False, True):
        llm = bagualu.LLM(str(path), num_kv_blocks=32, huge_pages=on)
        report = llm.engine.huge_pages
        assert (report is not None) == on and (not on or report.mode == hp.thp_mode())
        # on: every weight packed into one buffer (memory.weight_arena), the fused projections included
        storages = {p.untyped_storage().data_ptr() for p in llm.engine.model.parameters()}
        assert (len(storages) == 1) == on
        outs[on] = [o.token_ids for o in llm.generate(["abc", "hello"], sp, use_tqdm=False)]
        llm.close()
        del llm
        gc.collect()
    assert outs[True] == outs[False]
