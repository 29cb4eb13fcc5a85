"""The shard plan every DDP rank computes alone from the manifest."""

from __future__ import annotations

import pytest

from pipelines.data.shards.assignment import assign_shards, batches_per_epoch
from pipelines.data.shards.manifest import Manifest
from pipelines.errors import PipelineError


def test_largest_shards_go_first_to_the_least_loaded_rank_with_ties_to_the_lower_rank():
    assert assign_shards([10, 30, 20, 20], 2) == [[0, 1], [2, 3]]  # 30+10 and 20+20
    assert assign_shards([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]
    assert assign_shards([7], 3) == [[0], [], []]


def test_every_shard_goes_to_exactly_one_rank_and_loads_stay_within_one_shard():
    counts = [40, 40, 40, 40, 30, 11, 9, 3]
    plan = assign_shards(counts, 3)
    assert sorted(i for p in plan for i in p) == list(range(len(counts)))
    loads = [sum(counts[i] for i in p) for p in plan]
    assert max(loads) - min(loads) <= max(counts)


def test_an_epoch_lasts_as_many_batches_as_the_busiest_rank_needs():
    assert batches_per_epoch([40, 40, 40, 40, 30], 16, 2) == 7  # 110 samples
    assert batches_per_epoch([16, 16], 16, 2) == 1
    assert batches_per_epoch([17], 16, 1) == 2
    assert batches_per_epoch([], 16, 2) == 0


def test_a_split_the_manifest_lacks_is_one_error_naming_the_splits_it_has():
    with pytest.raises(
        PipelineError,
        match=r"split 'validation' is not in the manifest \(it has \['train', 'val', 'test'\]\)",
    ):
        Manifest.model_construct().shards("validation")
