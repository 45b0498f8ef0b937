"""``bagualu init-model FLAVOUR OUT_DIR``: save a randomly initialised model + byte tokenizer (HF layout)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from bagualu.models.flavours import FLAVOURS

    p = subparsers.add_parser(
        "init-model", help="write a randomly initialised model of a named flavour as a Hugging Face directory",
        description="Write a randomly initialised model (config.json, safetensors, tokenizer) that bagualu and "
                    "transformers load. Flavours: " + ", ".join(FLAVOURS))
    p.add_argument("flavour", choices=list(FLAVOURS), metavar="FLAVOUR", help=", ".join(FLAVOURS))
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--dtype", default="float32", help="parameter dtype (default float32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from bagualu.models import from_config
    from bagualu.models.byte_tokenizer import byte_level_tokenizer
    from bagualu.models.flavours import flavour

    cfg = dataclasses.replace(flavour(args.flavour), dtype=args.dtype)
    model = from_config(cfg, device="cpu", seed=args.seed)
    model.save_pretrained(args.out_dir)
    byte_level_tokenizer().save(args.out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.flavour} ({cfg.arch}, {n / 1e6:.2f}M parameters, {args.dtype}) to {args.out_dir}")
    return 0
