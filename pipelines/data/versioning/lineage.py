"""Which data a model was trained on: the staged shards' manifest hash and DVC's hash."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from pipelines.data.shards.format import MANIFEST
from pipelines.data.versioning.dvc import default_remote_url
from pipelines.data.versioning.hashing import dvc_dir_md5, dvc_listing_md5
from pipelines.errors import PipelineError
from pipelines.storage import exists, is_remote, remote_errors


def require_manifest(shards_dir: Path) -> Path:
    manifest = shards_dir / MANIFEST
    if not (exists(manifest) if is_remote(manifest) else manifest.is_file()):
        raise PipelineError(
            f"no staged shards at {shards_dir} (manifest.json missing); run "
            "'vae-pipeline stage' or 'dvc pull' first"
        )
    return manifest


def manifest_sha256(shards_dir: Path) -> str:
    """Hash of manifest.json, which lists every shard's sha256: one id for the data version."""
    path = require_manifest(shards_dir)
    with remote_errors(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_dvc_md5(shards_dir: Path) -> str:
    """The md5 `dvc add` would give the folder, from its manifest alone (which records each
    shard's md5), for a folder that holds exactly the manifest and its shards: an object-store
    folder is not downloaded to name its version, and staging does not read back what it has
    just written (or kept) to name it."""
    path = require_manifest(shards_dir)
    with remote_errors(path):
        raw = path.read_bytes()
    manifest = json.loads(raw)
    files = [(e["name"], e["md5"]) for s in manifest["splits"].values() for e in s["shards"]]
    return dvc_listing_md5(
        [*files, (MANIFEST, hashlib.md5(raw, usedforsecurity=False).hexdigest())]
    )


def dvc_hash(root: Path, dvc_file: str = "data.dvc") -> str | None:
    """The md5 DVC records for the tracked shards folder, if the repo tracks one."""
    from pipelines.data.versioning.dvc import recorded_md5

    return recorded_md5(root / dvc_file)


def recorded_dvc_md5(root: Path, shards_dir: Path) -> tuple[Path, str | None] | None:
    """The .dvc file beside root or the shards that tracks exactly this shards folder, and the
    md5 it records; None when nothing tracks it (a scratch folder, another path)."""
    from pipelines.data.versioning.dvc import tracking_file

    try:
        dvc_file = tracking_file(root, shards_dir)
    except (yaml.YAMLError, OSError, AttributeError, TypeError) as exc:
        raise PipelineError(f"{root / 'data.dvc'} is not a readable .dvc file ({exc})") from exc
    return None if dvc_file is None else (dvc_file, dvc_hash(dvc_file.parent, dvc_file.name))


def data_version(root: Path, shards_dir: Path) -> dict[str, str | None]:
    """The data version of the shards actually used: their manifest's SHA-256 and the md5
    `dvc add` gives them, from the folder's listing (hashing the files only when it holds
    something the manifest does not list). When a .dvc file tracks this folder and
    records another md5, the shards are not the version git points at: an error, since every
    record made from them (MLflow tags, registered versions) would name the wrong data."""
    if is_remote(shards_dir):  # no .dvc file tracks an object-store folder
        return {
            "manifest_sha256": manifest_sha256(shards_dir),
            "dvc_md5": manifest_dvc_md5(shards_dir),
        }
    md5 = _listed_dvc_md5(shards_dir) or dvc_dir_md5(shards_dir)
    recorded = recorded_dvc_md5(root, shards_dir)
    if recorded is not None and recorded[1] != md5:
        dvc_file, want = recorded
        # Paths as DVC takes them from the folder of the .dvc file (data/shards, not shards).
        folder = os.path.relpath(shards_dir, dvc_file.parent)
        raise PipelineError(
            f"{shards_dir} (dvc md5 {md5[:12]}) is not the data version {dvc_file.name} "
            f"records ({str(want)[:12]}); run 'dvc checkout {dvc_file.name}' to get that "
            f"version back, or 'dvc add {folder}' to record these shards"
        )
    return {"manifest_sha256": manifest_sha256(shards_dir), "dvc_md5": md5}


def _listed_dvc_md5(shards_dir: Path) -> str | None:
    """The folder's `dvc add` md5 from its manifest, when the folder holds exactly the
    manifest and the shards it lists, each of the size it records (and the manifest records
    their md5s); None otherwise, and the files are hashed. A shard of the right size whose
    bytes changed is not another data version but a corrupt one, and the loader checks every
    shard's SHA-256 as it reads it: a run does not read 10^7 images once more to name them."""
    manifest = json.loads(require_manifest(shards_dir).read_bytes())
    entries = {e["name"]: e for s in manifest["splits"].values() for e in s["shards"]}
    files = {p.relative_to(shards_dir).as_posix(): p for p in shards_dir.rglob("*") if p.is_file()}
    if files.keys() != {*entries, MANIFEST}:
        return None
    for name, entry in entries.items():
        if "md5" not in entry or files[name].stat().st_size != entry["bytes"]:
            return None
    return manifest_dvc_md5(shards_dir)


def require_trained_on(shards_dir: Path, trained: dict | None, what: str) -> None:
    """Refuse to score or register a model on shards other than those it was trained on: a
    re-staged split would put its own training examples into the test split."""
    want = (trained or {}).get("manifest_sha256")
    have = manifest_sha256(shards_dir)
    if want != have:
        raise PipelineError(
            f"{what} was trained on data version {str(want)[:12]} but {shards_dir} holds "
            f"{have[:12]}; train on these shards ('vae-pipeline train'), or bring back the "
            "shards it used ('dvc checkout' of the data.dvc it was trained with)"
        )


def dvc_record(root: Path, shards_dir: Path) -> dict[str, str]:
    """Where DVC keeps these shards, for lineage records: the .dvc file that tracks them and
    the default remote `dvc pull` fetches them from (as written: mask it before logging it).
    Empty when DVC does not track them."""
    if is_remote(shards_dir):
        return {}
    try:
        recorded = recorded_dvc_md5(root, shards_dir)
    except PipelineError:
        return {}  # data_version has said so already; this record is only informative
    if recorded is None:
        return {}
    dvc_file = recorded[0]
    out = {"dvc_file": dvc_file.name}
    if remote := default_remote_url(dvc_file.parent):
        out["dvc_remote"] = remote
    return out
