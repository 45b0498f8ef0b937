"""Plumbing between HTTP requests and engine streams: submit, merge, watch for disconnects, SSE.

One HTTP request may be several engine requests (a list of prompts); they are submitted together —
if any is refused, the ones already accepted are aborted and the whole request fails with that
error — and their outputs are merged as they arrive. Every path out (finished, error, client gone,
task cancelled) closes the engine streams, and closing an unfinished stream aborts its request, so
the KV blocks of a departed client are freed before the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request

from bagualu.engine.async_engine import AsyncEngine, RequestStream
from bagualu.engine.outputs import RequestOutput
from bagualu.engine.params import SamplingParams
from bagualu.serve.errors import from_engine

T = TypeVar("T")


async def submit_all(engine: AsyncEngine, base_id: str, prompts: list, params: SamplingParams,
                     prompt_param: str = "prompt", max_tokens_param: str = "max_tokens") -> list[RequestStream]:
    """Submit one engine request per prompt; all accepted, or none (raises the ``APIError``, naming
    the API fields the engine's complaint is about)."""
    streams: list[RequestStream] = []
    try:
        for i, p in enumerate(prompts):
            streams.append(await engine.add_request(f"{base_id}-{i}", p, params))
    except BaseException as e:
        for s in streams:
            s.close()
        if isinstance(e, Exception):
            raise from_engine(e, prompt_param, max_tokens_param) from None
        raise
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(prompt index, cumulative output)`` from all streams as they come; closing it (or an error in
    any stream) closes every stream."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:  # synchronous on purpose: this also runs inside a cancellation
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    """The finished output of each stream, in prompt order."""
    last: dict[int, RequestOutput] = {}
    gen = merged(streams)
    try:
        async for i, out in gen:
            last[i] = out
    finally:
        await gen.aclose()
    return [last[i] for i in range(len(streams))]


class ClientDisconnected(Exception):
    pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and so aborting its engine requests) if the client goes away
    first; raises ``ClientDisconnected`` then. For non-streaming responses, where nothing is sent
    until the end and so a dead socket would otherwise go unnoticed."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


def sse(obj: dict | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line (``data: [DONE]`` for the string)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class TokenText:
    """Per-token strings and bytes for logprobs. Byte-level BPE vocabularies (GPT-2 style) map each
    token back to its exact bytes, so a token that is half a UTF-8 character still reports the right
    ``bytes``; other tokenizers report the UTF-8 of the decoded token."""

    def __init__(self, tokenizer):
        from tokenizers import decoders

        self.tok = tokenizer
        backend = getattr(tokenizer, "backend", None)
        self._inv: dict[str, int] | None = None
        if backend is not None and isinstance(backend.decoder, decoders.ByteLevel):
            from bagualu.models.byte_tokenizer import _bytes_to_unicode

            self._inv = {c: b for b, c in enumerate(_bytes_to_unicode())}
        self._text: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        s = self._text.get(token_id)
        if s is None:
            s = self._text[token_id] = self.tok.decode([token_id], skip_special_tokens=False)
        return s

    def bytes(self, token_id: int) -> list[int]:
        if self._inv is not None:
            raw = self.tok.backend.id_to_token(token_id)
            if raw and all(c in self._inv for c in raw):
                return [self._inv[c] for c in raw]
        return list(self.text(token_id).encode("utf-8"))


class DeltaTracker:
    """What each choice has been sent so far, so a stream sends only what is new in a cumulative output.

    Choice ``index = prompt_index * n + completion.index`` (OpenAI's order for several prompts). Text
    goes out up to ``stream_upto`` (the engine holds back a possible stop-string prefix) and in full
    at the finish; a finished choice is reported once even though later outputs repeat it."""

    def __init__(self, n: int):
        self.n = n
        self._chars: dict[int, int] = {}
        self._tokens: dict[int, int] = {}
        self._done: set[int] = set()

    def deltas(self, prompt_index: int, out: RequestOutput):
        """Yield ``(index, completion, new_text, first_new_token, finish_reason or None)`` per changed choice."""
        for c in out.outputs:
            idx = prompt_index * self.n + c.index
            if idx in self._done:
                continue
            sent_chars, sent_tokens = self._chars.get(idx, 0), self._tokens.get(idx, 0)
            upto = len(c.text) if c.finished else c.stream_upto
            text = c.text[sent_chars:upto] if upto > sent_chars else ""
            finish = c.finish_reason if c.finished else None
            if not text and sent_tokens == len(c.token_ids) and finish is None:
                continue
            self._chars[idx], self._tokens[idx] = max(sent_chars, upto), len(c.token_ids)
            if finish is not None:
                self._done.add(idx)
            yield idx, c, text, sent_tokens, finish


def finite(x: float) -> float:
    """JSON has no infinities: a -inf log-probability is reported as -9999.0 (as vLLM does)."""
    return x if x > -9999.0 else -9999.0  # also NaN
