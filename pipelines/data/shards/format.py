"""The staged shard format, declared once: what staging writes and every reader checks."""

from __future__ import annotations

import re

# manifest.json's "format"; a change of layout bumps it. /2: gzip-compressed tar shards holding
# each sample in its native type (uint8 or float32 .npy), cut by bytes, appendable.
FORMAT = "vae-pipeline-shards/2"
LEGACY_FORMATS = ("vae-pipeline-shards/1",)  # folders staging may replace (never reads)
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
RESTAGE_HINT = "re-run 'vae-pipeline stage' or 'dvc pull'"  # what to do about a bad shard
SHARD_PATTERN = r"(train|val|test)-[0-9]{6}\.tar\.gz"  # names only: never a path
# Staging replaces folders of this or an older format; readers accept only SHARD_PATTERN.
SHARD_NAME = re.compile(r"(train|val|test)-[0-9]{6}\.tar(\.gz)?")
# In an object-store prefix: the shards a staging (or one of its tasks) is uploading before
# its manifest lists them (an object store has no rename to publish a folder at once). A
# staging cut off leaves shards only a claim names; the next one knows them as its own.
CLAIMS_NAME = re.compile(r"staging-claims(-[0-9]+)?\.json")


def claims_name(task: int | None = None) -> str:
    return "staging-claims.json" if task is None else f"staging-claims-{task}.json"


FACTORS_MEMBER = "factors.npy"  # a sample's generative factors, where the source has them
TAR_MTIME = 0  # fixed so the tar headers, hence the bytes, do not depend on when we ran


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar.gz"
