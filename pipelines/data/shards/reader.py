"""Reading one whole shard and checking it against its manifest entry (size, SHA-256) before any
of its samples is used, and splitting a tar into samples (blocks.py decodes them)."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from pathlib import Path

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from pipelines import storage
from pipelines.data.shards.format import RESTAGE_HINT
from pipelines.data.shards.manifest import ShardEntry, read_manifest
from pipelines.errors import PipelineError
from pipelines.storage import location


def verify_shards(shards_dir: str | Path, splits: Iterable[str], skippable: bool = True) -> None:
    """Check that every shard of `splits` is there with the size the manifest records, and
    raise PipelineError naming the first that is not. The driver calls this before it starts
    Ray or an MLflow run, so a missing or truncated shard fails in a second instead of inside
    a worker. It only stats the files: the loader checks each shard's SHA-256 as it reads it,
    so a large dataset is not read twice, and it lists the folder once rather than asking the
    store about each shard. skippable: the reader honours data.on_corrupt (say so)."""
    shards_dir = location(shards_dir)
    manifest = read_manifest(shards_dir)
    present = storage.sizes(shards_dir)
    for split in splits:
        for entry in manifest.shards(split):
            path = shards_dir / entry.name
            problem = _size_problem(present.get(entry.name), entry)
            if problem is not None:
                skip = " (or set data.on_corrupt: skip to skip it)" if skippable else ""
                raise PipelineError(f"shard {path} {problem}; {RESTAGE_HINT}{skip}")


_META = re.compile(r"__[^/]*__($|/)")


def _plain_tar_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """Regular files (name, bytes) of an in-memory ustar archive, or None for anything unusual.

    Python's tarfile spends most of the loader's time on per-member objects; our shards are
    plain ustar files (short names, regular members), and their bytes were already checked
    against the manifest's SHA-256, so reading the fixed-offset headers directly is enough
    (the header checksums are not summed again: at 2 bytes-sums per sample they were a tenth
    of the loader's time). Anything else (pax/GNU headers, links) returns None and takes
    tarfile's path.
    """
    files, pos, end = [], 0, len(data)
    while pos + 512 <= end:
        header = data[pos : pos + 512]
        if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0"):
            return files if header.count(0) == 512 else None
        name = header[:100].rstrip(b"\0").decode()
        prefix = header[345:500].rstrip(b"\0").decode()
        name = f"{prefix}/{name}" if prefix else name
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        pos += 512
        if pos + size > end:
            return None
        if not _META.match(name) and not (
            "/" not in name and name.startswith("__") and name.endswith("__")
        ):
            files.append((name, data[pos : pos + size]))
        pos += -(-size // 512) * 512
    return None


def _key_and_ext(name: str) -> tuple[str | None, str | None]:
    """WebDataset's base_plus_ext without its regex where the name is plain: the key is the
    name up to the first dot after its last slash."""
    start = name.rfind("/") + 1
    dot = name.find(".", start)
    if dot > start:
        return name[:dot], name[dot + 1 :]
    return base_plus_ext(name)


def _grouped(files: list[tuple[str, bytes]], url: str) -> list[dict]:
    """WebDataset's group_by_keys over our member list (same keys, lower-cased extensions,
    the same error on a repeated member), without its per-member dicts and checks."""
    samples: list[dict] = []
    current: dict | None = None
    for name, value in files:
        key, ext = _key_and_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if current is None or key != current["__key__"]:
            current = {"__key__": key, "__url__": url}
            samples.append(current)
        if ext in current:
            raise ValueError(f"{name}: duplicate file name in tar file {ext}")
        current[ext] = value
    return samples


def tar_grouped(tar: bytes, url: str) -> list[dict]:
    """An uncompressed tar's samples, each a dict of __key__ and its members' bytes by
    extension."""
    files = _plain_tar_members(tar)
    if files is None:
        return list(group_by_keys(tar_file_expander([{"url": url, "stream": io.BytesIO(tar)}])))
    return _grouped(files, url)


def _size_problem(size: int | None, entry: ShardEntry) -> str | None:
    if size is None:
        return "is missing"
    if size < entry.bytes:
        return f"is truncated at byte {size} of {entry.bytes}"
    if size > entry.bytes:
        return f"has {size} bytes but the manifest says {entry.bytes}"
    return None


def _shard_problem(url: str, data: bytes | None, entry: ShardEntry) -> str | None:
    problem = _size_problem(None if data is None else len(data), entry)
    if problem is not None:
        return problem
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        return "is corrupt (its SHA-256 differs from manifest.json)"
    return None


def read_verified(url: str, entry: ShardEntry) -> tuple[bytes, str | None]:
    """One whole shard's bytes (local or on a store), checked against its manifest entry's size
    and SHA-256: (bytes, None), or (b"", what is wrong with it)."""
    try:
        data = location(url).read_bytes()
    except FileNotFoundError:
        data = None
    except Exception as exc:  # noqa: BLE001 - local OSErrors and every store library's own
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0] or type(exc).__name__
        return b"", f"cannot be read ({why})"
    problem = _shard_problem(url, data, entry)
    return (b"", problem) if problem is not None else (data, None)
