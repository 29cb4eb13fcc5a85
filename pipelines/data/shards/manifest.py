"""manifest.json: its schema, which everything that reads shards checks, and reading a folder's
manifest checked against it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.data.shards.format import (
    FACTORS_MEMBER,
    FORMAT,
    LEGACY_FORMATS,
    MANIFEST,
    RESTAGE_HINT,
    SHARD_PATTERN,
    SPLITS,
)
from pipelines.data.sources.base import Source
from pipelines.data.versioning.lineage import require_manifest
from pipelines.errors import PipelineError
from pipelines.params import DataParams
from pipelines.storage import location, remote_errors


# The schema of everything the loader, train, evaluate, register and embed
# read from it. Strict: JSON gives exact types, so "3" or 3.0 where an int belongs is damage.
# Extra fields are allowed (informational ones like normalisation, and later additions).
class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


Count = Annotated[int, Field(ge=0)]


class ShardEntry(_Part):
    name: Annotated[str, Field(pattern=f"^{SHARD_PATTERN}$")]  # no paths
    samples: Count
    bytes: Count
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    md5: str | None = None  # what DVC names the file by (manifests before it lack it)


class SplitEntry(_Part):
    samples: Count
    shards: list[ShardEntry]

    @model_validator(mode="after")
    def _counts_add_up(self) -> SplitEntry:
        if self.samples != sum(e.samples for e in self.shards):
            raise ValueError("samples is not the sum of its shards' samples")
        return self


class Splits(_Part):
    train: SplitEntry
    val: SplitEntry
    test: SplitEntry


class SampleSpec(_Part):
    shape: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=3, max_length=3)]
    dtype: Literal["float32", "uint8"]


class EncodingSpec(_Part):
    shards: Literal["tar.gz"]
    npy_dtype: Literal["float32", "uint8"]
    # An int stays an int: the manifest's bytes (hence its DVC hash) must not change on a
    # round trip through this model.
    divide_by: Annotated[int | float, Field(gt=0)]


class SourceSpec(_Part):
    name: str
    version: str


class SplitRule(_Part):
    rule: Literal["key_hash", "official"] = "key_hash"
    val_fraction: Annotated[float, Field(ge=0, lt=1)]
    test_fraction: Annotated[float, Field(ge=0, lt=1)]


class LabelsSpec(_Part):
    present: bool
    classes: list[str] | None = None


class Manifest(_Part):
    format: Literal["vae-pipeline-shards/2"]
    source: SourceSpec
    sample: SampleSpec
    encoding: EncodingSpec
    split: SplitRule
    splits: Splits
    labels: LabelsSpec | None = None
    factors: dict[str, Any] | None = None  # the source's generative factors, where it has them
    normalisation: dict[str, Any] | None = None  # informational: range, scaling, train stats
    content: dict[str, Any] | None = None  # what an append checks (staging's digests)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.sample.shape)  # type: ignore[return-value]

    @property
    def classes(self) -> list[str] | None:
        return None if self.labels is None else self.labels.classes

    def split_of(self, split: str) -> SplitEntry:
        if split not in SPLITS:
            raise PipelineError(f"split {split!r} is not in the manifest (it has {list(SPLITS)})")
        return getattr(self.splits, split)

    def shards(self, split: str) -> list[ShardEntry]:
        return self.split_of(split).shards

    def to_json(self) -> str:
        """The bytes staging writes: only what was given (defaults are not written), keys
        sorted, so the same staging gives the same bytes, hence the same DVC hash."""
        data = self.model_dump(mode="json", exclude_unset=True)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _schema_problem(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    if err["type"] == "missing":
        return f"lacks the field {field}"
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if not field:
        return f"is not a {FORMAT} manifest ({err['msg']}; got {got})"
    return f"has a bad field {field} ({err['msg']}; got {got})"


def read_manifest(shards_dir: str | Path) -> Manifest:
    """manifest.json of a staged shards folder, checked against the schema above (ours, and
    whole): a manifest lacking a field fails here with one line, not deep in a worker."""
    path = require_manifest(location(shards_dir))
    try:
        with remote_errors(path):
            raw = path.read_bytes()
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}); {RESTAGE_HINT}") from exc
    try:
        return Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise PipelineError(f"{path} {_schema_problem(exc)}; {RESTAGE_HINT}") from None


def _split_record(d) -> dict:
    if d.split == "official":
        return {
            "rule": "official",
            "method": "the source's official test part is test; sha256(key) as a fraction of "
            "2**64 below val_fraction takes the rest to val",
            "val_fraction": d.val_fraction, "test_fraction": d.test_fraction,
        }  # fmt: skip
    return {
        "method": "sha256(key) as a fraction of 2**64: [0, test) test, [test, test+val) val",
        "val_fraction": d.val_fraction, "test_fraction": d.test_fraction,
    }  # fmt: skip


def build_manifest(
    src: Source, d: DataParams, splits: dict[str, list[dict]], stats: dict, content: dict
) -> Manifest:
    fields = {"npy": f"image, {src.dtype} (C, H, W) .npy; divide by {src.divide_by:g}"}
    if src.factors is not None:
        fields[FACTORS_MEMBER] = "generative factor indices, int64 .npy (see factors)"
    return Manifest.model_validate({
        "format": FORMAT,
        # File name only: an absolute path would make the manifest differ between machines.
        "source": {"name": src.name, "version": src.version, "file": src.file},
        "sample": {
            "shape": list(src.shape),
            "dtype": src.dtype,
            "layout": "CHW",
            "fields": fields | ({"cls": "label, ascii int"} if src.has_labels else {}),
        },
        "encoding": {
            "shards": "tar.gz",
            "npy_dtype": src.dtype,
            "divide_by": src.divide_by,  # x = stored / divide_by lies in [0, 1]
        },
        "labels": {"present": src.has_labels, "classes": src.classes},
        "factors": src.factors,
        "normalisation": {
            "range": [0.0, 1.0],
            "scaling": src.scaling,
            "binarized": d.binarize,
        }
        | stats,
        "split": _split_record(d),
        # What incremental staging checks: the settings that shape the shards and each shard's
        # digest of its samples, generation by generation (the appends), hash to `sha256`
        # (scheme 2: pipelines/data/staging_pass.py).
        "content": content,
        "splits": {
            s: {"samples": sum(e["samples"] for e in entries), "shards": entries}
            for s, entries in splits.items()
        },
    })  # fmt: skip


def our_manifest(path: Path) -> dict | None:
    """manifest.json when it is one staging wrote (our format), else None."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    ok = isinstance(manifest, dict) and manifest.get("format") in (FORMAT, *LEGACY_FORMATS)
    return manifest if ok else None


def listed_shards(manifest: dict | None) -> set[str]:
    """The shard names a manifest of ours lists: what staging may replace or delete."""
    if manifest is None:
        return set()
    splits = manifest.get("splits")
    return {
        str(e.get("name"))
        for s in (splits.values() if isinstance(splits, dict) else ())
        if isinstance(s, dict)
        for e in s.get("shards", [])
        if isinstance(e, dict)
    }


def written_by_stage(folder: Path) -> Callable[[Path], bool]:
    """Which entries of a shards folder staging wrote: its manifest and the shards that
    manifest lists. A file named like a shard but listed nowhere is someone else's (a copy, or
    another tool's output) and is never replaced."""
    manifest = our_manifest(folder / MANIFEST)
    listed = listed_shards(manifest)

    def ours(entry: Path) -> bool:
        if not entry.is_file():
            return False
        return entry.name in listed or (entry.name == MANIFEST and manifest is not None)

    return ours
