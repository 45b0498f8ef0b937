"""``bagualu compile --explain SCRIPT_OR_MODEL``: what PowerFusion fuses, how it maps it, how fast it runs.

With a Python file, the script runs as ``__main__`` (arguments after ``--`` become its ``sys.argv``) and
every ``torch.compile(..., backend="powerfusion")`` it triggers is reported. With a training recipe
(``tiny-moe``, ``tiny-dense``, ...) or a model flavour (``tiny-llama``, ``tiny-mixtral``, ...), the model is
built with random weights, compiled, and one forward+backward step on random tokens is reported; MoE
expert dispatch runs eagerly between compiled graphs (it is not traceable by Dynamo), as ``bagualu train
--train.compile=powerfusion`` compiles it; ``--codegen triton`` shows the GPU code generator's kernels
(under Triton's interpreter on a machine without a GPU). The report lists
each fused kernel (ops, domain, chosen mapping, predicted and measured time, GB/s) and every ATen
fallback with its reason.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compile", help="explain PowerFusion's fusion of a script or model",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("target", help="a Python script, a training recipe name or a model flavour name")
    p.add_argument("script_args", nargs="*", help="arguments for the script (after --)")
    p.add_argument("--explain", action="store_true", required=True,
                   help="print the fusion report (the only mode for now)")
    p.add_argument("--batch", type=int, default=2, help="recipe/flavour: sequences per step (default 2)")
    p.add_argument("--seq", type=int, default=64, help="recipe/flavour: tokens per sequence (default 64)")
    p.add_argument("--layers", type=int, default=None, help="recipe/flavour: override the layer count")
    p.add_argument("--no-measure", action="store_true", help="skip timing the kernels")
    p.add_argument("--codegen", choices=("cpp", "triton"), default=None,
                   help="recipe/flavour: the code generator (default: the platform's); triton on a machine "
                        "without a GPU runs under Triton's interpreter")
    p.set_defaults(func=run)


def _model_config(name: str):
    from bagualu.models.flavours import FLAVOURS, flavour
    from bagualu.train.recipes import RECIPES, recipe

    if name in RECIPES:
        return recipe(name).model
    if name in FLAVOURS:
        return flavour(name)
    raise SystemExit(f"bagualu compile: {name!r} is neither a Python file nor a recipe/flavour; "
                     f"recipes: {', '.join(RECIPES)}; flavours: {', '.join(FLAVOURS)}")


def _run_model(args) -> None:
    import dataclasses

    import torch
    import torch.nn.functional as F

    import bagualu.models as bm
    from bagualu.train.compile import compile_model

    cfg = _model_config(args.target)
    if args.layers is not None:
        if args.layers < 1:
            raise SystemExit(f"--layers={args.layers} must be at least 1")
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    model = bm.from_config(cfg, device="cpu", dtype=torch.float32)
    compile_model(model, "powerfusion", {"codegen": args.codegen} if args.codegen else None)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()


def run(args) -> int:
    if args.codegen == "triton" and not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU here
    from bagualu.compiler.report import record

    is_script = args.target.endswith(".py") or os.path.isfile(args.target)
    if is_script and not os.path.isfile(args.target):
        print(f"bagualu compile: no such script {args.target!r}", file=sys.stderr)
        return 2
    with record(measure=not args.no_measure) as ex:
        if is_script:
            argv = sys.argv
            sys.argv = [args.target, *args.script_args]
            try:
                runpy.run_path(args.target, run_name="__main__")
            finally:
                sys.argv = argv
        else:
            _run_model(args)
    if not ex.graphs:
        print(f"bagualu compile: {args.target} compiled nothing with backend='powerfusion'", file=sys.stderr)
        return 1
    print(ex)
    return 0
