"""One pass of staging over the source: every sample dealt to its shard, and each shard hashed
and counted on its own, so that any number of passes, each owning some of the shards, give the
manifest one pass gives.

The content digest an append checks is one SHA-256 over the settings that shape the shards and
then every shard's own digest (over its samples in order: key, pixels, label), generation by
generation, split by split, shard by shard. A pass that owns some shards (a Ray task of
parallel staging) reads, hashes and writes only their samples; no pass has to read them all,
and none hashes every key: the plan carries each sample's split, dealt once by the driver.
An append keeps the earlier generations' shards: it hashes their samples from the source again,
dealt as they were then, and their digests must give the previous manifest's content digest.
The train statistics are summed per shard too and put together in the same order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from pipelines.data.shards.format import FORMAT, SPLITS
from pipelines.data.shards.writer import SplitWriter, encode_sample, label_bytes
from pipelines.data.sources.base import CHUNK, Source
from pipelines.data.train_stats import TrainStats

# How the manifest's content digest is made ("scheme" in its content record). Scheme 2: over
# the shards' digests, as above. A manifest without it was staged by an earlier version (one
# running SHA-256 over every sample, which only one process could compute): its shards are
# rebuilt once, by the next staging.
CONTENT_SCHEME = 2

Unit = tuple[int, str, int]  # a shard: (generation, split, position within the generation)


@dataclass(frozen=True)
class Generation:
    """Source samples [start, stop), dealt over shards of their own per split: an earlier
    staging's (only hashed: their shards are kept) or the new ones (written)."""

    start: int
    stop: int
    counts: dict[str, int]  # samples per split
    shards: dict[str, int]  # shards per split
    first: dict[str, int]  # the number in the first new shard's name, per split
    write: bool


@dataclass(frozen=True)
class Plan:
    generations: tuple[Generation, ...]  # the earlier ones in order, then the new one
    # Every sample's split code (splitting.key_splits: codes[i] is sample i's), dealt once
    # from the keys by the driver, so that no pass hashes every key again.
    codes: np.ndarray = field(compare=False, repr=False)

    @property
    def new(self) -> Generation:
        return self.generations[-1]

    def units(self) -> list[Unit]:
        """Every shard of the pass, in the content digest's order."""
        return [
            (g, s, i)
            for g, gen in enumerate(self.generations)
            for s in SPLITS
            for i in range(gen.shards[s])
        ]  # fmt: skip

    def unit_samples(self, unit: Unit) -> int:
        """A shard's samples, give or take one (a split's are dealt evenly over its shards)."""
        gen = self.generations[unit[0]]
        return gen.counts[unit[1]] // gen.shards[unit[1]] + 1


@dataclass
class PassResult:
    """The new shards' manifest entries per split; each owned shard's content digest, and the
    statistics of each owned train shard."""

    entries: dict[str, list[dict]]
    digests: dict[Unit, bytes]
    stats: dict[Unit, TrainStats]


def settings_hash(src: Source, d) -> hashlib._Hash:
    settings = {
        "format": FORMAT, "source": src.name, "shape": list(src.shape), "dtype": src.dtype,
        "scaling": src.scaling, "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction, "shard_bytes": d.shard_bytes,
        "shard_size": d.shard_size,
    }  # fmt: skip
    if d.split != "key_hash":  # the official split came later; key-hash settings kept their form
        settings["split"] = d.split
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode())


def content_digest(
    src: Source, d, plan: Plan, digests: dict[Unit, bytes], generations: int | None = None
) -> str:
    """The content digest over the plan's first `generations` generations (all by default)."""
    h = settings_hash(src, d)
    for unit in plan.units():
        if generations is None or unit[0] < generations:
            h.update(digests[unit])
    return h.hexdigest()


def train_stats(src: Source, plan: Plan, stats: dict[Unit, TrainStats]) -> dict:
    """The manifest's train statistics: the train shards' sums, added in the digest's order."""
    total = TrainStats(src.shape[0], src.divide_by)
    for unit in plan.units():
        if unit in stats:
            total.merge(stats[unit])
    return total.to_dict()


