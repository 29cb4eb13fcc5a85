"""Record the staged shards in DVC (`dvc add`) and upload them (`dvc push`), one command at a time.

DVC refuses a second command in the same repo while one runs ("Unable to acquire lock"), so every
DVC command issued by the pipeline takes a cross-process file lock first: two scheduled runs, or a
flow and a CLI call, then queue instead of failing. Commands run outside the pipeline are waited
for with DVC's own `--wait-for-lock`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from pipelines.data.versioning.remote_probe import unanswered
from pipelines.errors import PipelineError
from pipelines.storage import S3_EXTRA, S3_SCHEMES, s3_extra_missing
from pipelines.timeouts import TIMEOUT_ENV

LOCK_NAME = "vae-pipeline.lock"  # in .dvc/tmp, which DVC's own .gitignore already ignores
LOCK_TIMEOUT_S = 1800.0  # a push of a large dataset to a slow remote can take this long


class DvcCommandError(PipelineError):
    """A DVC command failed; `retryable` is False for mistakes a retry cannot fix."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class DataVersion:
    """What `dvc add` recorded, or why nothing was recorded."""

    versioned: bool
    repo: str | None = None
    dvc_file: str | None = None  # the .dvc file that tracks the shards, relative to repo
    dvc_md5: str | None = None
    skipped_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def find_repo(start: Path) -> Path | None:
    """The DVC repo holding `start`: the nearest folder at or above it with a .dvc/ folder."""
    for folder in [start, *start.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_lock(repo: Path, timeout: float = LOCK_TIMEOUT_S) -> FileLock:
    path = repo / ".dvc" / "tmp" / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=timeout)


def run_dvc(repo: Path, *args: str, timeout: float = LOCK_TIMEOUT_S) -> str:
    """Run `dvc <args>` in repo under the pipeline's DVC lock; returns its output."""
    # `python -m dvc` from this interpreter: the flow may run where `dvc` is not on PATH.
    # --wait-for-lock: a DVC command started outside the pipeline (a user's `dvc repro`) makes
    # this one wait for DVC's own lock instead of failing; our timeout still bounds the wait.
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": os.environ.get("DVC_NO_ANALYTICS", "1")}
    try:
        with dvc_lock(repo, timeout):
            proc = subprocess.run(
                cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
            )
    except Timeout as exc:
        raise DvcCommandError(
            f"another DVC command held {exc.lock_file} for {timeout:.0f}s; wait for it to finish "
            "(or delete the lock file if no pipeline process is running) and retry"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise DvcCommandError(f"'dvc {' '.join(args)}' ran longer than {timeout:.0f}s") from exc
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        last = out.splitlines()[-1] if out else f"exit code {proc.returncode}"
        raise DvcCommandError(f"'dvc {' '.join(args)}' failed in {repo}: {last}")
    return out


def tracking_file(repo: Path, shards: Path) -> Path | None:
    """The .dvc file whose single out is the shards folder (data.dvc in this repo)."""
    candidates = [repo / "data.dvc", shards.with_name(shards.name + ".dvc")]
    for path in candidates:
        if not path.is_file():
            continue
        outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
        if outs and (path.parent / outs[0].get("path", "")).resolve() == shards.resolve():
            return path
    return None


def recorded_md5(dvc_file: Path) -> str | None:
    """The md5 a .dvc file records for the folder it tracks (None: no file, or none recorded)."""
    if not dvc_file.is_file():
        return None
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    except yaml.YAMLError:
        return None
    return outs[0].get("md5") if outs else None


def version_shards(shards: Path, root: Path) -> DataVersion:
    """`dvc add` the shards folder in the DVC repo holding root; skip (with a reason) if none.

    Idempotent: byte-identical shards give the same md5, so re-adding changes nothing.
    """
    repo = find_repo(root)
    if repo is None:
        return DataVersion(False, skipped_reason=f"no DVC repo at or above {root} (no .dvc/)")
    if not shards.resolve().is_relative_to(repo.resolve()):
        return DataVersion(
            False,
            repo=str(repo),
            skipped_reason=f"shards folder {shards} is outside the DVC repo {repo}",
        )
    rel = shards.resolve().relative_to(repo.resolve()).as_posix()
    run_dvc(repo, "add", "--quiet", rel)
    dvc_file = tracking_file(repo, shards)
    if dvc_file is None:
        raise DvcCommandError(f"'dvc add {rel}' ran but no .dvc file in {repo} tracks {rel}")
    return DataVersion(
        True,
        repo=str(repo),
        dvc_file=dvc_file.relative_to(repo).as_posix(),
        dvc_md5=recorded_md5(dvc_file),
    )


def default_remote(repo: Path) -> tuple[str, dict] | None:
    """The default remote's name and config section, as DVC's own config reader merges them
    (config.local, the global and system configs; a relative URL resolved from .dvc/):
    in-process, where asking `dvc remote` would cost a second of DVC start-up."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(repo / ".dvc"))
        name = config["core"].get("remote")
        return (name, dict(config["remote"][name])) if name else None
    except (ConfigError, KeyError, OSError):
        return None


def default_remote_url(repo: Path) -> str | None:
    """The default remote's URL."""
    found = default_remote(repo)
    url = found[1].get("url") if found else None
    return str(url) if url else None


def check_remote_extra(repo: Path) -> None:
    """An s3:// default remote needs the s3 extra (dvc-s3): said in one line before staging,
    not by `dvc push` after it (and again on each of the push task's retries)."""
    url = default_remote_url(repo)
    if url and url.partition("://")[0] in S3_SCHEMES and s3_extra_missing("dvc_s3"):
        raise DvcCommandError(f"the default DVC remote is on S3; {S3_EXTRA}", retryable=False)


def check_push_remote(repo: Path) -> None:
    """What a push needs, checked before anything is staged or pushed: the s3 extra for an
    S3 remote, and a server that answers within the network deadline (`dvc push` to one that
    takes the connection and never answers ran 418 s a try)."""
    check_remote_extra(repo)
    found = default_remote(repo)
    if found is None or (silent := unanswered(found[1])) is None:
        return
    (name, remote), (endpoint, why) = found, silent
    raise DvcCommandError(
        f"the default DVC remote '{name}' ({remote.get('url')}) does not answer at {endpoint} "
        f"({why}); start the store or fix the remote ('dvc remote modify'), run without "
        f"pushing (--no-push), or raise {TIMEOUT_ENV}"
    )


def push_version(version: DataVersion) -> str:
    """`dvc push` exactly the recorded shards to the default remote. Idempotent: safe to retry."""
    if not version.versioned or version.repo is None or version.dvc_file is None:
        raise DvcCommandError("nothing to push: the shards were not versioned", retryable=False)
    repo = Path(version.repo)
    check_push_remote(repo)  # again: the store may have gone down while the model trained
    try:
        run_dvc(repo, "remote", "default")
    except DvcCommandError as exc:
        raise DvcCommandError(
            f"the DVC repo {repo} has no default remote; add one with "
            "'dvc remote add -d <name> <url>', or run without pushing (--no-push)",
            retryable=False,
        ) from exc
    return run_dvc(repo, "push", "--quiet", version.dvc_file)
