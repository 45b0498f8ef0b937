"""The package logger: ``get_logger(__name__)`` everywhere, level from BAGUALU_LOG_LEVEL."""

from __future__ import annotations

import logging

from bagualu.utils import env

_configured = False


def get_logger(name: str) -> logging.Logger:
    global _configured
    if not _configured:
        root = logging.getLogger("bagualu")
        if not root.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("[bagualu %(levelname)s %(asctime)s] %(message)s", "%H:%M:%S"))
            root.addHandler(h)
        root.setLevel(env.get("BAGUALU_LOG_LEVEL"))
        root.propagate = False
        _configured = True
    return logging.getLogger(name if name.startswith("bagualu") else f"bagualu.{name}")
