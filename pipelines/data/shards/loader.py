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
and a shard is decoded whole: as arrays in a few numpy operations where it is laid out as staging
writes it, else by a small ustar reader that agrees with tarfile (tested) at 3x its speed
(blocks.py, reader.py; benchmarks/loader_throughput.py).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from pipelines.data.shards.assignment import assign_shards, batches_per_epoch
from pipelines.data.shards.blocks import read_block
from pipelines.data.shards.format import RESTAGE_HINT
from pipelines.data.shards.manifest import EncodingSpec, Manifest, ShardEntry, read_manifest
from pipelines.errors import PipelineError
from pipelines.storage import location

log = logging.getLogger(__name__)

_CORRUPT = "__corrupt__"  # marker item: (shard path, what is wrong), sent on to the main process


# -- pipeline stages (module level so loader workers can unpickle them) -------------------------


def _worker_id() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _take_shards(src: Iterable[dict], keep: frozenset[str]) -> Iterator[dict]:
    """Node splitting: keep this rank's shards (from assign_shards), drop the others."""
    return (item for item in src if item["url"] in keep)


def read_stored_samples(
    url: str, entry: ShardEntry, shape: tuple[int, ...], dtype: str
) -> Iterator[tuple[str, np.ndarray, int | None]]:
    """(key, image as stored, label or None) of every sample of one whole shard, read and
    checked as the loader does (shard and samples); PipelineError naming the shard or sample
    otherwise. For readers outside this loader (embed's Ray tasks)."""
    block = _block_or_raise(url, entry, shape, dtype)
    labels = None if block.labels is None else block.labels.tolist()
    for row, key in enumerate(block.keys):
        if row in block.bad:
            raise PipelineError(f"shard {url} {block.bad[row]}; {RESTAGE_HINT}")
        yield key, block.x[row], None if labels is None else labels[row]


def _block_or_raise(url: str, entry: ShardEntry, shape, dtype: str, factors: bool = False):
    block, problem = read_block(url, entry, shape, dtype, factors)
    if problem is not None:
        raise PipelineError(f"shard {url} {problem}; {RESTAGE_HINT}")
    return block


def shard_batches(
    url: str,
    entry: ShardEntry,
    manifest: Manifest,
    batch_size: int,
    factors: bool = False,
    batches: tuple[int, int | None] = (0, None),
) -> Iterator[dict]:
    """One whole shard, read and checked as the loader does, in batches of its samples in
    stored order, decoded as the loader's batches are ({"x", "key", "label", "factors"}): what
    a Ray task scoring one shard iterates. batches: only batches [first, stop) of them (a
    piece of the shard). A bad shard or sample is a PipelineError naming it."""
    encoding = manifest.encoding
    block = _block_or_raise(url, entry, manifest.shape, encoding.npy_dtype, factors)
    first, stop = batches
    end = len(block) if stop is None else min(len(block), stop * batch_size)
    scale = np.float32(1.0 / encoding.divide_by)
    for a in range(first * batch_size, end, batch_size):
        b = min(a + batch_size, end)
        bad = [row for row in block.bad if a <= row < b]
        if bad:
            raise PipelineError(f"shard {url} {block.bad[min(bad)]}; {RESTAGE_HINT}")
        yield _batch_of(
            block.x[a:b], block.keys[a:b],
            None if block.labels is None else torch.from_numpy(block.labels[a:b]),
            None if block.factors is None else block.factors[a:b], scale,
        )  # fmt: skip


def _read_shards(
    src: Iterable[dict],
    expected: dict[str, ShardEntry],
    shape,
    dtype: str,
    factors: bool,
    copy: bool,
) -> Iterator[Any]:
    """Whole, verified shards only, decoded a shard at once, then sample by sample as
    (key, image, label, factors, problem) rows; problems travel on as markers, never as partial
    shards. copy: each row its own array, so that a shuffle buffer holds its samples and not
    the shards they came from."""
    for item in src:
        url = item["url"]
        block, problem = read_block(url, expected[url], shape, dtype, factors)
        if problem is not None:
            yield {_CORRUPT: (url, problem)}
            continue
        labels = [None] * len(block) if block.labels is None else block.labels.tolist()
        found = [None] * len(block) if block.factors is None else block.factors
        for row, key in enumerate(block.keys):
            why = block.bad.get(row)
            x, f = block.x[row], found[row]
            if copy:
                x, f = x.copy(), None if f is None else f.copy()
            yield key, x, labels[row], f, None if why is None else (url, why)


