"""File hashing, one helper for every file the pipeline hashes, and the hash `dvc add` gives a
folder (so the data version is known without running DVC)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_hash(path: Path, algorithm: str = "sha256") -> str:
    return file_hashes(path, algorithm)[0]


def file_hashes(path: Path, *algorithms: str) -> list[str]:
    """Hex digests of one file under several algorithms, reading it once."""
    hashes = [hashlib.new(a, usedforsecurity=False) for a in algorithms]
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            for h in hashes:
                h.update(chunk)
    return [h.hexdigest() for h in hashes]


def dvc_dir_md5(folder: Path) -> str:
    """The hash `dvc add` records for a folder: MD5 of its sorted JSON listing of file MD5s."""
    files = [
        (rel, file_hash(p, "md5"))
        for rel, p in sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*"))
        if p.is_file()
    ]
    return dvc_listing_md5(files)


def dvc_listing_md5(files: list[tuple[str, str]]) -> str:
    """The `dvc add` hash of a folder from its (relative path, md5) pairs."""
    entries = [{"md5": md5, "relpath": rel} for rel, md5 in sorted(files)]
    listing = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(listing, usedforsecurity=False).hexdigest() + ".dir"
