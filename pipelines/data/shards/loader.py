"""Stream staged shards to training and evaluation, in one process or on one DDP rank.

The policy, per split and epoch:

- Ranks: shards are assigned to ranks from the manifest alone (largest shard first to the rank
  holding the fewest samples), so each rank knows its share without talking to the others.
  Loader workers of a rank then take every k-th of its shards.
- Equal batch counts: every rank yields exactly `batches_per_epoch(...)` batches, the number
  the fullest rank needs for one pass. A rank with fewer samples starts another pass over its
  own shards (reshuffled) to fill the gap, so a DDP step never waits on a rank that ran out.
  Every sample is seen at least once per epoch; a few are seen twice on the smaller ranks.
- One process (world_size 1), or equalize=False: exactly one pass over the rank's own shards,
  every sample once (across ranks: the union is the split, each sample on one rank), the last
  batch may be short. That is what evaluation needs; with equalize=False batch counts may differ
  between ranks, so run no per-batch collective over such a loader.
- Integrity: each shard is read whole and its size and SHA-256 are checked against the manifest
  before any of its samples is used. A truncated or corrupt shard raises PipelineError naming it;
  with on_corrupt="skip" it is skipped whole, logged, and listed in `loader.skipped`.
- Memory: one shard per loader worker plus the shuffle buffer, whatever the dataset's size.
- Where: shards are read by path from a local folder or an object store (s3://...), alike.

The pipeline is WebDataset's (`wds.DataPipeline`, `wds.shuffle` of the shard list,
`wds.split_by_worker`, its tar expander where a shard is unusual) around our own steps where
the policy above needs them: ranks get shards by
sample count rather than wds.split_by_node's round robin (equal work per rank), corrupt shards
travel as markers so they are reported at once rather than after a shuffle buffer, batches are
re-cut in the main process to exact, equal counts (what wds.with_epoch approximates per worker),
and plain ustar shards are parsed by a small reader that agrees with tarfile (tested) at 3x its
speed (benchmarks/loader_throughput.py).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import webdataset as wds
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipelines import storage
from pipelines.data.shards.assignment import assign_shards, batches_per_epoch, split_shards
from pipelines.data.shards.format import FACTORS_MEMBER, FORMAT, SHARD_PATTERN
from pipelines.data.versioning.lineage import require_manifest
from pipelines.errors import PipelineError
from pipelines.params import Params
from pipelines.storage import location, remote_errors

log = logging.getLogger(__name__)

_CORRUPT = "__corrupt__"  # marker item: (shard path, what is wrong), sent on to the main process
_FIX = "re-run 'vae-pipeline stage' or 'dvc pull'"


# -- manifest.json: the schema of everything the loader, train, evaluate, register and embed
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
    divide_by: Annotated[float, Field(gt=0)]


class SourceSpec(_Part):
    name: str
    version: str


class SplitRule(_Part):
    rule: Literal["key_hash", "official"] = "key_hash"
    val_fraction: Annotated[float, Field(ge=0, lt=1)]
    test_fraction: Annotated[float, Field(ge=0, lt=1)]


class Manifest(_Part):
    format: Literal["vae-pipeline-shards/2"]
    source: SourceSpec
    sample: SampleSpec
    encoding: EncodingSpec
    split: SplitRule
    splits: Splits


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


def read_manifest(shards_dir: str | Path) -> dict:
    """manifest.json of a staged shards folder, checked against the schema above (ours, and
    whole): a manifest lacking a field fails here with one line, not deep in a worker."""
    path = require_manifest(location(shards_dir))
    try:
        with remote_errors(path):
            raw = path.read_bytes()
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}); {_FIX}") from exc
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise PipelineError(f"{path} {_schema_problem(exc)}; {_FIX}") from None
    return manifest


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
        for entry in split_shards(manifest, split):
            path = shards_dir / entry["name"]
            problem = _size_problem(present.get(entry["name"]), entry)
            if problem is not None:
                skip = " (or set data.on_corrupt: skip to skip it)" if skippable else ""
                raise PipelineError(f"shard {path} {problem}; {_FIX}{skip}")


# -- pipeline stages (module level so loader workers can unpickle them) -------------------------


def _worker_id() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _take_shards(src: Iterable[dict], keep: frozenset[str]) -> Iterator[dict]:
    """Node splitting: keep this rank's shards (from assign_shards), drop the others."""
    return (item for item in src if item["url"] in keep)