def _shuffle_samples(src: Iterable[Any], bufsize: int, seed: str) -> Iterator[Any]:
    rng = random.Random(f"{seed}-worker{_worker_id()[0]}")
    buf: list[Any] = []
    for item in src:
        if isinstance(item, dict):
            yield item  # a corrupt shard: report at once, not after a buffer's worth of samples
            continue
        buf.append(item)
        if len(buf) >= bufsize:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _batch_of(x: np.ndarray, keys: list[str], labels, factors, scale: np.float32) -> dict:
    """Images scaled to float32 in [0, 1] (uint8 shards are scaled here, not on disk) per
    batch, not per sample: one numpy call for the whole batch."""
    if x.dtype != np.float32 or scale != 1:
        x = np.multiply(x, scale, dtype=np.float32)
    else:
        x = np.ascontiguousarray(x)
    return {"x": torch.from_numpy(x), "key": keys, "label": labels, "factors": factors}


def _collate(rows: list[tuple], scale: np.float32) -> dict:
    labels = [row[2] for row in rows]
    factors = [row[3] for row in rows]
    return _batch_of(
        np.stack([row[1] for row in rows]), [row[0] for row in rows],
        None if labels[0] is None else torch.tensor(labels, dtype=torch.long),
        None if factors[0] is None else np.stack(factors), scale,
    )  # fmt: skip


def _batch(src: Iterable[Any], batch_size: int, encoding: EncodingSpec) -> Iterator[dict]:
    """Batches in the worker (cheap transfer); the main process re-cuts them to exact sizes."""
    scale = np.float32(1.0 / encoding.divide_by)
    rows: list[tuple] = []
    for item in src:
        if isinstance(item, dict) or item[4] is not None:  # a bad shard, or a bad sample
            yield {"x": None, "corrupt": item[_CORRUPT] if isinstance(item, dict) else item[4]}
            continue
        rows.append(item)
        if len(rows) == batch_size:
            yield _collate(rows, scale)
            rows = []
    if rows:
        yield _collate(rows, scale)


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
        manifest: Manifest | None = None,
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
        entries = self.manifest.shards(split)
        if not entries:
            raise PipelineError(
                f"split {split} in {self.shards_dir} is empty; re-stage with more data or a "
                "larger data.val_fraction / data.test_fraction for that split"
            )
        plan = assign_shards([e.samples for e in entries], world_size)
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
            counts = [e.samples for e in entries]
            self.num_batches = batches_per_epoch(counts, batch_size, world_size)
        else:
            self.num_batches = -(-sum(e.samples for e in self.shards) // batch_size)
        self.shape = self.manifest.shape
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return self.num_batches

    def _pipeline(self, pass_index: int) -> wds.DataPipeline:
        paths = {str(self.shards_dir / e.name): e for e in self.shards}
        seed = f"{self.seed}-{self.epoch}-{self.rank}-{pass_index}"
        urls = [str(self.shards_dir / e.name) for e in self.manifest.shards(self.split)]
        stages: list[Any] = [
            wds.SimpleShardList(urls),
            partial(_take_shards, keep=frozenset(paths)),
        ]
        if self.shuffle:  # the whole list at once; the same seed in every worker of a rank
            # keeps the workers' slices disjoint
            stages.append(wds.shuffle(len(paths), initial=len(paths), seed=seed))
        encoding = self.manifest.encoding
        stages.append(wds.split_by_worker)
        stages.append(
            partial(_read_shards, expected=paths, shape=self.shape, dtype=encoding.npy_dtype,
                    factors=self.factors, copy=self.shuffle)
        )  # fmt: skip
        if self.shuffle:
            stages.append(partial(_shuffle_samples, bufsize=self.shuffle_buffer, seed=seed))
        stages.append(partial(_batch, batch_size=self.batch_size, encoding=encoding))
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
                f"shard {path} {problem}; {RESTAGE_HINT} (or set data.on_corrupt: skip to skip it)"
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
                    f"reader {self.rank} of {self.world_size} (a rank, or a part of the batch: "
                    f"train.batch_parts) read no samples from its {len(self.shards)} shard(s) of "
                    f"split {self.split} ({len(self.skipped)} skipped as corrupt); {RESTAGE_HINT}"
                )
            if not self.equalize:
                break  # nobody waits on us: one pass, no sample repeated


def make_loader(shards_dir: str | Path, split: str, batch_size: int, **options) -> ShardLoader:
    """A loader over one split of staged shards; options are LoaderOptions' fields."""
    return ShardLoader(shards_dir, split, batch_size, LoaderOptions(**options))
