"""Which data a model was trained on: the staged shards' manifest hash and DVC's hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from pipelines.errors import PipelineError


def require_manifest(shards_dir: Path) -> Path:
    manifest = shards_dir / "manifest.json"
    if not manifest.is_file():
        raise PipelineError(
            f"no staged shards at {shards_dir} (manifest.json missing); run "
            "'vae-pipeline stage' or 'dvc pull' first"
        )
    return manifest


def manifest_sha256(shards_dir: Path) -> str:
    """Hash of manifest.json, which lists every shard's sha256: one id for the data version."""
    return hashlib.sha256(require_manifest(shards_dir).read_bytes()).hexdigest()


def dvc_hash(root: Path, dvc_file: str = "data.dvc") -> str | None:
    """The md5 DVC records for the tracked shards folder, if the repo tracks one."""
    path = root / dvc_file
    if not path.is_file():
        return None
    try:
        outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    except yaml.YAMLError:
        return None
    return outs[0].get("md5") if outs else None


def data_version(root: Path, shards_dir: Path) -> dict[str, str | None]:
    return {"manifest_sha256": manifest_sha256(shards_dir), "dvc_md5": dvc_hash(root)}
