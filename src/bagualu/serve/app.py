"""The FastAPI application: OpenAI's routes over an ``AsyncEngine``, plus ``/health`` and ``/metrics``.

    GET  /health               200 {"status": "ready"}; 503 while loading, draining, or after the loop died
    GET  /metrics              Prometheus text format (see ``serve.metrics``)
    GET  /v1/models            the served model name(s)
    POST /v1/completions       see ``serve.completions``
    POST /v1/chat/completions  see ``serve.chat``
    POST /tokenize             {"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"} (vLLM's)
    POST /detokenize           {"tokens"} -> {"prompt"}

The lifespan starts the engine thread (the model loads there, so the socket answers — with 503 —
while it loads) and, at shutdown, drains it: uvicorn first waits for open responses, then the engine
aborts whatever is left after ``drain_timeout``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from bagualu.serve.chat import create_chat_completion, render_chat
from bagualu.serve.completions import create_completion
from bagualu.serve.context import ServeContext
from bagualu.serve.errors import RETRY_AFTER_S, APIError, install_handlers
from bagualu.serve.metrics import MetricsExporter
from bagualu.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


def build_app(ctx: ServeContext) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not ctx.engine.started:
            ctx.engine.start()
        yield
        await ctx.engine.shutdown(ctx.drain_timeout)

    app = FastAPI(title="BaGuaLu", summary="OpenAI-compatible server over the BaGuaLu engine", lifespan=lifespan)
    install_handlers(app)
    exporter = MetricsExporter(ctx.engine, ctx.model_name)

    @app.get("/health")
    async def health():
        state = ctx.engine.state
        body = {"status": state}
        if state == "ready":
            return body
        if ctx.engine.error is not None:
            body["error"] = repr(ctx.engine.error)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if state in ("loading", "draining") else None
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(exporter.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": ctx.created, "owned_by": "bagualu", "root": ctx.model_name,
             "max_model_len": ctx.max_model_len} for name in ctx.served_model_names]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(req, raw, ctx)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(req, raw, ctx)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        req.check()
        ctx.check_model(req.model)
        if req.messages is not None:
            ids = render_chat(ctx, req)
        else:
            ids = ctx.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        ctx.check_model(req.model)
        V = ctx.tokenizer.vocab_size
        if any(not 0 <= t < V for t in req.tokens):
            raise APIError.invalid("tokens", f"token ids must lie in [0, {V})")
        return {"prompt": ctx.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    return app
