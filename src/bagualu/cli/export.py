"""``bagualu export RUN_DIR OUT_DIR [--step N]``: write a training checkpoint as a Hugging Face directory
(experts of every rank merged), which ``transformers``, ``bagualu generate`` and ``bagualu serve`` load."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a training checkpoint as a Hugging Face directory",
                              description="Export a committed checkpoint of a run (default: the newest complete "
                                          "one) as config.json + safetensors + tokenizer, merging the expert shards "
                                          "of all ranks. RUN_DIR may also be a checkpoints directory or one step-N "
                                          "directory, local or an fsspec URL (s3://...).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of `bagualu train` (or a checkpoint dir)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the Hugging Face directory")
    p.add_argument("--step", type=int, default=None, help="export this step's checkpoint (default: the newest)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype of the export (default float32, the training master weights)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bagualu.checkpoint.export import export_checkpoint

    try:
        r = export_checkpoint(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {r['step']} ({r['arch']}, {r['params'] / 1e6:.1f}M parameters) from {r['checkpoint']} "
          f"to {r['out']}")
    return 0
