"""Speculative decoding by prompt lookup (n-gram drafts): no draft model, exact outputs.

A decoding sequence whose last ``n`` tokens (``prompt_lookup_max`` down to ``prompt_lookup_min``) occurred
before in its prompt or output proposes the ``k`` tokens that followed that occurrence. The step then
computes the last token and the ``k`` drafts together — on a memory-bound decode step the weights are read
once either way — and samples a token from every one of the ``k + 1`` positions exactly as without
speculation. Tokens are accepted from the first while each equals the next draft: the first mismatch (or
the token after the last draft) is the step's last new token. For a deterministic draft this is exact
rejection sampling: a draft token survives with the target probability of drawing it, and a rejected
position's token is a target draw conditioned on not being the draft. So greedy outputs equal those
without speculation token for token; random ones follow the same distribution (a seeded request's draws
are consumed differently, so its tokens differ from a run without speculation).

Drafted positions' KV is written by the step; a rejected one is simply recomputed later (the sequence's
computed length counts accepted tokens only, so neither the scheduler nor the prefix cache sees it).
The sampler treats row j as following j accepted drafts: penalties and ``min_tokens`` count them, and a
structured output's matcher takes them (then rolls back: ``structured.Grammars.mask``).
"""

from __future__ import annotations

from bagualu.engine.request import Request


class PromptLookup:
    """Per sequence: an index from each n-gram of its tokens to where it last ended (built incrementally)."""

    def __init__(self, num_tokens: int, max_n: int = 3, min_n: int = 2):
        """``EngineConfig`` validates the three (speculative_tokens, prompt_lookup_max/min)."""
        self.k, self.max_n, self.min_n = num_tokens, max_n, min_n

    @staticmethod
    def eligible(req: Request) -> bool:
        return req.num_computed_tokens == req.num_tokens - 1

    def propose(self, req: Request) -> list[int]:
        """Up to ``k`` draft tokens for a decoding sequence (none when nothing matches or no room is left)."""
        room = min(self.k, req.remaining_tokens - 1)
        if room <= 0:
            return []
        seq = req.all_token_ids
        index = req.ngrams
        if index is None:
            index = req.ngrams = {n: {} for n in range(self.min_n, self.max_n + 1)}
            req.ngrams_upto = 0
        end = len(seq) - 1  # n-grams ending before the last token: the suffix must not match itself
        for p in range(max(req.ngrams_upto, 0), end):
            for n, table in index.items():
                if p + 1 >= n:
                    table[tuple(seq[p + 1 - n:p + 1])] = p
        req.ngrams_upto = end
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(seq) < n:
                continue
            p = index[n].get(tuple(seq[-n:]))
            if p is not None:
                return seq[p + 1:p + 1 + room]
        return []
