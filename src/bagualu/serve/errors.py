"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

FastAPI answers a malformed body with 422 and its own shape; OpenAI clients expect 400 and this
one, so the validation handler is replaced. Engine exceptions map onto HTTP here, in one place:

    RequestError, ValueError (bad values, too long)  -> 400 invalid_request_error
    EngineUnavailableError (loading, overloaded,      -> 503 + Retry-After
        draining, dead)
    EngineDeadError / EngineShutdownError in flight   -> 500 / 503
    unknown route, wrong method                       -> 404 / 405 in the same shape
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from bagualu.engine.async_engine import EngineDeadError, EngineShutdownError, EngineUnavailableError
from bagualu.engine.core import RequestError

RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    @classmethod
    def invalid(cls, param: str | None, message: str, code: str = "invalid_value") -> APIError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def unsupported(cls, param: str, message: str) -> APIError:
        return cls(400, message, param=param, code="unsupported")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_CONTEXT = re.compile(r"context|KV pool")


def from_engine(e: BaseException, prompt_param: str = "prompt", max_tokens_param: str = "max_tokens") -> APIError:
    """The API error for an exception the engine raised about one request."""
    if isinstance(e, EngineUnavailableError):  # a retry helps unless the engine is gone for good
        transient = e.reason in ("overloaded", "loading")
        return APIError(503, str(e), type="server_error", code=e.reason,
                        headers={"Retry-After": str(RETRY_AFTER_S)} if transient else None)
    if isinstance(e, EngineShutdownError):
        return APIError(503, str(e), type="server_error", code="shutting_down")
    if isinstance(e, EngineDeadError):
        return APIError(500, str(e), type="server_error", code="engine_dead")
    if isinstance(e, RequestError) and e.param is not None:
        param = {"prompt": prompt_param, "max_tokens": max_tokens_param}.get(e.param, e.param)
        return APIError.invalid(param, str(e), code=e.code)
    if isinstance(e, (RequestError, ValueError, TypeError)):
        msg = str(e)
        param = max_tokens_param if msg.startswith("max_tokens=") else prompt_param
        code = "context_length_exceeded" if _CONTEXT.search(msg) else "invalid_value"
        return APIError.invalid(param, msg, code=code)
    return APIError(500, f"internal error: {e!r}", type="server_error", code="internal_error")


_TYPE_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|[A-Z]\w*)$|\[")


def _validation_message(errors) -> tuple[str, str | None, str]:
    """One readable line from pydantic's errors; a union's per-member failures become one
    "expected one of" (pydantic tags each member, e.g. ``("prompt", "list[int]", 0)``)."""
    groups: dict[str, dict] = {}
    code = "invalid_type"
    for err in errors:
        path, tags = [], []
        for x in err.get("loc", ()):
            if isinstance(x, str) and _TYPE_TAG.search(x):
                tags.append(x)
                break  # below a union member: report the field, not the member's insides
            if x != "body":
                path.append(str(x))
        param = ".".join(path) or "body"
        g = groups.setdefault(param, {"tags": [], "msg": err.get("msg")})
        if tags and tags[0] not in g["tags"]:
            g["tags"].append(tags[0])
        if err.get("type") == "missing":
            code = "missing_field"
        elif err.get("type") == "json_invalid":
            code = "invalid_json"
    parts = [f"{p}: expected one of {' | '.join(g['tags'])}" if len(g["tags"]) > 1 else f"{p}: {g['msg']}"
             for p, g in groups.items()]
    message = "; ".join(parts[:5]) + (f" (and {len(parts) - 5} more)" if len(parts) > 5 else "")
    first = next(iter(groups), None)
    return message, None if first == "body" else first, code


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        message, param, code = _validation_message(e.errors())
        return APIError.invalid(param, message, code=code).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code, headers=dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return APIError(500, f"internal error: {e!r}", type="server_error", code="internal_error").response()
