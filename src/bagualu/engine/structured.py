"""Structured outputs: a request's tokens constrained to a JSON schema, any JSON object, a regex or an EBNF
grammar, through xgrammar (the library vLLM and SGLang use).

Per engine, ``Grammars`` holds xgrammar's view of the tokenizer (built on the first constrained request) and its
compiler, whose cache shares compiled grammars across requests. Per sequence, a ``GrammarMatcher`` follows
the accepted tokens. Each step, every constrained row's allowed next tokens become a bitmask that sends the
others' logits to -inf before any other processing; the sampled token is then fed to the matcher. When the
grammar is complete only the end-of-sequence tokens stay allowed, so a constrained sequence ends by itself.
The matcher state survives preemption (accepted tokens are never resampled).

xgrammar is an optional dependency (``pip install bagualu[structured]``); without it a constrained request is
refused with a message saying so. Why a library: token masks over a 32k-152k vocabulary per step need a
precompiled, cached automaton per grammar, which is what xgrammar is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of: ``json`` (a JSON schema, dict or string), ``json_object`` (any JSON object),
    ``regex``, ``grammar`` (EBNF in xgrammar's dialect). ``compact``: no optional whitespace in JSON."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    compact: bool = True

    def __post_init__(self):
        given = [self.json is not None, self.json_object, self.regex is not None, self.grammar is not None]
        if sum(given) != 1:
            raise ValueError("structured output must give exactly one of json (a schema), json_object, regex "
                             "or grammar")


class GrammarError(ValueError):
    """The grammar cannot be compiled, or xgrammar is not installed."""


class Grammars:
    """xgrammar's tokenizer view and compiler for one engine (the model's vocabulary size, its EOS ids)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self._compiler = None  # xgrammar's GrammarCompiler caches what it compiled

    def _xgr(self):
        try:
            import xgrammar
        except ImportError:
            raise GrammarError("structured output needs xgrammar: pip install 'bagualu[structured]'") from None
        return xgrammar

    def matcher(self, spec: StructuredOutput):
        """A fresh matcher for ``spec`` (the compiler's cache compiles each distinct grammar once)."""
        xgr = self._xgr()
        if self._compiler is None:
            import transformers

            tok = self.tokenizer
            hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token=tok.bos_token,
                                                      eos_token=tok.eos_token)
            info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                      stop_token_ids=list(self.eos_token_ids) or None)
            self._compiler = xgr.GrammarCompiler(info)
        c = self._compiler
        try:
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                compiled = c.compile_json_schema(schema, any_whitespace=not spec.compact)
            elif spec.json_object:
                compiled = c.compile_json_schema('{"type": "object"}', any_whitespace=not spec.compact)
            elif spec.regex is not None:
                compiled = c.compile_regex(spec.regex)
            else:
                compiled = c.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError) as e:  # xgrammar's parser and schema converter raise these
            raise GrammarError(f"cannot compile the structured output: {e}") from None
        return xgr.GrammarMatcher(compiled)

    def mask(self, logits_RV: torch.Tensor, rows: list[int], reqs: list, pos: list[int]) -> None:
        """Send the logits of the tokens each row's grammar forbids to -inf, in place. Row ``i`` belongs to
        ``reqs[i]`` and follows its first ``pos[i]`` speculative drafts: the matcher takes those drafts in turn
        (while the grammar allows them; a row after a refused draft is never accepted), and is rolled back
        after, so only the tokens the engine accepts advance it."""
        xgr = self._xgr()
        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        taken: dict[int, list] = {}  # id(request) -> [request, drafts taken into its matcher]
        for b, i in enumerate(rows):
            r, j = reqs[i], pos[i]
            m = r.matcher
            t = taken.setdefault(id(r), [r, 0])
            if j > 0 and t[1] == j - 1 and not m.is_terminated() and m.accept_token(r.draft[j - 1]):
                t[1] = j
            if not m.is_terminated():
                m.fill_next_token_bitmask(bitmask, b)
        for r, n in taken.values():
            if n:
                r.matcher.rollback(n)
        sub = logits_RV[rows]
        xgr.apply_token_bitmask_inplace(sub, bitmask)
        logits_RV[rows] = sub
