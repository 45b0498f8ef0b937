"""The ``bagualu`` console script: a thin argparse dispatcher over one module per subcommand.

Each module in ``COMMANDS`` exposes ``register(subparsers)``, which adds its parser and calls
``set_defaults(func=run)``; ``run(args) -> int`` is the exit status. Command modules import their heavy
dependencies (torch, the platform, models) inside ``run`` so that ``bagualu --help`` and
``bagualu --version`` answer without importing torch. Adding a command is one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

COMMANDS: list[str] = [
    "bagualu.cli.info",
    "bagualu.cli.init_model",
    "bagualu.cli.generate",
    "bagualu.cli.serve",
    "bagualu.cli.data",
    "bagualu.cli.train",
    "bagualu.cli.export",
    "bagualu.cli.compile",
]


def _version_string() -> str:
    from bagualu import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"bagualu {__version__} (torch {torch_version}, python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bagualu",
        description="BaGuaLu: train and serve Mixture-of-Experts language models on any accelerator.",
    )
    parser.add_argument("--version", action="version", version=_version_string())
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command; returns the exit status.

    With no command, prints the help and returns 0 (as ``pip`` and ``docker`` do).
    """
    from bagualu.utils.openmp import tune_openmp_spin

    tune_openmp_spin()  # before any command imports torch (and so loads libgomp): see utils/openmp.py
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: dict[str, str] = {}
    if argv and argv[0] == "train":  # --section.key=value overrides are free-form: split them off first
        from bagualu.cli.train import split_overrides

        try:
            argv, overrides = split_overrides(argv)
        except ValueError as e:
            parser.error(str(e))
    args = parser.parse_args(argv)
    args.overrides = overrides
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
