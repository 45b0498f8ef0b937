"""``bagualu generate MODEL_DIR --prompt TEXT [...]``: offline generation through the serving engine.

All prompts go to the engine at once (continuous batching, paged KV, R-workers with ``--r-workers N``);
``--reference`` uses the reference decoder instead (the whole sequence recomputed per token), which is
the oracle the engine is tested against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a Hugging Face model directory",
                              description="Generate a continuation of each --prompt with the serving engine "
                                          "(all prompts batched together).")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain the output to this JSON schema (structured output; needs bagualu[structured])")
    p.add_argument("--regex", default=None, help="constrain the output to this regular expression")
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="speculative decoding by prompt lookup, up to K draft tokens per step (same output)")
    p.add_argument("--r-workers", type=int, default=0,
                   help="CPU worker processes that hold the KV cache and run attention (0 = in-process)")
    p.add_argument("--reference", action="store_true",
                   help="use the reference decoder (no KV cache; slow; greedy/temperature/top-k only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from bagualu.models import ModelLoadError

    if args.max_tokens < 1:
        print(f"error: --max-tokens={args.max_tokens} must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.reference:
            return _run_reference(args)
        from bagualu.engine import LLM, SamplingParams
        from bagualu.engine.structured import StructuredOutput

        structured = None
        if args.json_schema is not None or args.regex is not None:
            structured = StructuredOutput(json=Path(args.json_schema).read_text() if args.json_schema else None,
                                          regex=args.regex)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                n=args.n, stop=tuple(args.stop), seed=args.seed, structured_output=structured)
        llm = LLM(args.model_dir, dtype=args.dtype, r_workers=args.r_workers,
                  speculative_tokens=args.speculative_tokens)
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True) if args.chat else p
               for p in args.prompt]
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    except ValueError as e:  # a request the engine refuses (e.g. a grammar that does not compile)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        llm.close()
    dt = time.perf_counter() - t0
    total = 0
    for prompt, out in zip(args.prompt, outs):
        print(f"--- prompt: {prompt!r}")
        for c in out.outputs:
            if len(out.outputs) > 1:
                print(f"[{c.index}] ", end="")
            print(c.text)
            total += len(c.token_ids)
    print(f"--- {total} tokens in {dt:.2f}s ({total / max(dt, 1e-9):.1f} tokens/s, engine, "
          f"{llm.engine.config.attention_mode})")
    return 0


def _run_reference(args) -> int:
    import time

    from bagualu.models import from_pretrained, load_tokenizer
    from bagualu.models.generate import generate

    model = from_pretrained(args.model_dir, dtype=args.dtype)
    tok = load_tokenizer(args.model_dir)
    for prompt in args.prompt:
        if args.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
        else:
            ids = tok.encode(prompt)
        t0 = time.perf_counter()
        new = generate(model, ids, max_new_tokens=args.max_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, seed=args.seed, eos_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t0
        print(f"--- prompt: {prompt!r}")
        print(tok.decode(new))
        print(f"--- {len(new)} tokens in {dt:.2f}s ({len(new) / max(dt, 1e-9):.1f} tokens/s, reference decoder)")
    return 0
