"""The staged shard format, declared once: what staging writes and every reader checks."""

from __future__ import annotations

import re

FORMAT = "vae-pipeline-shards/1"  # manifest.json's "format"; a change of layout bumps it
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
SHARD_PATTERN = r"(train|val|test)-[0-9]{6}\.tar"  # names only: never a path
SHARD_NAME = re.compile(SHARD_PATTERN)
TAR_MTIME = 0  # fixed so the tar headers, hence the bytes, do not depend on when we ran
