"""``POST /v1/completions``: OpenAI's legacy text completions, streamed (SSE) or whole.

Prompts: a string, a list of strings, a list of token ids, or a list of such lists; each becomes one
engine request of ``n`` sequences, and choices are numbered ``prompt_index * n + i``. ``echo`` puts
the prompt's text in front of the completion; with ``logprobs`` too, the prompt's tokens come first in
the logprobs, the first with ``null`` (what evaluation harnesses score as a loglikelihood). ``logprobs``
uses the legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bagualu.engine.outputs import CompletionOutput, RequestOutput
from bagualu.serve.context import ServeContext
from bagualu.serve.errors import from_engine
from bagualu.serve.protocol import CompletionRequest, to_sampling_params
from bagualu.serve.streams import (SSE_HEADERS, ClientDisconnected, DeltaTracker, TokenText, cancel_on_disconnect,
                                   final_outputs, finite, merged, sse, submit_all)


def _legacy(tt: TokenText, entries, offset: int) -> dict:
    """The legacy logprobs object of ``entries``: (token id, its logprob, {id: logprob} of the top
    alternatives) per token, None for an unscored one; ``offset``: where the first token begins in the text."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for t, lp, top in entries:
        s = tt.text(t)
        tokens.append(s)
        token_logprobs.append(None if lp is None else finite(lp))
        top_logprobs.append(None if top is None else
                            {tt.text(a): finite(v) for a, v in sorted(top.items(), key=lambda kv: -kv[1])})
        text_offset.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def legacy_logprobs(tt: TokenText, c: CompletionOutput, start: int, offset: int) -> dict:
    """Logprobs of tokens ``start:`` of ``c``; ``offset`` is where token ``start`` begins in the text."""
    return _legacy(tt, ((c.token_ids[j], c.token_logprobs[j], c.logprobs[j]) for j in range(start, len(c.token_ids))),
                   offset)


def prompt_legacy_logprobs(tt: TokenText, out: RequestOutput) -> dict:
    """The prompt's part of echoed logprobs: every prompt token, scored given those before it (the first:
    null)."""
    plp = out.prompt_logprobs
    return _legacy(tt, ((t, plp[j][t] if j else None, plp[j]) for j, t in enumerate(out.prompt_token_ids)), 0)


def _echoed(prompt: dict, completion: dict) -> dict:
    return {k: prompt[k] + completion[k] for k in prompt}


def _offset(tt: TokenText, c: CompletionOutput, upto: int, base: int) -> int:
    return base + sum(len(tt.text(t)) for t in c.token_ids[:upto])


def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def create_completion(req: CompletionRequest, raw: Request, ctx: ServeContext) -> Response:
    req.check()
    model = ctx.check_model(req.model)
    params = to_sampling_params(req)
    prompts = req.prompts()
    echo = [(p if isinstance(p, str) else ctx.tokenizer.decode(p)) if req.echo else "" for p in prompts]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    streams = await submit_all(ctx.engine, rid, prompts, params)
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    tt = ctx.token_text

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(streams, head, params.n, echo, req.logprobs is not None, include_usage, tt),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    try:
        outs = await cancel_on_disconnect(raw, final_outputs(streams))
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as e:
        raise from_engine(e) from None
    choices = []
    for i, out in enumerate(outs):
        for c in out.outputs:
            lp = legacy_logprobs(tt, c, 0, len(echo[i])) if req.logprobs is not None else None
            if lp is not None and req.echo:
                lp = _echoed(prompt_legacy_logprobs(tt, out), lp)
            choices.append({"index": i * params.n + c.index, "text": echo[i] + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return JSONResponse({**head, "choices": choices, "usage": _usage(outs)})


async def _stream(streams, head: dict, n: int, echo: list[str], want_logprobs: bool, include_usage: bool,
                  tt: TokenText):
    tracker = DeltaTracker(n)
    finished: dict[int, RequestOutput] = {}
    extra = {"usage": None} if include_usage else {}
    gen = merged(streams)
    # the prompt first, as its own chunk per choice: at once, or with its logprobs once it is scored
    unechoed = set(range(len(echo))) if any(echo) and want_logprobs else set()
    try:
        if any(echo) and not want_logprobs:
            yield sse({**head, "choices": [{"index": i * n + j, "text": echo[i], "logprobs": None,
                                            "finish_reason": None} for i in range(len(echo)) for j in range(n)],
                       **extra})
        async for i, out in gen:
            choices = []
            if i in unechoed:
                if out.prompt_logprobs is None:  # hold this prompt's tokens: its echo goes first
                    continue
                unechoed.discard(i)
                plp = prompt_legacy_logprobs(tt, out)
                choices += [{"index": i * n + j, "text": echo[i], "logprobs": plp, "finish_reason": None}
                            for j in range(n)]
            for idx, c, text, start, finish in tracker.deltas(i, out):
                lp = legacy_logprobs(tt, c, start, _offset(tt, c, start, len(echo[i]))) if want_logprobs else None
                choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": finish,
                                "stop_reason": c.stop_reason if finish else None})
            if choices:
                yield sse({**head, "choices": choices, **extra})
            if out.finished:
                finished[i] = out
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(list(finished.values()))})
    except Exception as e:  # headers are gone: report in the stream, as OpenAI's API does
        yield sse(from_engine(e).body())
    finally:
        await gen.aclose()
    yield sse("[DONE]")
