"""Parsers of the tool calls a model writes in free text (``tool_choice`` ``auto``), chosen with
``bagualu serve --tool-call-parser NAME``.

``hermes``: the Hermes / Qwen2.5 / Qwen3 format, calls as JSON objects ``{"name": ..., "arguments": {...}}``
between ``<tool_call>`` and ``</tool_call>``; the text outside them is the message's content. A block
that is not such a JSON object stays in the content (the model's text is never dropped).
"""

from __future__ import annotations

import json
import re

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(function name, arguments as a JSON string), ...]) of ``text``."""
    calls: list[tuple[str, str]] = []
    kept: list[str] = []
    last = 0
    for m in _HERMES.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append((obj["name"], args if isinstance(args, str) else json.dumps(args)))
        kept.append(text[last:m.start()])
        last = m.end()
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


PARSERS = {"hermes": parse_hermes}
