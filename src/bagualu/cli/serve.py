"""``bagualu serve MODEL_DIR [--host H] [--port P] [--served-model-name NAME] [--max-waiting N] [ENGINE OPTIONS]``:
an OpenAI-compatible HTTP server (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``,
``/metrics``) over the FastDecode engine.

Every ``EngineConfig`` field is an option (``--r-workers 2``, ``--max-num-seqs 64``, ``--kv-cache-memory 2GiB``,
``--no-prefix-caching``...). They are read from ``engine/config.py``'s source rather than by importing it, so
``bagualu --help`` stays free of torch; an option left out keeps ``EngineConfig``'s default.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

_SIZE = re.compile(r"^\s*([\d.]+(?:e\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``"4GiB"``, ``"512MB"``, ``"1e9"`` or ``"1048576"`` (KiB/MiB/GiB are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write bytes or e.g. 512MiB, 4GiB, 2GB")
    num, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = " kmgt".index(unit or " ")
    return int(num * (1024 if binary or not unit else 1000) ** power) if unit else int(num)


def engine_fields() -> list[tuple[str, str, str, str]]:
    """``(name, annotation, default source, doc)`` of each ``EngineConfig`` field, from its source."""
    import bagualu

    path = Path(bagualu.__file__).parent / "engine" / "config.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EngineConfig")
    out = []
    for i, node in enumerate(cls.body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                doc = " ".join(nxt.value.value.split())
            default = ast.unparse(node.value) if node.value is not None else ""
            out.append((node.target.id, ast.unparse(node.annotation), default, doc))
    return out


def _converter(name: str, annotation: str):
    if "memory" in name:
        return parse_size
    for t, conv in (("bool", None), ("int", int), ("float", float), ("str", str)):
        if re.search(rf"\b{t}\b", annotation):
            return conv
    return str


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (config, weights, tokenizer)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="name(s) clients use in 'model' (default: MODEL_DIR as given)")
    s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL_DIR)")
    s.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file (default: the tokenizer's, else ChatML)")
    s.add_argument("--tool-call-parser", default=None, choices=["hermes"],
                   help="parse the model's free-form tool calls, so tool_choice 'auto' works (hermes: Hermes, "
                        "Qwen2.5/3 <tool_call> JSON); without it 'auto' is refused")
    s.add_argument("--max-waiting", type=int, default=1024, metavar="N",
                   help="most sequences queued before requests get 503 + Retry-After (default 1024; 0 = no bound)")
    s.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds to finish in-flight requests before aborting them (default 30)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    e = p.add_argument_group("engine (EngineConfig fields)")
    for name, annotation, default, doc in engine_fields():
        flag = "--" + name.replace("_", "-")
        help_ = f"{doc} " if doc else ""
        help_ += f"({annotation}, default {default})"
        help_ = help_.replace("%", "%%")  # argparse formats help with %: a doc's "9-13%" would break --help
        conv = _converter(name, annotation)
        if conv is None:
            e.add_argument(flag, dest=f"engine.{name}", action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_)
        else:
            e.add_argument(flag, dest=f"engine.{name}", type=conv, default=argparse.SUPPRESS,
                           metavar=name.upper(), help=help_)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bagualu.engine.async_engine import AsyncEngine
    from bagualu.engine.config import EngineConfig
    from bagualu.models import ModelLoadError, load_tokenizer
    from bagualu.serve import ServeContext, serve, with_chat_template

    options = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("engine.")}
    if args.max_waiting < 0:
        print(f"error: --max-waiting={args.max_waiting} must be >= 0 (0 = no bound)", file=sys.stderr)
        return 2
    try:
        config = EngineConfig(**options)
        tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
        template = Path(args.chat_template).read_text() if args.chat_template else None
    except (ValueError, ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_dir = args.model_dir

    def load():
        from bagualu.engine.llm import load_engine

        return load_engine(model_dir, config, tokenizer)

    engine = AsyncEngine(load, max_waiting=args.max_waiting or None)
    ctx = ServeContext(engine=engine, tokenizer=with_chat_template(tokenizer, template),
                       served_model_names=args.served_model_name or [model_dir], drain_timeout=args.drain_timeout,
                       tool_call_parser=args.tool_call_parser)
    return serve(ctx, host=args.host, port=args.port, log_level=args.log_level)
