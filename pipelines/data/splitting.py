"""Which split each sample goes to, and how many shards each split gets.

Pure functions of keys, counts and params, so every machine that stages the same data makes the
same plan: the split comes from a SHA-256 of each sample's key (adding samples never moves old
ones), never from Python's per-process hash() or the order samples arrive in.
"""

from __future__ import annotations

import hashlib
import math

from pipelines.data.shards.format import SPLITS
from pipelines.data.sources.catalog import Source
from pipelines.errors import PipelineError
from pipelines.params import ClusterParams, DataParams

# -- splitting ---------------------------------------------------------------------------------


def key_fraction(key: str) -> float:
    """A stable number in [0, 1) per key (SHA-256, unlike hash(), is the same on every run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_of(key: str, val_fraction: float, test_fraction: float, rule: str = "key_hash") -> str:
    u = key_fraction(key)
    if rule == "official":  # keys <source>-<train|test>-<index> name the official part
        if key.rsplit("-", 2)[-2] == "test":
            return "test"
        return "val" if u < val_fraction else "train"
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def plan_splits(
    keys: list[str], val_fraction: float, test_fraction: float, rule: str = "key_hash"
) -> dict[str, list[int]]:
    """Sample indices per split (in memory: quickstart), by the same rule as staging."""
    check_fractions(val_fraction, test_fraction)
    plan: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, key in enumerate(keys):
        plan[split_of(key, val_fraction, test_fraction, rule)].append(i)
    return plan


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if val_fraction + test_fraction >= 1:
        raise PipelineError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} leaves "
            "nothing to train on; keep the sum below 1"
        )


def required_shards(d: DataParams, cluster: ClusterParams, batch_parts: int = 1) -> int:
    """Shards each split needs: data.min_shards_per_split, and a shard per loader worker of
    each part of the batch (train.batch_parts; DDP ranks, if more: training refuses them)."""
    ranks = max(cluster.max_workers, batch_parts)
    workers = max(1, cluster.loader_workers)
    return max(d.min_shards_per_split, ranks * workers)


def shard_count(n: int, sample_bytes: int, d: DataParams, min_shards: int) -> int:
    """Shards for n samples of a split: about data.shard_bytes (uncompressed) each, at most
    data.shard_size samples each if set, at least min_shards, never more than n."""
    if n == 0:
        return 0
    count = max(min_shards, math.ceil(n * sample_bytes / d.shard_bytes))
    if d.shard_size:
        count = max(count, math.ceil(n / d.shard_size))
    return min(n, count)


def check_counts(counts: dict[str, int], d: DataParams, need: int) -> None:
    test = 1.0 if d.split == "official" else d.test_fraction
    fractions = {"train": 1 - d.val_fraction - (0 if d.split == "official" else test)}
    fractions.update(val=d.val_fraction, test=test)
    for split, n in counts.items():
        if fractions[split] > 0 and n < need:
            raise PipelineError(
                f"split {split} got {n} samples, fewer than the {need} shards every split "
                "needs (data.min_shards_per_split, train.batch_parts x cluster.loader_workers); "
                "add data, change data.val_fraction / data.test_fraction, or lower those settings"
            )


def count_splits(src: Source, d, start: int = 0, stop: int | None = None) -> dict[str, int]:
    """Samples per split among the source's samples [start, stop) (to its end by default;
    keys only)."""
    check_fractions(d.val_fraction, d.test_fraction)
    counts = dict.fromkeys(SPLITS, 0)
    stop = src.n if stop is None else stop
    for a in range(start, stop, 65536):
        for key in src.keys(a, min(stop, a + 65536)):
            counts[split_of(key, d.val_fraction, d.test_fraction, d.split)] += 1
    return counts
