"""How parallel staging shares out the new shards, and the dealing a task follows without
writing: pure logic, no Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipelines.data.parallel_staging import _ownership
from pipelines.data.shards.format import SPLITS
from pipelines.data.shards.writer import SplitWriter


def _plan(counts: dict[str, int], shards: dict[str, int]):
    return SimpleNamespace(counts=counts, shards=shards)


PLAN = _plan({"train": 5400, "val": 600, "test": 1000}, {"train": 6, "val": 2, "test": 2})


def _units(shares) -> list[tuple[str, int]]:
    return sorted((s, i) for share in shares for s in SPLITS for i in share[s])


@pytest.mark.parametrize("workers", [2, 3, 8])
@pytest.mark.parametrize("read_cost", [0.0, 0.05, 0.5, 100.0])
def test_every_new_shard_goes_to_exactly_one_task(workers, read_cost):
    shares = _ownership(PLAN, workers, 7000, read_cost)
    every = sorted((s, i) for s in SPLITS for i in range(PLAN.shards[s]))
    assert _units(shares) == every
    assert 1 <= len(shares) <= workers


def test_reads_cost_nothing_shares_evenly_and_task_zero_always_comes_first():
    even = _ownership(PLAN, 2, 7000, 0.0)
    samples = [sum(PLAN.counts[s] // PLAN.shards[s] * len(sh[s]) for s in SPLITS) for sh in even]
    assert abs(samples[0] - samples[1]) <= 900  # one train shard
    # Reading everything costs more than writing it all: task 0 writes nothing, yet stays
    # first (it is the one that hashes every sample).
    costly = _ownership(PLAN, 3, 7000, 100.0)
    assert not any(costly[0].values()) and len(costly) == 3


def test_the_reading_task_gets_less_to_write_the_dearer_reading_is():
    def written_by_zero(read_cost):
        share = _ownership(PLAN, 2, 7000, read_cost)[0]
        return sum(PLAN.counts[s] // PLAN.shards[s] * len(share[s]) for s in SPLITS)

    assert written_by_zero(0.0) >= written_by_zero(0.3) >= written_by_zero(1.0)
    assert written_by_zero(0.0) > written_by_zero(1.0)


@pytest.mark.parametrize(("n", "shards"), [(10, 3), (1000, 70), (5000, 130), (7, 7)])
def test_owns_follows_the_dealing_of_write(tmp_path, n, shards):
    """A writer that owns some shards says, for each sample number, whether write would put it
    into one of them: the dealing across groups of MAX_OPEN shards included."""
    owned = frozenset(range(0, shards, 3))
    writer = SplitWriter(tmp_path, "train", n, shards, 0, owned=owned)
    said = [writer.owns(i) for i in range(n)]
    written = []
    for i in range(n):
        writer.write(lambda i=i: written.append(i) or {"__key__": f"k{i:05d}", "cls": b"0"})
    writer.close()
    assert [i for i, mine in enumerate(said) if mine] == written
    assert SplitWriter(tmp_path, "val", n, shards, 0).owns(n - 1)  # owned=None: every shard


def test_tasks_that_read_another_version_of_the_source_stop_the_staging():
    """A source replaced while the tasks ran (a file rewritten, images added) is one line
    asking to stage again, not a mix of two versions in one manifest; otherwise task 0's
    digest and statistics are the merged pass's."""
    from pipelines.data.parallel_staging import _merged
    from pipelines.data.staging import _Stream
    from pipelines.errors import PipelineError

    def stream(digest, names):
        entries = {s: [{"name": f"{s}-{n}"} for n in names] for s in SPLITS}
        return _Stream(entries, {"train_mean_per_channel": [0.5]} if digest else {}, digest, None)

    sink = SimpleNamespace(taken=[])
    results = [(stream("abc", [2, 0]), ["x"], "sha256:1"), (stream("", [1]), ["y"], "sha256:1")]
    merged = _merged(results, sink, "sha256:1")
    assert merged.digest == "abc" and merged.stats == {"train_mean_per_channel": [0.5]}
    assert [e["name"] for e in merged.entries["train"]] == ["train-0", "train-1", "train-2"]
    assert sink.taken == ["x", "y"]
    results[1] = (stream("", [1]), [], "sha256:2")
    with pytest.raises(PipelineError, match="source changed while staging") as err:
        _merged(results, SimpleNamespace(taken=[]), "sha256:1")
    assert "\n" not in str(err.value)
