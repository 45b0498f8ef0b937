"""Errors for people: every load failure names the directory and the file that is missing or wrong."""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(ValueError):
    def __init__(self, path: str | Path, file: str | None, message: str):
        self.path, self.file = Path(path), file
        where = f"{self.path / file}" if file else f"{self.path}"
        super().__init__(f"{where}: {message}")
