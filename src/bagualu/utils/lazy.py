"""Resolve ``"package.module:attr"`` dotted paths at first use (vendor code is imported only when chosen)."""

from __future__ import annotations

import importlib
from typing import Any


def import_dotted(path: str) -> Any:
    """Import ``"pkg.mod:attr"`` (or ``"pkg.mod.attr"``) and return the attribute."""
    if ":" in path:
        mod_name, _, attr = path.partition(":")
    else:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"{path!r} is not a dotted path of the form 'package.module:attribute'")
    module = importlib.import_module(mod_name)
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except AttributeError:
        raise ImportError(f"{mod_name!r} has no attribute {attr!r} (from dotted path {path!r})") from None
