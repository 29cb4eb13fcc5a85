"""File hashing, one helper for every file the pipeline hashes, and the hash `dvc add` gives a
folder, from DVC's own hashing library (so the data version is known without running `dvc`)."""

from __future__ import annotations

import hashlib
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
    """The hash `dvc add` records for a folder, computed by DVC's own tree builder (dvc_data's
    `build`) with an in-memory object store: no repo and no cache needed, nothing written."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem, MemoryFileSystem

    staging = HashFileDB(MemoryFileSystem(), "/staging")
    _, _, tree = build(staging, str(folder.resolve()), LocalFileSystem(), "md5", dry_run=True)
    return tree.hash_info.value


def dvc_listing_md5(files: list[tuple[str, str]]) -> str:
    """The `dvc add` hash of a folder from its (relative path, md5) pairs, by DVC's own `Tree`:
    a folder on object storage, or one just staged, is named without reading its files."""
    from dvc_data.hashfile.tree import Tree

    tree = Tree.from_list([{"md5": md5, "relpath": rel} for rel, md5 in files], hash_name="md5")
    tree.digest()
    return tree.hash_info.value
