"""``POST /v1/chat/completions``: messages → the model's chat template → one engine request of ``n``.

The template is the tokenizer's (``tokenizer_config.json``, ``chat_template.jinja``), or the one given
with ``bagualu serve --chat-template FILE``, or else the documented default, ChatML::

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n

Message content may be a string or a list of text parts. A template that refuses the conversation
(``raise_exception`` in Jinja, e.g. roles that do not alternate) is the client's 400. Logprobs use
the chat shape: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.

Tools: the template sees ``tools``. A forced call (``tool_choice`` naming a function, or ``required``)
constrains the output to the call's JSON schema (``engine.structured``) and answers with ``tool_calls``
(``finish_reason`` ``tool_calls``); ``none`` answers in text; ``auto`` parses the model's text with the
server's ``--tool-call-parser`` (``serve.tool_parsers``), and is refused without one. Streamed, an answer
with tools comes as one delta per choice once it is complete.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bagualu.engine.outputs import CompletionOutput, RequestOutput
from bagualu.models.byte_tokenizer import DEFAULT_CHAT_TEMPLATE
from bagualu.serve.context import ServeContext
from bagualu.serve.errors import APIError, from_engine
from bagualu.serve.protocol import ChatCompletionRequest, to_sampling_params
from bagualu.serve.streams import (SSE_HEADERS, ClientDisconnected, DeltaTracker, TokenText, cancel_on_disconnect,
                                   final_outputs, finite, merged, sse, submit_all)
from bagualu.serve.tool_parsers import PARSERS


def with_chat_template(tokenizer, template: str | None = None):
    """``tokenizer`` with ``template`` (e.g. read from ``--chat-template``), else with its own, else with
    the default (ChatML); a shallow copy, the caller's object is left alone."""
    import copy

    if template is None and tokenizer.chat_template:
        return tokenizer
    tok = copy.copy(tokenizer)
    tok.chat_template = template or DEFAULT_CHAT_TEMPLATE
    return tok


def render_chat(ctx: ServeContext, req: ChatCompletionRequest) -> list[int]:
    """The prompt's token ids (the template writes its own special tokens)."""
    messages = [m.for_template() for m in req.messages]
    kwargs = {"tools": req.tools} if req.tools else {}
    kwargs.update(req.chat_template_kwargs or {})
    try:
        return ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                                 tokenize=True, **kwargs)
    except Exception as e:  # jinja2.TemplateError and friends: the conversation does not fit the template
        raise APIError.invalid("messages", f"the chat template refused these messages: {e}") from None


def chat_logprobs(tt: TokenText, c: CompletionOutput, start: int, top_n: int) -> dict:
    content = []
    for j in range(start, len(c.token_ids)):
        t = c.token_ids[j]
        top = sorted(c.logprobs[j].items(), key=lambda kv: -kv[1])[:top_n]
        content.append({"token": tt.text(t), "logprob": finite(c.token_logprobs[j]), "bytes": tt.bytes(t),
                        "top_logprobs": [{"token": tt.text(a), "logprob": finite(lp), "bytes": tt.bytes(a)}
                                         for a, lp in top]})
    return {"content": content}


def forced_calls(req: ChatCompletionRequest, text: str) -> list[tuple[str, str]] | None:
    """The forced call(s) in ``text`` (the constrained output) as (name, arguments JSON), or None if it does
    not parse (cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(req.tool_choice, dict):
        return [(req.tool_choice["function"]["name"], json.dumps(value))]
    return [(c["name"], json.dumps(c["parameters"])) for c in value]  # required: [{"name", "parameters"}, ...]


def message(req: ChatCompletionRequest, ctx: ServeContext, c: CompletionOutput) -> tuple[dict, str | None]:
    """The assistant message of ``c`` and its finish reason: text, or tool calls (forced, or parsed)."""
    content, calls = c.text, None
    if req.tool_schema(ctx.tool_call_parser is not None) is not None:
        calls = forced_calls(req, c.text)
        content = None if calls is not None else c.text
    elif req.parses_tools(ctx.tool_call_parser is not None):
        content, calls = PARSERS[ctx.tool_call_parser](c.text)
        calls = calls or None
    if calls is None:
        return {"role": "assistant", "content": content}, c.finish_reason
    return ({"role": "assistant", "content": content, "tool_calls": [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": n, "arguments": a}}
        for n, a in calls]}, "tool_calls" if c.finish_reason == "stop" else c.finish_reason)


def _usage(out: RequestOutput) -> dict:
    prompt, completion = len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def create_chat_completion(req: ChatCompletionRequest, raw: Request, ctx: ServeContext) -> Response:
    auto_tools = ctx.tool_call_parser is not None
    req.check(auto_tools)
    model = ctx.check_model(req.model)
    params = to_sampling_params(req, auto_tools)
    prompt_ids = render_chat(ctx, req)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    streams = await submit_all(ctx.engine, rid, [prompt_ids], params, prompt_param="messages",
                               max_tokens_param="max_tokens" if req.max_completion_tokens is None
                               else "max_completion_tokens")
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    tt = ctx.token_text

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        tools = req.tool_schema(auto_tools) is not None or req.parses_tools(auto_tools)
        return StreamingResponse(_stream(streams, head, params.n, top_n, include_usage, tt,
                                         (lambda c: message(req, ctx, c)) if tools else None),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    try:
        (out,) = await cancel_on_disconnect(raw, final_outputs(streams))
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as e:
        raise from_engine(e) from None
    choices = []
    for c in out.outputs:
        msg, finish = message(req, ctx, c)
        choices.append({"index": c.index, "message": msg,
                        "logprobs": chat_logprobs(tt, c, 0, top_n) if top_n is not None else None,
                        "finish_reason": finish, "stop_reason": c.stop_reason})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": _usage(out)})


async def _stream(streams, head: dict, n: int, top_n: int | None, include_usage: bool, tt: TokenText,
                  answer=None):
    """``answer``: with tools, a choice's whole message (``message``), sent as one delta when it finishes: the
    text has to be complete before it can be told apart from a call (parsed) or turned into one (forced)."""
    tracker = DeltaTracker(n)
    extra = {"usage": None} if include_usage else {}
    gen = merged(streams)
    last = None
    try:  # OpenAI's shape: a role chunk per choice, content deltas, a last chunk with finish_reason
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None} for i in range(n)], **extra})
        async for _, out in gen:
            last = out
            choices = []
            for idx, c, text, start, finish in tracker.deltas(0, out):
                if answer is not None:
                    if finish is None:
                        continue
                    msg, finish = answer(c)
                    delta = {k: v for k, v in msg.items() if k != "role" and v is not None}
                    for j, call in enumerate(delta.get("tool_calls", [])):
                        call["index"] = j
                    choices.append({"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish})
                    continue
                choices.append({"index": idx, "delta": {"content": text} if text else {},
                                "logprobs": chat_logprobs(tt, c, start, top_n) if top_n is not None else None,
                                "finish_reason": finish})
            if choices:
                yield sse({**head, "choices": choices, **extra})
        if include_usage and last is not None:
            yield sse({**head, "choices": [], "usage": _usage(last)})
    except Exception as e:
        yield sse(from_engine(e).body())
    finally:
        await gen.aclose()
    yield sse("[DONE]")