_META = re.compile(r"__[^/]*__($|/)")


def _plain_tar_members(data: bytes, url: str) -> list[dict] | None:
    """Regular files of an in-memory ustar archive, or None for anything unusual.

    Python's tarfile spends most of the loader's time on per-member objects; our shards are
    plain ustar files (short names, regular members), and their bytes were already checked
    against the manifest's SHA-256, so reading the fixed-offset headers directly is enough.
    Anything else (pax/GNU headers, links, bad checksums) returns None and takes tarfile's path.
    """
    files, pos, end = [], 0, len(data)
    while pos + 512 <= end:
        header = data[pos : pos + 512]
        if header.count(0) == 512:
            return files
        if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0"):
            return None
        stored = int(header[148:156].strip(b"\0 ") or b"0", 8)
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            return None
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
            files.append({"fname": name, "data": data[pos : pos + size], "__url__": url})
        pos += -(-size // 512) * 512
    return None


def tar_samples(data: bytes, url: str) -> list[dict]:
    """A gzip'd shard's samples, each a dict of __key__ and its members' bytes by extension."""
    data = gzip.decompress(data)
    files = _plain_tar_members(data, url)
    if files is None:
        files = tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
    return list(group_by_keys(files))


def _size_problem(size: int | None, entry: dict) -> str | None:
    if size is None:
        return "is missing"
    if size < entry["bytes"]:
        return f"is truncated at byte {size} of {entry['bytes']}"
    if size > entry["bytes"]:
        return f"has {size} bytes but the manifest says {entry['bytes']}"
    return None


def _shard_problem(url: str, data: bytes | None, entry: dict) -> str | None:
    problem = _size_problem(None if data is None else len(data), entry)
    if problem is not None:
        return problem
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return "is corrupt (its SHA-256 differs from manifest.json)"
    return None


def _samples_or_problem(url: str, data: bytes | None, entry: dict) -> tuple[list[dict], str | None]:
    """A whole shard's samples after checking it against its manifest entry (size, SHA-256,
    a readable tar, the sample count), or what is wrong with it."""
    problem = _shard_problem(url, data, entry)
    if problem is not None:
        return [], problem
    try:
        samples = tar_samples(data, url)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a bad shard
        return [], f"is not a readable tar file ({str(exc).splitlines()[0]})"
    if len(samples) != entry["samples"]:
        return [], f"holds {len(samples)} samples but the manifest says {entry['samples']}"
    return samples, None


def _read_checked(url: str, entry: dict) -> tuple[list[dict], str | None]:
    """Read one whole shard (local or on a store) and check it: its samples, or the problem."""
    try:
        data = location(url).read_bytes()
    except FileNotFoundError:
        data = None
    except Exception as exc:  # noqa: BLE001 - local OSErrors and every store library's own
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0] or type(exc).__name__
        return [], f"cannot be read ({why})"
    return _samples_or_problem(url, data, entry)


def read_stored_samples(
    url: str, entry: dict, shape: tuple[int, ...], dtype: str
) -> Iterator[tuple[str, np.ndarray, int | None]]:
    """(key, image as stored, label or None) of every sample of one whole shard, read and
    checked as the loader does (shard and samples); PipelineError naming the shard or sample
    otherwise. For readers outside this loader (embed's Ray tasks)."""
    samples, problem = _read_checked(url, entry)
    if problem is not None:
        raise PipelineError(f"shard {url} {problem}; {_FIX}")
    decode = _npy_decoder(shape, dtype)
    for item in samples:
        try:
            x, label = _stored_sample(item, decode, shape, dtype)
        except _BAD_SAMPLE as exc:
            raise PipelineError(
                f"shard {url} has a bad sample {item['__key__']} ({exc}); {_FIX}"
            ) from exc
        yield item["__key__"], x, label