def _writers(folder: Path, plan: Plan, on_closed, owned: frozenset[Unit] | None) -> dict:
    """A writer per generation and split; an earlier generation's writes nothing (it deals)."""
    writers = {}
    for g, gen in enumerate(plan.generations):
        for s in SPLITS:
            mine = (
                None if owned is None else frozenset(i for gg, ss, i in owned if (gg, ss) == (g, s))
            )
            writers[g, s] = SplitWriter(
                folder, s, gen.counts[s], gen.shards[s], gen.first[s], on_closed,
                mine if gen.write else frozenset(),
            )  # fmt: skip
    return writers


def stream_pass(
    src: Source, folder: Path, plan: Plan, bar=None, on_closed=None,
    owned: frozenset[Unit] | None = None,
) -> PassResult:  # fmt: skip
    """From the first generation's start to the source's end, every sample dealt to its shard
    by its split code (plan.codes); those of owned shards (every shard by default) read, hashed
    into their shard's digest, counted into its statistics (train) and, in the new generation,
    written (each closed shard handed to on_closed). A chunk with none of them is not read."""
    writers = _writers(folder, plan, on_closed, owned)
    units = frozenset(plan.units()) if owned is None else owned
    mine = {
        (g, s): np.isin(np.arange(gen.shards[s]), [i for gg, ss, i in units if (gg, ss) == (g, s)])
        for g, gen in enumerate(plan.generations)
        for s in SPLITS
    }  # fmt: skip
    digests = {u: hashlib.sha256() for u in units}
    stats = {u: TrainStats(src.shape[0], src.divide_by) for u in units if u[1] == "train"}
    seen = dict.fromkeys(writers, 0)
    for a in range(plan.generations[0].start, src.n, CHUNK):
        b = min(src.n, a + CHUNK)
        dealt = _dealt(plan, writers, a, b, seen, mine)
        if dealt:
            picked = [d[0] for d in dealt]
            c = src.read(a, b) if len(picked) == b - a else src.rows(a, b, picked)
            _take(c, dealt, plan, writers, digests, stats)
        if bar is not None:
            bar.update(b - a)
    entries = {s: writers[len(plan.generations) - 1, s].close() for s in SPLITS}
    for w in writers.values():
        w.close()  # an earlier generation's writer holds no file
    return PassResult(entries, {u: h.digest() for u, h in digests.items()}, stats)


def _dealt(plan: Plan, writers, a: int, b: int, seen: dict, mine: dict) -> list[tuple]:
    """The samples [a, b) of the shards marked in mine, in order, each as (offset from a,
    generation, split, shard, its number in its split's dealing); seen counts every sample
    dealt so far per generation and split."""
    out = []
    for g, gen in enumerate(plan.generations):
        lo, hi = max(a, gen.start), min(b, gen.stop)
        for k, s in enumerate(SPLITS):
            at = np.flatnonzero(plan.codes[lo:hi] == k)  # empty where the chunk misses gen
            if not len(at):
                continue
            numbers = seen[g, s] + np.arange(len(at))
            seen[g, s] += len(at)
            shard = writers[g, s].positions(numbers)
            keep = mine[g, s][shard]
            rows = zip(
                (at[keep] + lo - a).tolist(), shard[keep].tolist(), numbers[keep].tolist(),
                strict=True,
            )  # fmt: skip
            out += [(off, g, s, i, n) for off, i, n in rows]
    out.sort()
    return out


def _take(c, dealt, plan: Plan, writers, digests, stats) -> None:
    """One chunk's dealt samples (c holds them, in that order): each into its shard's digest
    and statistics, and written when its generation is the new one."""
    xs = np.ascontiguousarray(c.x)
    train: dict[Unit, list[int]] = {}
    for j, (_, g, s, i, number) in enumerate(dealt):
        key, x, label = c.keys[j], xs[j], label_bytes(c.labels, j)
        unit = (g, s, i)
        h = digests[unit]
        # Three updates, not one concatenation: the same digest without copying the pixels.
        h.update(key.encode() + b"\0")
        h.update(x)
        h.update(b"\0" + (label or b""))
        if s == "train":
            train.setdefault(unit, []).append(j)
        if plan.generations[g].write:
            factors = None if c.factors is None else c.factors[j]
            writers[g, s].write(partial(encode_sample, key, x, label, factors), number)
    for unit, rows in train.items():
        stats[unit].add(c.x[rows])
