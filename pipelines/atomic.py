"""Writing files and folders so that readers see the old or the new one, never a mix, and no
temporary file or folder outlives the process that made it (or, for a killed one, the next
run). The one place in pipelines/ that swaps folders or renames files into place."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vae.folders import swap_dir

log = logging.getLogger(__name__)


def replace_dir(src: Path, dest: Path) -> None:
    """dest <- a copy of src, swapped in whole. Whatever fails or interrupts it, no temporary
    folder stays behind and dest is the old or the new folder, never a mix. OSError on failure."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # from a process killed outright (SIGKILL)
    try:
        shutil.copytree(src, tmp)
        swap_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def temp_dir(parent: Path, prefix: str, discard: Callable[[Path], None]) -> Iterator[Path]:
    """A folder <prefix>-<pid>-<random> in parent (the pid tells remove_leftovers whose it
    is), given to discard on the way out, whatever happens. Named before it is made and made
    inside the try: SIGTERM raises between any two bytecodes, and tempfile.mkdtemp's folder
    exists before its name comes back, so an interrupt there left a folder nobody removed."""
    path = parent / f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.mkdir(mode=0o700)
        yield path
    finally:
        discard(path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:  # another user's live process
        return True
    return pid > 0


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the temporary folders that killed stage runs left beside target (those of live
    runs stay). A killed swap may have left the only copy of the previous shards in its `.old`
    folder with no target: that copy is put back first."""
    pattern = re.compile(
        re.escape(f".{target.name}.") + r"(?P<kind>staging|old)-(?:(?P<pid>\d+)-)?[a-z0-9_]+"
    )
    if not target.parent.is_dir():
        return []
    removed = []
    for entry in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if m is None or entry.is_symlink() or not entry.is_dir():
            continue
        if m["pid"] is not None and pid_alive(int(m["pid"])):
            continue
        kept = entry / target.name
        if m["kind"] == "old" and kept.is_dir() and not (target.exists() or target.is_symlink()):
            os.replace(kept, target)
            log.warning("put back %s from %s, left by a stage run that was killed", target, entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def swap_into_place(tmp: Path, target: Path) -> None:
    """swap_dir, with the old shards aside in a pid-named folder that remove_leftovers knows
    (and puts back if this process is killed mid-swap)."""
    # Not removed when not empty: an interrupted swap may have left the only copy in it.
    with temp_dir(target.parent, f".{target.name}.old", remove_if_empty) as old:
        swap_dir(tmp, target, aside=old / target.name)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside path, renamed onto it on success and removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the final file should not be
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
