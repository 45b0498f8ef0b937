"""The one typed registry of every ``BAGUALU_*`` environment variable.

Read lazily, at call time, never at import (STYLE 4). Each variable is declared once here with its
type, default and meaning; code elsewhere calls ``env.get("BAGUALU_PLATFORM")`` and never touches
``os.environ`` for a BAGUALU_ name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True, kw_only=True)
class EnvVar:
    name: str
    parse: Callable[[str], Any]
    default: Callable[[], Any]
    help: str


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {s!r}")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bagualu"


VARIABLES: dict[str, EnvVar] = {
    v.name: v
    for v in [
        EnvVar(
            name="BAGUALU_PLATFORM",
            parse=lambda s: s.strip().lower() or None,
            default=lambda: None,
            help="Platform to use (cpu, cuda, or an out-of-tree plug-in's name); unset = auto-detect.",
        ),
        EnvVar(
            name="BAGUALU_CACHE_DIR",
            parse=lambda s: Path(s).expanduser(),
            default=_default_cache_dir,
            help="Where measured platform figures and compiled kernels are cached.",
        ),
        EnvVar(
            name="BAGUALU_LOG_LEVEL",
            parse=lambda s: s.strip().upper(),
            default=lambda: "INFO",
            help="Log level of the 'bagualu' logger (DEBUG, INFO, WARNING, ERROR).",
        ),
        EnvVar(
            name="BAGUALU_NO_MEASURE",
            parse=_bool,
            default=lambda: False,
            help="Never run micro-benchmarks for platform figures; use the built-in table instead.",
        ),
        EnvVar(
            name="BAGUALU_COMPILER_AUTOTUNE",
            parse=_bool,
            default=lambda: False,
            help="PowerFusion: time the best-ranked mappings of each new kernel and keep the fastest (cached on disk).",
        ),
        EnvVar(
            name="BAGUALU_NO_NATIVE",
            parse=_bool,
            default=lambda: False,
            help="Never compile or load bagualu's C++ CPU kernels; their ops use the PyTorch reference (debugging).",
        ),
    ]
}


def get(name: str) -> Any:
    """Return the parsed value of a declared BAGUALU_* variable (its default when unset)."""
    try:
        var = VARIABLES[name]
    except KeyError:
        raise KeyError(f"{name} is not a declared BAGUALU_* variable; known: {sorted(VARIABLES)}") from None
    raw = os.environ.get(name)
    if raw is None:
        return var.default()
    try:
        return var.parse(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is invalid: {e}") from None
