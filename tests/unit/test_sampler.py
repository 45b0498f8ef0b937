"""Sampler: filters and penalties equal transformers' logits processors; seeds; logprobs; min_tokens."""

import pytest
import torch

from bagualu.engine.params import SamplingParams
from bagualu.engine.request import Request
from bagualu.engine.sampler import _apply_penalties, _filter, sample

transformers = pytest.importorskip("transformers")
V = 50


def mk(params, prompt=(1, 2, 3), outputs=(), rid="r"):
    r = Request(request_id=rid, prompt_token_ids=list(prompt), params=params, eos_token_ids=(0,))
    r.output_token_ids = list(outputs)
    return r


def logits(seed=0, rows=3):
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kind,value", [("top_k", 5), ("top_p", 0.7), ("min_p", 0.1), ("top_p", 0.01)])
def test_filters_equal_transformers_warpers(kind, value):
    x = logits()
    hf = {"top_k": transformers.TopKLogitsWarper, "top_p": transformers.TopPLogitsWarper,
          "min_p": transformers.MinPLogitsWarper}[kind](value)
    expect = hf(torch.zeros(3, 1, dtype=torch.long), x.clone())
    n = x.shape[0]
    args = {"top_k": torch.zeros(n, dtype=torch.long), "top_p": torch.ones(n), "min_p": torch.zeros(n)}
    args[kind] = torch.full((n,), value, dtype=args[kind].dtype)
    got = _filter(x.clone(), args["top_k"], args["top_p"], args["min_p"])
    assert torch.equal(torch.isinf(got), torch.isinf(expect))
    assert torch.equal(got[~torch.isinf(got)], x[~torch.isinf(got)])


def test_repetition_presence_frequency_penalties():
    x = logits(1, rows=1)
    r = mk(SamplingParams(repetition_penalty=1.3), prompt=(1, 2), outputs=(7, 7, 9))
    got = x.clone()
    _apply_penalties(got, [r], [0], [0])
    hf = transformers.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 2, 7, 7, 9]]), x.clone())
    torch.testing.assert_close(got, hf)
    r = mk(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), outputs=(7, 7, 9))
    got = x.clone()
    _apply_penalties(got, [r], [0], [0])
    expect = x.clone()
    expect[0, 7] -= 0.5 + 2 * 0.25
    expect[0, 9] -= 0.5 + 0.25
    torch.testing.assert_close(got, expect)


def test_a_speculative_rows_penalties_and_min_tokens_count_the_drafts_before_it():
    """Row j of a speculative step's request samples as if its first j drafts were already output: here the
    drafts repeat token 7, the favourite, so the frequency penalty grows row by row; and EOS stays banned
    until the row's position reaches min_tokens."""
    x = torch.zeros(3, V)
    x[:, 7], x[:, 8], x[:, 0] = 3.0, 2.0, 5.0  # 0 is EOS
    r = mk(SamplingParams(temperature=0, frequency_penalty=2.0, min_tokens=10), outputs=(5,))
    r.draft = [7, 7]
    assert [s.token for s in sample(x.clone(), [r, r, r])] == [7, 8, 8]  # 3 | 3 - 2 < 2 | 3 - 4 < 2
    r2 = mk(SamplingParams(temperature=0, min_tokens=3), outputs=(5,))
    r2.draft = [7, 7]
    assert [s.token for s in sample(x.clone(), [r2, r2, r2])] == [7, 7, 0]  # EOS once 1 + 2 outputs precede


def test_greedy_is_argmax_and_sampling_stays_in_the_top_k():
    x = logits(2)
    out = sample(x.clone(), [mk(SamplingParams(temperature=0))] * 3)
    assert [o.token for o in out] == x.argmax(-1).tolist()
    top = set(x[0].topk(4).indices.tolist())
    g = torch.Generator().manual_seed(0)
    seen = {sample(x[:1].clone(), [mk(SamplingParams(top_k=4))], g)[0].token for _ in range(200)}
    assert seen <= top and len(seen) > 1


def test_sampling_follows_the_distribution():
    x = torch.tensor([[0.0, 1.0, 2.0, -50.0]])
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sample(x.clone(), [mk(SamplingParams(temperature=1.0))], g)[0].token] += 1
    expect = torch.softmax(x[0], -1) * n
    assert ((counts - expect).abs() <= 4 * expect.sqrt() + 1).all(), (counts, expect)


def test_a_seeded_request_draws_the_same_tokens_in_any_batch():
    sp = SamplingParams(temperature=0.9, seed=1234)
    r0 = mk(sp, rid="a")
    alone = [sample(logits(s, 1), [r0])[0].token for s in range(5)]
    r = mk(sp, rid="a")
    with_others = []
    for s in range(5):
        x = torch.cat([logits(100 + s, 2), logits(s, 1)])
        others = [mk(SamplingParams(temperature=1.0), rid="x"), mk(SamplingParams(temperature=0), rid="y")]
        with_others.append(sample(x, others + [r])[2].token)
    r2 = mk(sp, rid="a")
    again = [sample(logits(s, 1), [r2])[0].token for s in range(5)]
    assert with_others == again
    assert alone == again


def test_logprobs_are_of_the_raw_distribution():
    x = logits(3, 1)
    out = sample(x.clone(), [mk(SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0))])[0]
    lp = torch.log_softmax(x[0], -1)
    assert out.logprob == pytest.approx(lp[out.token].item(), abs=1e-6)
    vals, ids = lp.topk(3)
    assert list(out.top) == ids.tolist()
    assert list(out.top.values()) == pytest.approx(vals.tolist(), abs=1e-6)


def test_min_tokens_masks_eos_and_stop_ids():
    x = torch.zeros(1, V)
    x[0, 0] = 10.0  # EOS would win
    x[0, 5] = 9.0  # then a stop token id
    r = mk(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(5,)))
    assert sample(x.clone(), [r])[0].token not in (0, 5)
    r.output_token_ids = [3, 3]
    assert sample(x.clone(), [r])[0].token == 0


@pytest.mark.parametrize("bad,match", [(dict(temperature=-1), "temperature=-1"), (dict(top_p=0), "top_p=0"),
                                       (dict(max_tokens=0), "max_tokens=0"), (dict(n=0), "n=0"),
                                       (dict(logprobs=21), "logprobs=21"), (dict(stop=[""]), "stop=")])
def test_bad_params_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)
