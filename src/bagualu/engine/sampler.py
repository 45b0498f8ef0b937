"""``sample``: next tokens for a batch of rows, each with its own ``SamplingParams``.

Legend: R rows (requests due a token this step), V vocabulary.

Order (vLLM's and HF's): logit bias → structured-output mask (rows with a grammar matcher) → repetition
penalty → presence/frequency penalties → ``min_tokens`` masking of EOS/stop tokens → temperature → top-k →
top-p → min-p → draw. Greedy rows take the argmax of the penalised logits. A random row draws by the
exponential race ``argmax(p / q)``, ``q ~ Exp(1)`` — the same distribution as ``multinomial(p)`` but a
row's noise is one independent draw of V values from *its own* generator when it has a seed, so a
seeded request gets the same tokens whatever else shares the batch. Work that no row needs (penalty
bookkeeping, the sort behind top-k/top-p) is skipped.

Log-probabilities are of the model's raw distribution (``log_softmax`` of the logits before any
penalty or temperature), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagualu.engine.request import Request
from bagualu.ops import kernel


@dataclass
class Sampled:
    token: int
    logprob: float | None = None  # of ``token`` under the raw distribution, when asked
    top: dict[int, float] | None = None  # the ``logprobs`` most likely tokens, when asked


def _apply_penalties(logits_RV: torch.Tensor, reqs: list[Request], rows: list[int], pos: list[int]) -> None:
    """``pos[i]``: row i's position in its request's run (a speculative step's row j follows j drafts, which
    count as output tokens there)."""
    V = logits_RV.shape[1]
    for i in rows:
        r, p = reqs[i], reqs[i].params
        out = r.output_token_ids + r.draft[:pos[i]]
        row = logits_RV[i]
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(out)), dtype=torch.long)
            seen = seen[seen < V]
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and out:
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=V)[:V]
            row -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty * (counts > 0).to(row.dtype)


def _filter(logits_RV: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) the tokens top-k / top-p / min-p exclude; at least the best token always survives."""
    sorted_RV, idx_RV = logits_RV.sort(dim=-1, descending=True)
    V = logits_RV.shape[1]
    ranks = torch.arange(V, device=logits_RV.device)
    k = torch.where(top_k > 0, top_k, V).clamp_max(V)
    drop_RV = ranks[None, :] >= k[:, None]
    probs_RV = torch.softmax(sorted_RV, dim=-1)
    cum_RV = probs_RV.cumsum(-1)
    drop_RV |= (cum_RV - probs_RV) >= top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    drop_RV |= probs_RV < (min_p[:, None] * probs_RV[:, :1])
    drop_RV[:, 0] = False
    sorted_RV = sorted_RV.masked_fill(drop_RV, float("-inf"))
    return torch.empty_like(logits_RV).scatter_(1, idx_RV, sorted_RV)


@torch.inference_mode()
def sample(logits_RV: torch.Tensor, reqs: list[Request], generator: torch.Generator | None = None,
           grammars=None) -> list[Sampled]:
    """One token per row. ``logits_RV`` may be modified in place; it is converted to fp32 on the CPU side
    of the caller's choosing (the engine passes the LM head's output). ``grammars``: the engine's
    ``structured.Grammars``, which masks the rows whose requests carry a grammar matcher."""
    R, V = logits_RV.shape
    logits_RV = logits_RV.float()
    params = [r.params for r in reqs]
    want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw_lp = torch.log_softmax(logits_RV[want_lp], dim=-1) if want_lp else None
    for i, p in enumerate(params):
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias.items())
            logits_RV[i, list(ids)] += torch.tensor(bias, dtype=logits_RV.dtype, device=logits_RV.device)
    pos, run = [], {}  # a speculative step's request has one row per position: its row j follows j drafts
    for r in reqs:
        run[id(r)] = run.get(id(r), -1) + 1
        pos.append(run[id(r)])
    constrained = [i for i, r in enumerate(reqs) if r.matcher is not None]
    if constrained:
        grammars.mask(logits_RV, constrained, reqs, pos)
    pen_rows = [i for i, p in enumerate(params) if p.needs_penalties]
    if pen_rows:
        _apply_penalties(logits_RV, reqs, pen_rows, pos)
    ban_rows, ban_ids = [], []  # min_tokens: the tokens that would end the sequence cannot be drawn yet
    for i, r in enumerate(reqs):
        if len(r.output_token_ids) + pos[i] < r.params.min_tokens and r.matcher is None:
            for t in r.stop_token_ids_all():
                if t < V:
                    ban_rows.append(i)
                    ban_ids.append(t)
    if ban_rows:  # one indexed write for the batch (one per row: sample() of 32 such rows 275 -> 100 us here)
        logits_RV[ban_rows, ban_ids] = float("-inf")
    greedy = [i for i, p in enumerate(params) if p.greedy]
    argmax = kernel("argmax_rows")
    if len(greedy) == R:
        tokens = argmax(logits_RV).cpu()
    else:
        tokens = torch.empty(R, dtype=torch.long)
        if greedy:
            tokens[greedy] = argmax(logits_RV[greedy]).cpu()
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if rand:
        x_RV = logits_RV[rand] if len(rand) < R else logits_RV
        temps = torch.tensor([params[i].temperature for i in rand], dtype=torch.float32, device=x_RV.device)
        x_RV = x_RV / temps[:, None]
        if any(params[i].needs_filters for i in rand):
            dev = x_RV.device
            x_RV = _filter(x_RV, torch.tensor([params[i].top_k for i in rand], device=dev),
                           torch.tensor([params[i].top_p for i in rand], dtype=torch.float32, device=dev),
                           torch.tensor([params[i].min_p for i in rand], dtype=torch.float32, device=dev))
        probs_RV = torch.softmax(x_RV, dim=-1)
        q_RV = torch.empty_like(probs_RV)
        unseeded = [j for j, i in enumerate(rand) if reqs[i].generator is None]
        if unseeded:
            q_RV[unseeded] = torch.empty(len(unseeded), V, device=q_RV.device).exponential_(generator=generator)
        for j, i in enumerate(rand):
            g = reqs[i].generator
            if g is not None:
                q_RV[j] = torch.empty(V).exponential_(generator=g).to(q_RV.device)
        tokens[rand] = argmax(probs_RV / q_RV).cpu()
    out = [Sampled(int(t)) for t in tokens.tolist()]  # host sync (named): the tokens go to the host
    for j, i in enumerate(want_lp):
        lp = raw_lp[j]
        out[i].logprob = float(lp[out[i].token])
        k = params[i].logprobs
        if k:
            vals, ids = lp.topk(k)
            out[i].top = dict(zip(ids.tolist(), vals.tolist()))
    return out
