"""``prepare``: text files → a byte-level BPE tokenizer (trained with ``tokenizers``, or a given
tokenizer.json) → token shards with a manifest (``bagualu.storage``), with progress.

The output directory is also a tokenizer directory (tokenizer.json + tokenizer_config.json), so a model
trained on it saves with the tokenizer it was trained with. It may be a local directory or an fsspec URL
(``s3://bucket/data``): the shards and the manifest go through ``bagualu.storage``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tok_models

from bagualu.models.byte_tokenizer import BOS, DEFAULT_CHAT_TEMPLATE, EOS, PAD
from bagualu.models.tokenizer import Tokenizer, load_tokenizer
from bagualu.storage.fs import filesystem, is_local, join
from bagualu.storage.token_shards import ShardWriter
from bagualu.train.corpus import read_documents
from bagualu.utils.logging import get_logger

log = get_logger(__name__)


def train_bpe(files: list[str | Path], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained on ``files``, with BOS/EOS/PAD specials."""
    backend = HFTokenizer(tok_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(read_documents(files), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                           special_tokens=[(BOS, backend.token_to_id(BOS))])
    return Tokenizer(backend=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=DEFAULT_CHAT_TEMPLATE)


def save_tokenizer(tok: Tokenizer, out: str) -> None:
    """``tok``'s files into ``out`` (a local directory or an fsspec URL)."""
    fs, path = filesystem(out)
    fs.makedirs(path, exist_ok=True)
    if is_local(fs):
        tok.save(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        for f in sorted(Path(tmp).iterdir()):
            fs.put_file(str(f), join(path, f.name))


def load_dataset_tokenizer(data: str) -> Tokenizer:
    """The tokenizer saved with a prepared dataset (local directory or fsspec URL)."""
    fs, path = filesystem(data)
    if is_local(fs):
        return load_tokenizer(path)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if fs.isfile(join(path, name)):
                fs.get_file(join(path, name), str(Path(tmp) / name))
        return load_tokenizer(tmp)


def prepare(files: list[str | Path], out: str | Path, *, tokenizer: str | Path | None = None,
            vocab_size: int = 4096, shard_tokens: int = 64 << 20) -> dict:
    """Tokenise ``files`` (one document each) into ``out``; returns the manifest."""
    files = [Path(f) for f in files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing[:5])}")
    t0 = time.perf_counter()
    if tokenizer is None:
        tok = train_bpe(files, vocab_size)
        log.info("trained a byte-level BPE (vocab %d) on %d files in %.1fs", tok.vocab_size, len(files),
                 time.perf_counter() - t0)
    else:
        tok = load_tokenizer(Path(tokenizer).parent if Path(tokenizer).is_file() else tokenizer)
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; documents need a separator (set eos_token in "
                         "tokenizer_config.json)")
    save_tokenizer(tok, str(out))
    writer = ShardWriter(str(out), vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                         shard_tokens=shard_tokens, extra={"tokenizer": "tokenizer.json"})
    batch: list[str] = []
    done, last = 0, time.perf_counter()

    def flush():
        for ids in tok.encode_batch(batch, add_special_tokens=False):
            writer.add(ids)

    for text in read_documents(files):
        batch.append(text)
        if len(batch) == 64:
            flush()
            done += len(batch)
            batch = []
            if time.perf_counter() - last > 5:
                log.info("tokenised %d/%d documents, %d tokens", done, len(files), writer.buffered +
                         sum(s["tokens"] for s in writer.shards))
                last = time.perf_counter()
    if batch:
        flush()
    manifest = writer.close()
    log.info("wrote %d tokens in %d shard(s) to %s in %.1fs", manifest["total_tokens"], len(manifest["shards"]),
             out, time.perf_counter() - t0)
    return manifest
