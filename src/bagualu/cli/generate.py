"""``bagualu generate MODEL_DIR --prompt TEXT``: generate text with the reference decoder."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a Hugging Face model directory",
                              description="Generate a continuation of each --prompt (reference decoder: "
                                          "the whole sequence is recomputed per token).")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from bagualu.models import ModelLoadError, from_pretrained, load_tokenizer
    from bagualu.models.generate import generate

    if args.max_tokens < 0:
        print(f"error: --max-tokens={args.max_tokens} must be >= 0", file=sys.stderr)
        return 2
    try:
        model = from_pretrained(args.model_dir, dtype=args.dtype)
        tok = load_tokenizer(args.model_dir)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt in args.prompt:
        if args.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
        else:
            ids = tok.encode(prompt)
        t0 = time.perf_counter()
        new = generate(model, ids, max_new_tokens=args.max_tokens, temperature=args.temperature,
                       top_k=args.top_k, seed=args.seed, eos_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t0
        print(f"--- prompt: {prompt!r}")
        print(tok.decode(new))
        print(f"--- {len(new)} tokens in {dt:.2f}s ({len(new) / max(dt, 1e-9):.1f} tokens/s, reference decoder)")
    return 0
