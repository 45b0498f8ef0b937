"""``ServeContext``: what every endpoint needs — the engine, the tokenizer, the served model names."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bagualu.engine.async_engine import AsyncEngine
from bagualu.serve.errors import APIError
from bagualu.serve.streams import TokenText


@dataclass(kw_only=True)
class ServeContext:
    engine: AsyncEngine
    tokenizer: object
    """A ``bagualu.models.tokenizer.Tokenizer`` (encode/decode, ``apply_chat_template``)."""
    served_model_names: list[str]
    drain_timeout: float = 30.0
    tool_call_parser: str | None = None
    """A ``serve.tool_parsers`` name: ``tool_choice`` ``auto`` answers parse the model's text for calls."""
    created: int = field(default_factory=lambda: int(time.time()))
    token_text: TokenText = field(init=False)

    def __post_init__(self):
        if not self.served_model_names:
            raise ValueError("served_model_names is empty; give at least one name")
        self.token_text = TokenText(self.tokenizer)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> str:
        """The name to echo back; a 400 for a model this server does not serve."""
        if name is None:
            return self.model_name
        if name not in self.served_model_names:
            raise APIError.invalid("model", f"model {name!r} is not served here; this server serves "
                                             f"{', '.join(map(repr, self.served_model_names))}",
                                   code="model_not_found")
        return name

    @property
    def max_model_len(self) -> int | None:
        core = self.engine.core
        return core.max_model_len if core is not None else None
