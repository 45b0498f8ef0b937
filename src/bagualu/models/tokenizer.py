"""Tokenizers from a Hugging Face directory, through the ``tokenizers`` library (no ``transformers``).

``tokenizer.json`` holds the model, normaliser, pre-tokeniser, post-processor (BOS/EOS insertion) and
decoder, so encoding with ``tokenizers`` reproduces ``transformers``' fast tokenizer. The special-token
names and the chat template come from ``tokenizer_config.json`` (or ``chat_template.jinja`` /
``chat_template.json``, where transformers 5 puts it). Chat templates render in a sandboxed Jinja
environment configured as transformers configures it, so prompts are byte-identical.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from bagualu.models.errors import ModelLoadError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):  # AddedToken serialised as a dict
        return v.get("content")
    return v if isinstance(v, str) else None


@dataclass
class Tokenizer:
    """Encode/decode text and render chat prompts. ``backend`` is the ``tokenizers.Tokenizer``."""

    backend: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _id(self, tok: str | None) -> int | None:
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render ``messages`` with the model's chat template (an error when it has none)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no 'chat_template')")
        text = _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", **kwargs)
        # the template already wrote the special tokens it wants
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (transformers loads them as a fast tokenizer)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / TOKENIZER_JSON))
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for k in ("bos_token", "eos_token", "pad_token", "chat_template"):
            if getattr(self, k) is not None:
                cfg[k] = getattr(self, k)
        (path / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _read_json(path: Path, name: str) -> dict:
    try:
        data = json.loads((path / name).read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(path, name, f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(path, name, "must hold a JSON object")
    return data


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not (path / TOKENIZER_JSON).is_file():
        raise ModelLoadError(path, TOKENIZER_JSON, "is missing; bagualu reads tokenizers from tokenizer.json "
                             "(save a fast tokenizer with transformers' save_pretrained to create it)")
    try:
        backend = HFTokenizer.from_file(str(path / TOKENIZER_JSON))
    except Exception as e:
        raise ModelLoadError(path, TOKENIZER_JSON, f"cannot be read by the tokenizers library ({e})") from None
    cfg = _read_json(path, TOKENIZER_CONFIG) if (path / TOKENIZER_CONFIG).is_file() else {}
    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").is_file():
        template = _read_json(path, "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return Tokenizer(backend=backend, bos_token=_token_str(cfg.get("bos_token")),
                     eos_token=_token_str(cfg.get("eos_token")), pad_token=_token_str(cfg.get("pad_token")),
                     chat_template=template)
