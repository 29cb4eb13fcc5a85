"""Guards for everything the pipeline writes: it may replace only what it created.

Each check runs before any work starts and raises a one-line PipelineError that names the
setting, the path and what to do. `atomic_write_*` are the one way to write a small file so
that readers never see half of it and a failure leaves no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipelines.errors import PipelineError

# Folders whose presence marks a project or repository: never ours to replace or fill.
_PROJECT_MARKERS = (".git", ".dvc", "params.yaml", "pyproject.toml")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


# A folder of its own for each setting, named in the advice when one points at the project.
_EXAMPLES = {
    "data.shards_dir": "data/shards",
    "outputs_dir": "outputs",
    "cluster.storage_path": "runs",
    "cluster.run_name": "runs/my-run",
}


def check_not_workspace(path: Path, root: Path, setting: str) -> None:
    """Refuse to write into the workspace itself, one of its parents, or a repository's
    own folders (.git, .dvc): a replaced or filled path there would destroy the project."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    if _is_within(root, path):
        raise PipelineError(
            f"{setting} is {path}, the workspace {root} or one of its parents; the pipeline "
            f"would write over the project there: point it at a folder of its own, e.g. "
            f"{root / _EXAMPLES.get(setting.split(' ')[0], 'outputs')}"
        )
    # Below the workspace only: `dvc exp run --queue` runs the pipeline in a copy of the
    # workspace inside the repository's .dvc/tmp, which is then the workspace.
    inside = path.relative_to(root) if path.is_relative_to(root) else path.relative_to(path.anchor)
    for part in inside.parts:
        if part in (".git", ".dvc"):
            raise PipelineError(
                f"{setting} is {path}, inside a repository's own {part} folder; choose another"
            )


def foreign_entry(folder: Path, ours: Callable[[Path], bool]) -> Path | None:
    """The first entry of folder that the pipeline did not write (ours says which are)."""
    for entry in sorted(folder.iterdir()):
        if not ours(entry):
            return entry
    return None


def check_replaceable_dir(
    path: Path, root: Path, setting: str, ours: Callable[[Path], bool]
) -> None:
    """path may be replaced whole: it is absent, an empty folder, or holds only what the
    pipeline writes there (ours(entry) for every entry)."""
    check_not_workspace(path, root, setting)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise PipelineError(
            f"{setting}: {path} exists and is not a folder the pipeline made; remove it or "
            "choose another path"
        )
    for marker in _PROJECT_MARKERS:
        if (path / marker).exists():
            raise PipelineError(
                f"{setting}: {path} holds {marker}, so it is a project, not pipeline output; "
                "choose another path"
            )
    foreign = foreign_entry(path, ours)
    if foreign is not None:
        raise PipelineError(
            f"{setting}: {path} holds {foreign.name}, which the pipeline did not write, and "
            "would be replaced; empty or remove that folder, or choose another path"
        )


# Dropped into each output folder a stage writes: what it holds is the pipeline's, to replace.
OWNER_MARK = ".vae-pipeline"


def check_own_folder(path: Path, setting: str, legacy: Callable[[Path], bool]) -> None:
    """A stage's output folder may hold only what the pipeline wrote there: it is absent, empty,
    carries OWNER_MARK, or legacy(path) recognises output written before the mark existed.
    Anything else (a user's own files under the same names) is refused, never overwritten."""
    if not path.is_dir():
        return
    if (path / OWNER_MARK).is_file() or legacy(path) or not any(path.iterdir()):
        return
    first = sorted(e.name for e in path.iterdir())[0]
    raise PipelineError(
        f"{setting}: {path} holds {first} and was not written by vae-pipeline (no "
        f"{OWNER_MARK} mark); its files would be overwritten: choose another {setting} or move "
        "that folder"
    )


def mark_own_folder(path: Path) -> None:
    """Create path if needed and mark it as the pipeline's (see check_own_folder)."""
    path.mkdir(parents=True, exist_ok=True)
    mark = path / OWNER_MARK
    if not mark.is_file():
        mark.write_text("written by vae-pipeline: it replaces the files in this folder\n")


def check_output_file(
    path: Path, setting: str, suffixes: tuple[str, ...], ours: Callable[[Path], bool]
) -> None:
    """A file the pipeline is about to write: of a supported kind, not a folder, in a folder
    it can write, and if it exists, one the pipeline wrote earlier."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise PipelineError(
            f"{setting}: {path} must end in {' or '.join(suffixes)} (the kind of file written "
            "there); choose such a name"
        )
    if path.is_dir():
        raise PipelineError(f"{setting}: {path} is a folder; give a file name inside it")
    if path.exists() and not ours(path):
        raise PipelineError(
            f"{setting}: {path} exists and was not written by vae-pipeline; remove it or "
            "choose another path"
        )
    check_writable(path.parent, setting)


def check_writable(folder: Path, setting: str) -> None:
    """folder (or the nearest part of it that exists) takes a new file: probed by writing
    one, since permission bits say nothing for root or on read-only mounts."""
    probe = Path(os.path.abspath(folder))
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PipelineError(
            f"{setting}: {probe} is a file, so {folder} cannot be created; choose another path"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".vae-pipeline-probe-"):
            pass
    except OSError as exc:
        raise PipelineError(
            f"{setting}: cannot write in {probe} ({os.strerror(exc.errno or errno.EIO)}); "
            "make it writable or choose another path"
        ) from exc