def shard_batches(
    url: str, entry: dict, manifest: dict, batch_size: int, factors: bool = False
) -> Iterator[dict]:
    """One whole shard, read and checked as the loader does, in batches of its samples in
    stored order, decoded as the loader's batches are ({"x", "key", "label", "factors"}): what
    a Ray task scoring one shard iterates. A bad shard or sample is a PipelineError naming it."""
    samples, problem = _read_checked(url, entry)
    if problem is not None:
        raise PipelineError(f"shard {url} {problem}; {_FIX}")
    shape = tuple(manifest["sample"]["shape"])
    for batch in _batch(_decode(samples, shape, manifest["encoding"], factors), batch_size):
        if batch["x"] is None:  # a bad sample: the loader's marker, here an error
            raise PipelineError(f"shard {url} {batch['corrupt'][1]}; {_FIX}")
        yield batch


def _read_shards(src: Iterable[dict], expected: dict[str, dict]) -> Iterator[dict]:
    """Whole, verified shards only: problems travel on as markers, never as partial shards."""
    for item in src:
        url = item["url"]
        samples, problem = _read_checked(url, expected[url])
        if problem is not None:
            yield {_CORRUPT: (url, problem)}
            continue
        yield from samples


def _shuffle_samples(src: Iterable[dict], bufsize: int, seed: str) -> Iterator[dict]:
    rng = random.Random(f"{seed}-worker{_worker_id()[0]}")
    buf: list[dict] = []
    for item in src:
        if _CORRUPT in item:
            yield item  # report at once, not after a buffer's worth of samples
            continue
        buf.append(item)
        if len(buf) >= bufsize:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _npy_decoder(shape: tuple[int, ...], dtype: str):
    """Decode .npy payloads of one dtype; every sample of a split shares one header, so after
    the first full np.load the rest are a header compare plus np.frombuffer (np.load parses the
    header with ast.literal_eval, which dominated the loader's time)."""
    header: bytes | None = None
    nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))

    def decode(raw: bytes) -> np.ndarray:
        nonlocal header
        if header is not None and len(raw) == len(header) + nbytes and raw.startswith(header):
            return np.frombuffer(raw, dtype=dtype, offset=len(header)).reshape(shape)
        x = np.load(io.BytesIO(raw), allow_pickle=False)
        if x.dtype == dtype and x.shape == shape and x.flags.c_contiguous:
            header = raw[: len(raw) - nbytes]
        return x

    return decode


_BAD_SAMPLE = (KeyError, ValueError, OSError)  # what a sample that cannot be decoded raises


def _stored_sample(item: dict, decode, shape: tuple[int, ...], dtype: str):
    """A sample's image as stored (dtype and shape checked) and its label (None if it has none)."""
    x = decode(item["npy"])
    if x.dtype != dtype or x.shape != shape:
        raise ValueError(f"{x.dtype} {x.shape}, manifest says {dtype} {shape}")
    return x, int(item["cls"]) if "cls" in item else None


def _decode(
    src: Iterable[dict], shape: tuple[int, ...], encoding: dict, factors: bool = False
) -> Iterator[dict]:
    """Stored samples -> float32 in [0, 1] (uint8 shards are scaled here, not on disk); with
    factors, each sample's generative factors too (a sample without them is a bad sample)."""
    dtype = encoding["npy_dtype"]
    decode = _npy_decoder(shape, dtype)
    scale = np.float32(1.0 / encoding["divide_by"])
    for item in src:
        if _CORRUPT in item:
            yield item
            continue
        try:
            x, label = _stored_sample(item, decode, shape, dtype)
            f = np.load(io.BytesIO(item[FACTORS_MEMBER]), allow_pickle=False) if factors else None
        except _BAD_SAMPLE as exc:
            yield {_CORRUPT: (item["__url__"], f"has a bad sample {item['__key__']} ({exc})")}
            continue
        x = x.copy() if dtype == "float32" and scale == 1 else x.astype(np.float32) * scale
        yield {"x": torch.from_numpy(x), "key": item["__key__"], "label": label, "factors": f}


def _collate(items: list[dict]) -> dict:
    labels = [it["label"] for it in items]
    factors = [it["factors"] for it in items]
    return {
        "x": torch.stack([it["x"] for it in items]),
        "key": [it["key"] for it in items],
        "label": None if labels[0] is None else torch.tensor(labels, dtype=torch.long),
        "factors": None if factors[0] is None else np.stack(factors),
    }


