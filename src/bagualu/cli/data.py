"""``bagualu data prepare [FILES...] --out DIR``: tokenise text into token shards (default corpus: the
Python standard library's own sources)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare training data (tokenizer + token shards)")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    q = sub.add_parser("prepare", help="tokenise text files into memory-mapped token shards with a manifest",
                       description="Train a byte-level BPE on the files (or use --tokenizer) and write token "
                                   "shards + manifest.json + tokenizer files to --out. With no FILES, the corpus is "
                                   "the Python standard library's sources on this machine.")
    q.add_argument("files", nargs="*", metavar="FILES")
    q.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    q.add_argument("--tokenizer", default=None, help="an existing tokenizer.json (or its directory) to use")
    q.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training one (default 4096)")
    q.add_argument("--max-mb", type=float, default=32.0, help="size budget of the default corpus (default 32)")
    q.add_argument("--shard-mtokens", type=float, default=64.0, help="tokens per shard, in millions (default 64)")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bagualu.models import ModelLoadError
    from bagualu.train.corpus import stdlib_files
    from bagualu.train.data import prepare

    if args.vocab_size < 300:
        print(f"error: --vocab-size={args.vocab_size} is too small: a byte-level BPE needs 256 byte tokens + "
              "3 specials; use at least 300", file=sys.stderr)
        return 2
    files = args.files or stdlib_files(int(args.max_mb * (1 << 20)))
    try:
        m = prepare(files, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                    shard_tokens=int(args.shard_mtokens * 1e6))
    except (FileNotFoundError, ValueError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {m['documents']} documents, {m['total_tokens']} tokens ({m['dtype']}) in "
          f"{len(m['shards'])} shard(s), vocab {m['vocab_size']}, at {args.out}")
    return 0
