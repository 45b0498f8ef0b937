"""A byte-level tokenizer that needs no training: 256 byte tokens plus BOS/EOS/PAD.

Used for tiny random models (``bagualu init-model``) and tests, where a trained BPE would only add
set-up time. It is a real ``tokenizers`` BPE with no merges and a byte-level pre-tokeniser and decoder,
saved as tokenizer.json, so ``transformers`` and ``bagualu`` load it like any other.
"""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from bagualu.models.tokenizer import Tokenizer

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"

# The documented default chat template (ChatML): used when a model ships without one.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_level_tokenizer(chat_template: str | None = DEFAULT_CHAT_TEMPLATE) -> Tokenizer:
    """Vocabulary: ids 0-255 are bytes (in byte order), then BOS=256, EOS=257, PAD=258."""
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel.alphabet() is unordered; recover byte order from the GPT-2 byte→unicode mapping
    chars = _bytes_to_unicode()
    assert set(chars) == set(byte_to_char)
    vocab = {c: i for i, c in enumerate(chars)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS, EOS, PAD])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 256)])
    return Tokenizer(backend=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=chat_template)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte → printable character map, as a list indexed by byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]