def _batch(src: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Batches in the worker (cheap transfer); the main process re-cuts them to exact sizes."""
    items: list[dict] = []
    for item in src:
        if _CORRUPT in item:
            yield {"x": None, "corrupt": item[_CORRUPT]}
            continue
        items.append(item)
        if len(items) == batch_size:
            yield _collate(items)
            items = []
    if items:
        yield _collate(items)


def _as_is(item: Any) -> Any:
    return item


class _Pending:
    """Samples received but not yet yielded, re-cut into batches of exact size."""

    def __init__(self) -> None:
        self.chunks: list[dict] = []
        self.size = 0

    def add(self, chunk: dict) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk["key"])

    def take(self, n: int) -> dict:
        parts, need = [], n
        while need:
            chunk = self.chunks[0]
            k = len(chunk["key"])
            if k <= need:
                parts.append(self.chunks.pop(0))
                need -= k
            else:
                parts.append({key: _head(v, need) for key, v in chunk.items()})
                self.chunks[0] = {key: _tail(v, need) for key, v in chunk.items()}
                need = 0
        self.size -= n
        if len(parts) == 1:
            return parts[0]
        labels, factors = [p["label"] for p in parts], [p["factors"] for p in parts]
        return {
            "x": torch.cat([p["x"] for p in parts]),
            "key": [k for p in parts for k in p["key"]],
            "label": None if labels[0] is None else torch.cat(labels),
            "factors": None if factors[0] is None else np.concatenate(factors),
        }


def _head(v: Any, n: int) -> Any:
    return None if v is None else v[:n]


def _tail(v: Any, n: int) -> Any:
    return None if v is None else v[n:]


@dataclass(frozen=True)
class LoaderOptions:
    """How one rank reads a split: its place among the DDP ranks, shuffling, corrupt shards."""

    rank: int = 0
    world_size: int = 1
    num_workers: int = 0  # DataLoader worker processes
    epoch: int = 0  # with seed: the shuffle order
    seed: int = 0
    shuffle: bool = True
    on_corrupt: Literal["raise", "skip"] = "raise"
    shuffle_buffer: int = 1000  # samples held for shuffling, per loader worker
    # Every rank yields the same number of batches (DDP waits on each rank's gradients).
    equalize: bool = True
    factors: bool = False  # batches carry the samples' generative factors (sprites' MIG)
    # Every rank's batch size, where ranks take unequal shares of a global batch (elastic
    # training): equal batch counts are then counted with each rank's own size.
    batch_sizes: tuple[int, ...] | None = None


class ShardLoader:
    """Batches {"x": (B, C, H, W) float32, "key": [str], "label": (B,) int64 or None,
    "factors": (B, F) int64 array with options.factors, else None}.

    `len(loader)` is the number of batches this rank yields per epoch: the same on every rank
    unless equalize=False (see the module notes).
    `loader.skipped` lists shards skipped as corrupt (on_corrupt="skip") during the last pass.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        split: str,
        batch_size: int,
        options: LoaderOptions | None = None,
        manifest: dict | None = None,
    ) -> None:
        o = options or LoaderOptions()
        rank, world_size, num_workers, on_corrupt = (
            o.rank,
            o.world_size,
            o.num_workers,
            o.on_corrupt,
        )
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise PipelineError(
                f"loader needs batch_size >= 1, 0 <= rank < world_size, num_workers >= 0 "
                f"(got {batch_size}, rank {rank}, world_size {world_size}, {num_workers})"
            )
        if on_corrupt not in ("raise", "skip"):
            raise PipelineError(f"on_corrupt must be 'raise' or 'skip', not {on_corrupt!r}")
        self.shards_dir = location(shards_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.shards_dir)
        self.split, self.batch_size = split, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.seed, self.shuffle = o.epoch, o.seed, o.shuffle
        self.on_corrupt, self.shuffle_buffer = on_corrupt, o.shuffle_buffer
        self.factors = o.factors
        entries = split_shards(self.manifest, split)
        if not entries:
            raise PipelineError(
                f"split {split} in {self.shards_dir} is empty; re-stage with more data or a "
                "larger data.val_fraction / data.test_fraction for that split"
            )
        plan = assign_shards([e["samples"] for e in entries], world_size)
        self.shards = [entries[i] for i in plan[rank]]
        workers = max(1, num_workers)
        if len(self.shards) < workers:
            raise PipelineError(
                f"split {split} has {len(entries)} shards, so rank {rank} of {world_size} gets "
                f"{len(self.shards)}, fewer than its {workers} loader worker(s); re-stage with "
                f"data.min_shards_per_split >= {world_size * workers} or use fewer workers"
            )
        # Filling passes only where another rank may be waiting for our batches.
        self.equalize = o.equalize and world_size > 1
        if self.equalize:
            sizes = o.batch_sizes or batch_size
            self.num_batches = batches_per_epoch(self.manifest, split, sizes, world_size)
        else:
            self.num_batches = -(-sum(e["samples"] for e in self.shards) // batch_size)
        self.shape = tuple(self.manifest["sample"]["shape"])
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return self.num_batches

    def _pipeline(self, pass_index: int) -> wds.DataPipeline:
        paths = {str(self.shards_dir / e["name"]): e for e in self.shards}
        seed = f"{self.seed}-{self.epoch}-{self.rank}-{pass_index}"
        urls = [str(self.shards_dir / e["name"]) for e in split_shards(self.manifest, self.split)]
        stages: list[Any] = [
            wds.SimpleShardList(urls),
            partial(_take_shards, keep=frozenset(paths)),
        ]
        if self.shuffle:  # the whole list at once; the same seed in every worker of a rank
            # keeps the workers' slices disjoint
            stages.append(wds.shuffle(len(paths), initial=len(paths), seed=seed))
        stages += [wds.split_by_worker, partial(_read_shards, expected=paths)]
        if self.shuffle:
            stages.append(partial(_shuffle_samples, bufsize=self.shuffle_buffer, seed=seed))
        decode = partial(
            _decode, shape=self.shape, encoding=self.manifest["encoding"], factors=self.factors
        )
        stages += [decode, partial(_batch, batch_size=self.batch_size)]
        return wds.DataPipeline(*stages)

    def _chunks(self, pass_index: int) -> Iterator[dict]:
        pipeline = self._pipeline(pass_index)
        if self.num_workers == 0:
            yield from pipeline
            return
        loader = wds.WebLoader(
            pipeline, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is
        )
        yield from loader

    def _note_corrupt(self, path: str, problem: str) -> None:
        if self.on_corrupt == "raise":
            raise PipelineError(
                f"shard {path} {problem}; {_FIX} (or set data.on_corrupt: skip to skip it)"
            )
        if path not in self.skipped:
            self.skipped.append(path)
            log.warning(
                "skipped shard %s: it %s (%d corrupt shard(s) skipped in split %s, rank %d)",
                path,
                problem,
                len(self.skipped),
                self.split,
                self.rank,
            )

    def __iter__(self) -> Iterator[dict]:
        self.skipped = []
        target, produced, pass_index = self.num_batches, 0, 0
        pending = _Pending()
        while produced < target:
            got = 0
            chunks = self._chunks(pass_index)
            try:
                for chunk in chunks:
                    if chunk["x"] is None:
                        self._note_corrupt(*chunk["corrupt"])
                        continue
                    got += len(chunk["key"])
                    pending.add(chunk)
                    while pending.size >= self.batch_size and produced < target:
                        yield pending.take(self.batch_size)
                        produced += 1
                    if produced == target:
                        break
            finally:
                chunks.close()  # stops loader workers when a filling pass ends early
            pass_index += 1
            last_one = not self.equalize or produced == target - 1
            if pending.size and produced < target and last_one:
                yield pending.take(pending.size)
                produced += 1
            if got == 0 and produced < target:
                raise PipelineError(
                    f"rank {self.rank} read no samples from its {len(self.shards)} shard(s) of "
                    f"split {self.split} ({len(self.skipped)} skipped as corrupt); {_FIX}"
                )
            if not self.equalize:
                break  # nobody waits on us: one pass, no sample repeated


def fixed_order_loader(params: Params, split: str, factors: bool = False) -> ShardLoader:
    """One split of data.shards_dir in a fixed order, every sample once, a corrupt shard an
    error: what evaluate and the registry's gate score models on."""
    from pipelines.paths import shards_dir

    return make_loader(
        shards_dir(params), split, params.evaluate.batch_size, shuffle=False, equalize=False,
        factors=factors,
    )  # fmt: skip


def make_loader(shards_dir: str | Path, split: str, batch_size: int, **options) -> ShardLoader:
    """A loader over one split of staged shards; options are LoaderOptions' fields."""
    return ShardLoader(shards_dir, split, batch_size, LoaderOptions(**options))
