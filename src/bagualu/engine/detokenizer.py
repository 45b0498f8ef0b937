"""``Detokenizer``: incremental text for one sequence, and stop strings.

Decoding the whole output every step costs O(n) per token; decoding only the new token breaks
multi-byte characters and tokenizers that merge spaces across tokens. The standard fix (vLLM's,
from TGI): keep two offsets into the ids — ``prefix`` (a few tokens of context) and ``read`` (what is
already text) — and take ``decode(ids[prefix:]) - decode(ids[prefix:read])`` as the new text, unless it
ends in U+FFFD (an incomplete UTF-8 character; wait for the next token).

Stop strings end the sequence at their first occurrence; the text is cut before it (or after it with
``include_stop_str_in_output``). ``stream_upto`` holds back the last ``max_stop_len - 1`` characters
until the sequence ends, so a stream never shows the start of a stop string it then retracts.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, *, stop: tuple[str, ...] = (), include_stop: bool = False,
                 skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.stop = stop
        self.include_stop = include_stop
        self.skip_special = skip_special_tokens
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special)

    def update(self, ids: list[int], final: bool = False) -> str | None:
        """Extend ``text`` with the newest of ``ids`` (all output ids so far); ``final`` flushes what was
        held back. Returns the stop string that matched (text already cut), else None."""
        prefix_text = self._decode(ids[self._prefix:self._read])
        new_text = self._decode(ids[self._prefix:])
        # a trailing U+FFFD may be a character whose remaining bytes come with the next tokens (at most
        # 3 more); past that, or at the end, it is what the bytes are and is emitted as such
        incomplete = new_text.endswith("\ufffd") and len(ids) - self._read < 4
        if not final and (incomplete or len(new_text) <= len(prefix_text)):
            return None
        delta = new_text[len(prefix_text):]
        start = max(len(self.text) - self.max_stop_len + 1, 0)
        self.text += delta
        self._prefix, self._read = self._read, len(ids)
        if self.stop:
            return self._check_stop(start)
        return None

    def _check_stop(self, start: int) -> str | None:
        hit, at = None, None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (at is None or i < at):
                hit, at = s, i
        if hit is None:
            return None
        self.text = self.text[:at + len(hit)] if self.include_stop else self.text[:at]
        return hit

    def stream_upto(self, finished: bool) -> int:
        """How much of ``text`` a stream may show now."""
        if finished or not self.max_stop_len:
            return len(self.text)
        return max(len(self.text) - self.max_stop_len + 1, 0)
