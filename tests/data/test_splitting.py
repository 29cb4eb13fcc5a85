"""Which split each sample goes to and how many shards a split gets: pure functions of the keys,
counts and params, checked against what they promise."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.data.shards.format import SPLITS
from pipelines.data.splitting import (
    check_counts,
    key_fraction,
    key_splits,
    plan_splits,
    required_shards,
    shard_count,
    split_codes,
    split_counts,
    split_of,
)
from pipelines.errors import PipelineError
from pipelines.params_file import load_params

KEYS = [f"sample-{i:06d}" for i in range(5000)]


def test_a_key_maps_to_the_first_eight_bytes_of_its_sha256_as_a_fraction():
    digest = hashlib.sha256(b"digits-000123").digest()
    assert key_fraction("digits-000123") == int.from_bytes(digest[:8], "big") / 2**64
    assert all(0 <= key_fraction(k) < 1 for k in KEYS[:200])


def test_splits_take_their_fractions_of_the_keys_test_first_then_val():
    plan = plan_splits(KEYS, val_fraction=0.1, test_fraction=0.2)
    assert sorted(i for idx in plan.values() for i in idx) == list(range(len(KEYS)))
    assert len(plan["test"]) / len(KEYS) == pytest.approx(0.2, abs=0.02)
    assert len(plan["val"]) / len(KEYS) == pytest.approx(0.1, abs=0.015)
    for split, idx in plan.items():
        assert all(split_of(KEYS[i], 0.1, 0.2) == split for i in idx)
        assert idx == sorted(idx)  # in the source's order
    edge = {k: key_fraction(k) for k in KEYS}
    assert all(split_of(k, 0.1, 0.2) == "test" for k in KEYS if edge[k] < 0.2)
    assert all(split_of(k, 0.1, 0.2) == "val" for k in KEYS if 0.2 <= edge[k] < 0.3)


def test_growing_a_fraction_only_moves_keys_into_that_split():
    small, large = plan_splits(KEYS, 0.1, 0.1), plan_splits(KEYS, 0.1, 0.2)
    assert set(small["test"]) < set(large["test"])
    assert set(large["train"]) < set(small["train"])


def test_fractions_that_leave_nothing_to_train_on_are_refused():
    with pytest.raises(
        PipelineError, match=r"= 1 leaves nothing to train on; keep the sum below 1"
    ):
        plan_splits(KEYS, 0.5, 0.5)
    assert plan_splits(KEYS[:10], 0.0, 0.0)["train"] == list(range(10))


@pytest.mark.parametrize(("val", "test"), [(0.1, 0.2), (0.0, 0.0), (0.3, 0.0), (0.0, 0.25)])
@pytest.mark.parametrize("rule", ["key_hash", "official"])
def test_split_codes_follow_the_rule_on_each_keys_fraction_for_every_key(rule, val, test):
    """Staging deals by split codes computed in numpy; each must be the rule applied to the
    key's own key_fraction (Python's float), the edges of the fractions included, for both
    rules."""
    keys = [f"fashion_mnist-{part}-{i:05d}" for part in ("train", "test") for i in range(4000)]

    def rule_of(key: str) -> str:
        u = key_fraction(key)
        if rule == "official":
            return "test" if "-test-" in key else ("val" if u < val else "train")
        return "test" if u < test else ("val" if u < test + val else "train")

    codes = split_codes(keys, val, test, rule)
    assert codes.dtype == np.int8
    assert [SPLITS[c] for c in codes] == [rule_of(k) for k in keys]
    assert [split_of(k, val, test, rule) for k in keys[:50]] == [rule_of(k) for k in keys[:50]]


def test_key_splits_read_a_large_source_in_whole_non_overlapping_chunks():
    keys = [f"k{i}" for i in range(140_000)]  # three 65,536-key chunks
    src = SimpleNamespace(n=len(keys), keys=lambda a, b: keys[a:b])
    d = SimpleNamespace(val_fraction=0.1, test_fraction=0.2, split="key_hash")
    codes = key_splits(src, d)
    assert len(codes) == len(keys)
    plan = plan_splits(keys, 0.1, 0.2)
    assert split_counts(codes) == {s: len(idx) for s, idx in plan.items()}
    assert split_counts(codes[3000:]) == {
        s: len(idx) for s, idx in plan_splits(keys[3000:], 0.1, 0.2).items()
    }
    assert all(SPLITS[codes[i]] == s for s, idx in plan.items() for i in idx[:500])


def _sections(*sets: str):
    p = load_params(None, list(sets))
    return p.data, p.cluster


def test_every_split_needs_a_shard_per_rank_and_loader_worker():
    assert required_shards(*_sections("data.min_shards_per_split=2", "cluster.num_workers=1",
                                   "cluster.loader_workers=0")) == 2  # fmt: skip
    assert required_shards(*_sections("data.min_shards_per_split=2", "cluster.num_workers=3",
                                   "cluster.loader_workers=2")) == 6  # fmt: skip
    assert required_shards(*_sections("data.min_shards_per_split=5", "cluster.num_workers=2",
                                   "cluster.loader_workers=2")) == 5  # fmt: skip
    assert required_shards(*_sections("data.min_shards_per_split=1", "cluster.num_workers=3",
                                   "cluster.loader_workers=0")) == 3  # fmt: skip
    # Each part of the batch reads shards of its own, on however few workers.
    one_worker = _sections("data.min_shards_per_split=1", "cluster.num_workers=1",
                           "cluster.loader_workers=2")  # fmt: skip
    assert required_shards(*one_worker, batch_parts=4) == 8


def test_shard_count_follows_shard_bytes_and_shard_size_within_its_bounds():
    p = load_params(None, ["data.shard_bytes=1000"])
    assert shard_count(0, 100, p.data, 2) == 0
    assert shard_count(1, 100, p.data, 2) == 1
    assert shard_count(100, 100, p.data, 2) == 10  # 10,000 bytes / 1,000
    assert shard_count(101, 100, p.data, 2) == 11  # rounded up
    assert shard_count(5, 100, p.data, 2) == 2  # at least min_shards
    assert shard_count(3, 100, p.data, 4) == 3  # never more shards than samples
    sized = load_params(None, ["data.shard_bytes=1000000", "data.shard_size=7"])
    assert shard_count(50, 10, sized.data, 1) == 8  # ceil(50 / 7)


def test_a_split_with_too_few_samples_for_its_shards_is_named():
    p = load_params(None, ["data.val_fraction=0.1", "data.test_fraction=0.0"])
    check_counts({"train": 9, "val": 4, "test": 0}, p.data, need=4)  # test is empty on purpose
    with pytest.raises(PipelineError) as e:
        check_counts({"train": 9, "val": 3, "test": 0}, p.data, need=4)
    assert str(e.value) == (
        "split val got 3 samples, fewer than the 4 shards every split needs "
        "(data.min_shards_per_split, train.batch_parts x cluster.loader_workers); add data, "
        "change data.val_fraction / data.test_fraction, or lower those settings"
    )
    with pytest.raises(PipelineError, match=r"^split train got 2 samples"):
        check_counts({"train": 2, "val": 9, "test": 0}, p.data, need=4)


def test_the_official_split_keeps_the_sources_test_part_and_carves_val_out_of_train():
    keys = [f"fashion_mnist-train-{i:05d}" for i in range(6000)]
    keys += [f"fashion_mnist-test-{i:05d}" for i in range(1000)]
    plan = plan_splits(keys, 0.1, 0.2, "official")
    assert plan["test"] == list(range(6000, 7000)), "exactly the official test part"
    assert 500 < len(plan["val"]) < 700 and max(plan["val"]) < 6000  # ~10% of train
    assert all(split_of(k, 0.1, 0.2, "official") != "test" for k in keys[:6000])
    # The same train keys go to val under either rule when test takes none of them.
    assert [split_of(k, 0.1, 0.0, "official") for k in keys[:300]] == [
        split_of(k, 0.1, 0.0) for k in keys[:300]
    ]


def test_the_official_split_is_refused_for_a_source_without_official_parts():
    with pytest.raises(Exception, match="split official needs a source with official"):
        load_params(None, ["data.split=official"])
    assert load_params(None, ["data.split=official", "data.source=mnist"]).data.split == "official"
