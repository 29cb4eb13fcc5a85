"""File trees by content, to show that a command changed nothing (or exactly what it changed)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path


def tree_hashes(folder: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    """Every file under folder, recursively (its path relative to folder) -> its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not skip(p)
    }


def file_hashes(folder: Path) -> dict[str, str]:
    """The files directly in folder (by name) -> their SHA-256; sub-folders are not read."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }
