"""The worker entry point of ``bagualu train`` (``python -m bagualu.train.entry ...``): what every rank runs."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from bagualu.utils.openmp import tune_openmp_spin

    tune_openmp_spin()  # a rank started by torchrun or Slurm, not by the bagualu command: before torch loads
    from bagualu.cli.train import build_config, parser, split_overrides
    from bagualu.launch import adopt_slurm_env
    from bagualu.train.loop import train

    adopt_slurm_env()
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser().parse_args(rest)
    args.overrides = overrides
    cfg, run_dir = build_config(args)
    try:
        train(cfg, run_dir, resume=args.resume)
    except (ValueError, MemoryError, FileNotFoundError, RuntimeError) as e:
        # one line a person can act on (full disk, bad setting...) instead of a traceback per rank; the
        # elastic agent still sees the failure (and restarts the group when --max-restarts allows)
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
