"""``bagualu train [RECIPE] [--config FILE.toml] [--section.key=value ...] [--nproc N] [--max-restarts R]
[--run-dir DIR]``: the main job. With no arguments, the ``tiny-moe`` recipe on all local devices (on a CPU
machine: 2 processes, expert parallelism 2) on the bundled corpus."""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bagualu train", description=__doc__)
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default="tiny-moe", help="recipe name (default tiny-moe)")
    p.add_argument("--config", default=None, help="a TOML file of [section] key = value overrides")
    p.add_argument("--run-dir", default=None, help="where logs, plots, checkpoints and the export go "
                                                   "(default runs/RECIPE)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes to launch (default: one per accelerator, or 2 on a CPU machine)")
    p.add_argument("--max-restarts", type=int, default=0, help="restarts of the worker group on failure "
                                                                 "(each restart resumes from the last checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --run-dir")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (the main job)", description=__doc__)
    _add_arguments(p)
    p.set_defaults(func=run, accepts_overrides=True)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate ``--section.key=value`` (or ``--section.key value``) from the ordinary arguments."""
    rest, overrides, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            key, eq, value = a[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{a} needs a value")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def build_config(args: argparse.Namespace):
    from pathlib import Path

    from bagualu.storage import is_url
    from bagualu.train.config import apply_overrides
    from bagualu.train.recipes import recipe

    cfg = recipe(args.recipe)
    overrides: dict[str, object] = {}
    if args.config:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        with open(args.config, "rb") as f:
            for section, values in tomllib.load(f).items():
                if not isinstance(values, dict):
                    raise ValueError(f"{args.config}: top-level key {section!r} must be a [section] table")
                overrides.update({f"{section}.{k}": v for k, v in values.items()})
    overrides.update(getattr(args, "overrides", {}) or {})
    cfg = apply_overrides(cfg, overrides)
    run_dir = args.run_dir or f"runs/{args.recipe}"
    if is_url(run_dir):
        raise ValueError(f"--run-dir {run_dir}: the run directory holds the log, plot and export and must be local; "
                         f"put checkpoints on object storage with --train.checkpoint_dir=URL and data with "
                         f"--data.path=URL")
    return cfg, Path(run_dir)


def default_nproc() -> int:
    from bagualu.platform import current_platform

    plat = current_platform()
    return plat.device_count() if plat.device_type != "cpu" else 2


def run(args: argparse.Namespace) -> int:
    from bagualu.launch import adopt_slurm_env, launch_local, under_launcher

    try:
        cfg, run_dir = build_config(args)  # validate before launching anything
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    adopt_slurm_env()
    if under_launcher() or (args.nproc or default_nproc()) == 1:
        from bagualu.train.loop import train

        try:
            train(cfg, run_dir, resume=args.resume)
        except (ValueError, MemoryError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    argv = [args.recipe, "--run-dir", str(run_dir)] + (["--config", args.config] if args.config else [])
    argv += ["--resume"] if args.resume else []
    argv += [f"--{k}={v}" for k, v in (getattr(args, "overrides", {}) or {}).items()]
    return launch_local("bagualu.train.entry", argv, nproc=args.nproc or default_nproc(),
                        max_restarts=args.max_restarts)
