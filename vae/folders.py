"""Swapping a folder into place by renames. Standard library only, so that staging, which
must not spend seconds importing torch, shares the model library's one folder-swap."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def swap_dir(new: Path, target: Path, aside: Path | None = None) -> None:
    """Put the folder `new` at `target` by renames: readers see the old or the new folder,
    never a mix. The old target waits at `aside` (default: a hidden sibling) until the new one
    is in place, is put back if the swap fails, and is deleted after. The one folder-swap of the
    project: saved models, staged shards and exported models all go through it."""
    aside = aside or target.with_name(f".{target.name}.old")
    had_old = target.exists() or target.is_symlink()
    if had_old:
        _remove(aside)  # left by a process killed outright (SIGKILL)
        os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        if had_old:
            os.replace(aside, target)
        raise
    if had_old:
        _remove(aside)
