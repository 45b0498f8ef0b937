"""An OpenAI-compatible HTTP front end over the engine (FastAPI + uvicorn): ``bagualu serve MODEL_DIR``.

    ctx = ServeContext(engine=AsyncEngine(load_core), tokenizer=tok, served_model_names=["m"])
    serve(ctx, host="127.0.0.1", port=8000)          # or build_app(ctx) for any ASGI server

Modules: ``app`` (routes), ``completions`` / ``chat`` (the two generation endpoints), ``protocol``
(request bodies → ``SamplingParams``), ``streams`` (submit, merge, disconnects, SSE), ``errors``
(OpenAI error bodies, HTTP mapping), ``metrics`` (Prometheus), ``server`` (uvicorn, graceful drain).
"""

from bagualu.serve.app import build_app
from bagualu.serve.chat import with_chat_template
from bagualu.serve.context import ServeContext
from bagualu.serve.server import serve

__all__ = ["ServeContext", "build_app", "serve", "with_chat_template"]
