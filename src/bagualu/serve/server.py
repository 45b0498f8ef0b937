"""Run the app under uvicorn with a graceful, truthful shutdown.

On SIGTERM (or Ctrl+C): the engine refuses new requests at once (``/health`` turns 503, new requests
get 503), uvicorn stops accepting connections and waits for open responses; in-flight requests keep
being served for up to ``drain_timeout`` seconds, then the engine aborts the rest, which end with a
clean error (a 503 body, or an ``error`` event in an SSE stream) instead of a cut connection; then the
engine thread stops and the R-workers exit. The process exits 0 — a drain on request is success.
uvicorn re-raises the signal it caught once it is done (so a default SIGTERM handler would end the
process with -15); a no-op handler installed first absorbs that.

If loading the model fails, the server stops and ``serve`` returns 1.
"""

from __future__ import annotations

import signal

import uvicorn

from bagualu.serve.app import build_app
from bagualu.serve.context import ServeContext
from bagualu.utils.logging import get_logger

log = get_logger(__name__)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: ServeContext):
        super().__init__(config)
        self.ctx = ctx

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.info("serve: signal %d: draining in-flight requests for up to %.0f s", sig, self.ctx.drain_timeout)
        self.ctx.engine.begin_drain(self.ctx.drain_timeout)
        super().handle_exit(sig, frame)


def serve(ctx: ServeContext, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve until a signal (or a loading failure); returns the exit status."""
    app = build_app(ctx)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(ctx.drain_timeout) + 10, timeout_keep_alive=5)
    server = _Server(config, ctx)

    def on_dead(error: BaseException) -> None:  # engine thread
        if ctx.engine.load_failed:
            log.error("serve: the model failed to load (%r); stopping", error)
            server.should_exit = True

    ctx.engine.on_dead = on_dead
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 1 if ctx.engine.load_failed else 0
