"""Which split each sample goes to, and how many shards each split gets.

Pure functions of keys, counts and params, so every machine that stages the same data makes the
same plan: the split comes from a SHA-256 of each sample's key (adding samples never moves old
ones), never from Python's per-process hash() or the order samples arrive in.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from pipelines.data.shards.format import SPLITS
from pipelines.data.sources.catalog import Source
from pipelines.errors import PipelineError
from pipelines.params import ClusterParams, DataParams

# -- splitting ---------------------------------------------------------------------------------


def key_fraction(key: str) -> float:
    """A stable number in [0, 1) per key (SHA-256, unlike hash(), is the same on every run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def split_of(key: str, val_fraction: float, test_fraction: float, rule: str = "key_hash") -> str:
    """One key's split (split_codes' rule: the one place it is written)."""
    return SPLITS[split_codes([key], val_fraction, test_fraction, rule)[0]]


def plan_splits(
    keys: list[str], val_fraction: float, test_fraction: float, rule: str = "key_hash"
) -> dict[str, list[int]]:
    """Sample indices per split (in memory: quickstart), by the same rule as staging."""
    check_fractions(val_fraction, test_fraction)
    codes = split_codes(keys, val_fraction, test_fraction, rule)
    return {s: np.flatnonzero(codes == k).tolist() for k, s in enumerate(SPLITS)}


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


def split_codes(
    keys: list[str], val_fraction: float, test_fraction: float, rule: str
) -> np.ndarray:
    """Each key's split as its index in SPLITS. key_hash: test below test_fraction of
    key_fraction, then val below test_fraction + val_fraction, else train. official: the
    keys <source>-<train|test>-<index> name the official part, and val is carved out of train
    below val_fraction. key_fraction is taken in numpy here (the same IEEE conversion and
    comparisons, a third of the time)."""
    hashes = b"".join(hashlib.sha256(k.encode()).digest()[:8] for k in keys)
    u = np.frombuffer(hashes, dtype=">u8").astype(np.float64) / 2.0**64
    if rule == "official":
        test = np.fromiter((k.rsplit("-", 2)[-2] == "test" for k in keys), bool, len(keys))
        return np.where(test, 2, np.where(u < val_fraction, 1, 0)).astype(np.int8)
    codes = np.where(u < test_fraction + val_fraction, 1, 0)
    return np.where(u < test_fraction, 2, codes).astype(np.int8)


def key_splits(src: Source, d) -> np.ndarray:
    """Every sample's split code (split_codes), from the keys alone: one byte a sample, dealt
    once here and handed to every pass of staging, so that no Ray task hashes every key."""
    check_fractions(d.val_fraction, d.test_fraction)
    codes = np.empty(src.n, dtype=np.int8)
    for a in range(0, src.n, 65536):
        b = min(src.n, a + 65536)
        codes[a:b] = split_codes(src.keys(a, b), d.val_fraction, d.test_fraction, d.split)
    return codes


def split_counts(codes: np.ndarray) -> dict[str, int]:
    """Samples per split among split codes."""
    return dict(zip(SPLITS, np.bincount(codes, minlength=len(SPLITS)).tolist(), strict=True))
