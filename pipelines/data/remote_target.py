"""An object-store prefix as a staging target: what staging may replace there (its manifest's
shards and its claims), and uploading each new shard as soon as it is written, claimed first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from pipelines import storage
from pipelines.data.shards.format import (
    CLAIMS_NAME,
    MANIFEST,
    claims_name,
)
from pipelines.data.shards.manifest import (
    listed_shards,
    our_manifest,
)
from pipelines.errors import PipelineError
from pipelines.storage import remote_errors


class Uploader:
    """A written shard -> the object store, then off the local disk: staging needs local room
    for the shards open at once (at most MAX_OPEN per split), not for every new shard. taken
    grows with each name sent, so a rebuild after a failed append numbers past them too."""

    def __init__(self, target, taken, progress: bool) -> None:
        self.target, self.taken = target, list(taken)
        self.bar = tqdm(
            desc="upload", unit="B", unit_scale=True, file=sys.stderr, disable=not progress
        )

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def __call__(self, path: Path) -> None:
        size = path.stat().st_size
        self.taken.append(path.name)  # before the PUT: a cut-off one may have landed
        with remote_errors(str(self.target)):
            # The claim first: a staging cut off after this PUT leaves a shard no manifest
            # lists, and the next staging must know it is ours to remove, not a stranger's.
            (self.target / claims_name()).write_text(json.dumps(sorted(self.taken)))
            storage.upload(path, self.target / path.name)
        path.unlink()
        self.bar.update(size)


def no_copy(name: str, tmp: Path) -> None:
    """Kept shards stay where they are in the object store."""


def check_remote_target(target) -> tuple[str, ...]:
    """Like check_replaceable_dir for a folder: the prefix may hold only our manifest, the
    shards it lists, and shards an earlier staging claimed before it stopped. Returns those
    shard names, which new shards must not take."""
    if not storage.exists(target):
        return ()
    manifest = our_manifest(target / MANIFEST) if storage.exists(target / MANIFEST) else None
    objects = list(target.iterdir())  # one listing: at 10^5 shards each is many LIST pages
    claims = [obj for obj in objects if CLAIMS_NAME.fullmatch(obj.name)]
    ours = listed_shards(manifest) | _claimed(claims)
    names = []
    for obj in objects:
        claim = CLAIMS_NAME.fullmatch(obj.name) is not None
        known = obj.name in ours or claim
        if not (known or (obj.name == MANIFEST and manifest is not None)):
            raise PipelineError(
                f"data.shards_dir: {target} holds {obj.name}, which staging did not write (no "
                "manifest.json of ours lists it); it stages only into an empty prefix or one of "
                "its own: move that object or choose another prefix"
            )
        if known and not claim:
            names.append(obj.name)
    return tuple(names)


def _claimed(claims) -> set[str]:
    """Shard names the claim objects hold (see CLAIMS_NAME)."""
    names: set[str] = set()
    for obj in claims:
        try:
            listed = json.loads(obj.read_text())
        except (OSError, ValueError):
            continue
        names |= {str(n) for n in listed} if isinstance(listed, list) else set()
    return names
