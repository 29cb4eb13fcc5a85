"""Where shards live: a local folder or an object-store URL (s3://bucket/prefix, or any fsspec
URL), used through one path type. Local folders are plain `pathlib.Path`s; URLs are
`upath.UPath`s (universal-pathlib over fsspec), which offer the same `/`, `read_bytes`, `stat`,
`exists` and `iterdir`, so the loader, lineage and staging code read both alike.

Credentials and the endpoint come from the environment only (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible store, or the SDK's config files):
nothing secret is ever written into params.yaml or git. Object-store failures become one line
naming the URL and what to do (`remote_errors`), and give up in seconds rather than retrying for
minutes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError


def resolve_in(root: Path, path: str | Path) -> Path:
    """path made absolute (~ expanded, relative to root): Ray workers change directory, so
    relative paths break there."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root / p).resolve()


def _s3_options() -> dict[str, Any]:
    """botocore's defaults retry an unreachable endpoint for about a minute per call, and wait
    on one that accepts connections but never answers without end: ours give up after
    pipelines.timeouts' deadline per attempt, two attempts."""
    from pipelines.timeouts import connect_timeout_s, network_timeout_s

    timeouts = {"connect_timeout": connect_timeout_s(), "read_timeout": network_timeout_s()}
    return {
        "config_kwargs": timeouts | {"retries": {"max_attempts": 2}},
        # Another process (staging, `dvc pull`, a user) may change the bucket at any time.
        "use_listings_cache": False,
    }


_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an "
    "S3-compatible store) in the environment"
)


_STORE_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
)  # fmt: skip


def store_env() -> dict[str, str]:
    """The object-store settings of this process's environment, for workers that need them."""
    return {k: os.environ[k] for k in _STORE_ENV if k in os.environ}


def is_remote(location: str | Path) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


S3_SCHEMES = ("s3", "s3a")
S3_EXTRA = "s3:// needs the s3 extra: pip install 'vae-pipeline[s3]'"


def s3_extra_missing(module: str = "s3fs") -> bool:
    """Whether the s3 extra's module (s3fs for shards and checkpoints, dvc_s3 for a DVC remote)
    is missing: said in one line before any stage starts, not as fsspec's or DVC's own error
    deep inside one."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # set to None in sys.modules, or a broken parent package
        return True


def check_url(url: str) -> str:
    """A URL's scheme must name an installed fsspec backend and the URL a bucket: said in one
    line before any stage starts, instead of deep inside one. Returns the URL."""
    if not is_remote(url):
        return url
    scheme, _, rest = url.partition("://")
    if not rest.strip("/"):
        raise ValueError(f"the URL names no bucket; write {scheme}://bucket/prefix")
    if scheme in S3_SCHEMES and s3_extra_missing():
        raise ValueError(S3_EXTRA)
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:  # fsspec names the package: "Please install gcsfs to ..."
        raise ValueError(f"{_reason(exc)} (pip install it into this environment)") from None
    except ValueError:
        raise ValueError(
            f"unknown URL scheme {scheme!r}; use a local folder or s3://bucket/prefix"
        ) from None
    return url


def location(path: str | Path, root: Path | None = None) -> Path:
    """A local path (relative ones resolved against root) or a UPath for a URL."""
    text = str(path)
    if is_remote(text):
        from upath import UPath

        if not text.startswith(("s3://", "s3a://")):
            return UPath(text)
        if s3_extra_missing():  # a URL that no params check saw (--source, --out)
            raise PipelineError(S3_EXTRA)
        path = UPath(text, **_s3_options())
        # s3fs retries each call 5 times on top of botocore's attempts (a class setting, not an
        # option): a silent store would cost ten deadlines per call. fsspec shares one
        # filesystem per set of options, so this holds for every path below this one too.
        path.fs.retries = 1
        return path
    return Path(text).expanduser() if root is None else resolve_in(root, text)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def remote_error(exc: BaseException, where: str) -> PipelineError:
    """One line for an object-store failure: missing, refused, or unreachable."""
    name = type(exc).__name__
    why = _reason(exc)
    if isinstance(exc, FileNotFoundError):
        return PipelineError(
            f"{where} does not exist ({why}); create the bucket, stage to it "
            "('vae-pipeline stage'), or fix data.shards_dir"
        )
    if isinstance(exc, PermissionError) or name in (
        "NoCredentialsError",
        "PartialCredentialsError",
    ):
        return PipelineError(f"{where}: access denied ({why}); {_CREDENTIALS_HINT}")
    return PipelineError(
        f"{where}: the object store did not answer ({why}); check AWS_ENDPOINT_URL, the "
        "network and the bucket name"
    )


@contextlib.contextmanager
def remote_errors(where: str | Path) -> Iterator[None]:
    """Object-store exceptions (botocore's, aiohttp's, fsspec's OSErrors) -> one line; local
    paths keep their own errors, which the callers already word."""
    if not is_remote(where):
        yield
        return
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - every store library raises its own types
        raise remote_error(exc, str(where)) from exc


def size(path: Path) -> int | None:
    """path's size in bytes, None when it does not exist. Unlike Path.exists on a URL (fsspec
    answers False to any failure), an unreachable or refusing store is an error, not an absent
    file."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - every store library raises its own types
        if not is_remote(path):
            raise
        raise remote_error(exc, str(path)) from exc


def sizes(folder: Path) -> dict[str, int]:
    """Name -> size in bytes of the files directly in folder, from one listing: checking 10^4
    shards on an object store is then a few LIST pages, not 10^4 HEAD requests. Empty when the
    folder does not exist."""
    try:
        if not is_remote(folder):
            with os.scandir(folder) as entries:
                return {e.name: e.stat().st_size for e in entries if e.is_file()}
        listed = folder.fs.ls(folder.path, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as exc:  # noqa: BLE001 - every store library raises its own types
        if not is_remote(folder):
            raise
        raise remote_error(exc, str(folder)) from exc
    return {
        e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"])
        for e in listed
        if e.get("type") == "file"
    }


def exists(path: Path) -> bool:
    return path.exists() if not is_remote(path) else size(path) is not None


def upload(local: Path, dest: Path) -> None:
    """A local file to dest on an object store, by the store library's own upload: s3fs sends a
    file over 100 MiB in parts of about 50 MiB, so memory stays bounded whatever the shard size
    (reading it whole first held every byte of the shard at once)."""
    dest.fs.put_file(str(local), dest.path)
