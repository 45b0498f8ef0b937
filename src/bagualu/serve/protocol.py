"""The OpenAI request bodies as pydantic models, and their translation into ``SamplingParams``.

Field names and defaults follow OpenAI's API (``max_tokens`` 16 for completions, unbounded for chat);
vLLM's extra sampling fields (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``ignore_eos``, ``stop_token_ids``, ...) are accepted too, so clients written for vLLM work unchanged
(the ``openai`` client sends them through ``extra_body``). ``response_format`` (``json_object``,
``json_schema``) constrains the output (``engine.structured``). Unknown fields are ignored, as OpenAI does;
fields we cannot honour (``suffix``, ``best_of != n``, ``tools``, non-text message parts) are refused with
a 400 rather than silently dropped.
Range checks live in ``SamplingParams`` (one source of truth); ``to_sampling_params`` turns its
``ValueError`` into a 400 naming the API field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from bagualu.engine.params import SamplingParams
from bagualu.engine.structured import StructuredOutput
from bagualu.serve.errors import APIError

TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    """Must name the served model when given (None: the served model)."""
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": {...}}}`` (OpenAI's;
    accepted on completions too, as vLLM does)."""
    # vLLM's extra structured-output fields (at most one of them, or response_format)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def _refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError.invalid("stream_options", "stream_options is only allowed when stream is true")


class CompletionRequest(_Common):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)

    def check(self) -> None:
        self._refuse_unsupported()
        if self.suffix:
            raise APIError.unsupported("suffix", "suffix (insertion) is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError.unsupported("best_of", f"best_of={self.best_of} != n={self.n} is not supported; "
                                                  "leave best_of unset")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for i, part in enumerate(self.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError.unsupported(f"messages.content.{i}", f"message part of type "
                                               f"{part.get('type')!r} is not supported; only text parts are")
                texts.append(part["text"])
            d["content"] = "".join(texts)
        elif self.content is None:
            d["content"] = ""
        return d


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def check(self, auto_tools: bool = False) -> None:
        """``auto_tools``: the server parses free-form tool calls (``--tool-call-parser``)."""
        self._refuse_unsupported()
        self.tool_schema(auto_tools)  # validates tools and tool_choice
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError.invalid("top_logprobs", "top_logprobs needs logprobs=true")

    def parses_tools(self, auto_tools: bool) -> bool:
        """Whether the answer's text is to be parsed for free-form tool calls (``tool_choice`` ``auto``)."""
        return bool(self.tools) and auto_tools and self.tool_choice in (None, "auto")

    def tool_schema(self, auto_tools: bool = False) -> dict | None:
        """The JSON schema a forced tool call's output follows (``tool_choice`` a named function: its
        parameters; ``required``: an array of ``{"name", "parameters"}`` of the given functions), or None when
        no call is forced (no tools, ``tool_choice`` ``none``, or ``auto`` when ``auto_tools``: the server has a
        parser of the model's free-form calls; without one ``auto`` is refused)."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise APIError.invalid("tool_choice", "tool_choice needs tools")
            return None
        functions = {}
        for i, t in enumerate(self.tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError.invalid(f"tools.{i}", "each tool must be {'type': 'function', 'function': {'name': ..., "
                                                     "'parameters': {...}}}")
            functions[fn["name"]] = fn.get("parameters") or {"type": "object", "properties": {}}
        choice = self.tool_choice if self.tool_choice is not None else "auto"
        if choice == "none" or (choice == "auto" and auto_tools):
            return None
        if choice == "required":
            return {"type": "array", "minItems": 1, "items": {"anyOf": [
                {"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for name, params in functions.items()]}}
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name not in functions:
                raise APIError.invalid("tool_choice", f"tool_choice names {name!r}, which is not among the tools "
                                                      f"{sorted(functions)}")
            return functions[name]
        raise APIError.unsupported("tool_choice", f"tool_choice {choice!r} needs a parser of this model's free-form "
                                                  "tool calls (bagualu serve --tool-call-parser); use 'required' or "
                                                  "name a function (the output is then constrained to its schema)")


def _structured(req: _Common) -> StructuredOutput | None:
    guided = {k: v for k, v in (("guided_json", req.guided_json), ("guided_regex", req.guided_regex),
                                ("guided_choice", req.guided_choice), ("guided_grammar", req.guided_grammar))
              if v is not None}
    fmt = req.response_format
    if len(guided) + (fmt is not None and fmt.get("type", "text") != "text") > 1:
        raise APIError.invalid(next(iter(guided)), "give at most one of response_format, guided_json, guided_regex, "
                                                   "guided_choice and guided_grammar")
    if guided:
        (name, value), = guided.items()
        if name == "guided_json":
            return StructuredOutput(json=value if isinstance(value, str) else json.dumps(value))
        if name == "guided_regex":
            return StructuredOutput(regex=value)
        if name == "guided_choice":
            return StructuredOutput(regex="|".join(f"({_literal(c)})" for c in value))
        return StructuredOutput(grammar=value)
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise APIError.invalid("response_format", "response_format json_schema needs "
                                                      "{'json_schema': {'name': ..., 'schema': {...}}}")
        return StructuredOutput(json=json.dumps(schema))
    raise APIError.invalid("response_format", f"response_format type {kind!r} is not one of 'text', "
                                              "'json_object', 'json_schema'")


# SamplingParams field -> API field, where they differ per endpoint
_API_NAMES = {"chat": {"logprobs": "top_logprobs"}}
_FIELD = re.compile(r"^(\w+)=")
_REGEX_META = re.compile(r"[.^$*+?()\[\]{}|\\/-]")


def _literal(text: str) -> str:
    """``text`` as a regex that matches exactly it (a ``guided_choice`` option)."""
    return _REGEX_META.sub(lambda m: "\\" + m.group(0), text)


def to_sampling_params(req: CompletionRequest | ChatCompletionRequest, auto_tools: bool = False) -> SamplingParams:
    chat = isinstance(req, ChatCompletionRequest)
    if chat:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens, logprobs = req.max_tokens, req.logprobs
    stop = req.stop if req.stop is not None else ()
    structured = _structured(req)
    tools = req.tool_schema(auto_tools) if chat else None
    if tools is not None:
        if structured is not None:
            raise APIError.invalid("response_format", "response_format and a forced tool call cannot be combined")
        structured = StructuredOutput(json=json.dumps(tools))
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=stop,
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, logit_bias=req.logit_bias,
            prompt_logprobs=req.logprobs if not chat and req.echo else None,
            structured_output=structured)
    except (ValueError, TypeError) as e:
        m = _FIELD.match(str(e))
        field = m.group(1) if m else None
        if chat and field == "max_tokens" and req.max_completion_tokens is not None:
            field = "max_completion_tokens"
        field = _API_NAMES.get("chat" if chat else "completions", {}).get(field, field) if field else None
        raise APIError.invalid(field, str(e)) from None


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's): a ``prompt`` string, or chat ``messages`` rendered as the chat endpoint
    renders them."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError.invalid("prompt", "give exactly one of prompt (a string) or messages")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[StrictInt]
