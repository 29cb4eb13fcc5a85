"""How parallel staging shares out the shards, and the dealing a task follows without writing:
pure logic, no Ray."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.data.parallel_staging import _ownership
from pipelines.data.shards.format import SPLITS
from pipelines.data.shards.writer import SplitWriter
from pipelines.data.staging_pass import Generation, Plan


def _plan(*generations: tuple[dict[str, int], dict[str, int], bool]) -> Plan:
    gens, codes, start = [], [], 0
    for counts, shards, write in generations:
        stop = start + sum(counts.values())
        gens.append(Generation(start, stop, counts, shards, dict.fromkeys(SPLITS, 0), write))
        codes += [k for k, s in enumerate(SPLITS) for _ in range(counts[s])]
        start = stop
    return Plan(tuple(gens), np.array(codes, dtype=np.int8))


COUNTS, SHARDS = {"train": 5400, "val": 600, "test": 1000}, {"train": 6, "val": 2, "test": 2}
PLAN = _plan((COUNTS, SHARDS, True))
# An append: the first staging's shards only hashed, 1,400 new samples written.
APPEND = _plan((COUNTS, SHARDS, False), ({"train": 1000, "val": 200, "test": 200},
                                         {"train": 2, "val": 1, "test": 1}, True))  # fmt: skip


def _samples(plan: Plan, share) -> int:
    return sum(plan.unit_samples(u) for u in share)


@pytest.mark.parametrize("plan", [PLAN, APPEND])
@pytest.mark.parametrize("workers", [2, 3, 8])
@pytest.mark.parametrize("read_cost", [0.0, 0.05, 0.5, 100.0])
def test_every_shard_goes_to_exactly_one_task(plan, workers, read_cost):
    shares = _ownership(plan, workers, read_cost)
    assert sorted(u for share in shares for u in share) == sorted(plan.units())
    assert 1 <= len(shares) <= workers


def test_a_fresh_staging_shares_its_samples_evenly_and_no_task_reads_them_all():
    for workers in (2, 3):
        written = [_samples(PLAN, share) for share in _ownership(PLAN, workers, 0.3)]
        assert max(written) - min(written) <= 901  # one train shard
        assert max(written) < sum(COUNTS.values())


def test_an_appends_hashed_shards_count_as_reads_only():
    """Hashing an earlier shard costs its reads; writing a new one its reads and writes. With
    reads dear, the earlier shards weigh about as much as the new, and the shares stay even."""

    def loads(read_cost):
        out = []
        for share in _ownership(APPEND, 2, read_cost):
            out.append(sum(
                APPEND.unit_samples(u) * (read_cost + APPEND.generations[u[0]].write)
                for u in share
            ))  # fmt: skip
        return out

    for read_cost in (0.0, 0.3, 5.0):
        a, b = loads(read_cost)
        assert abs(a - b) <= 901 * (1 + read_cost)
    # Free reads: the earlier shards cost nothing, and one task may get all of them.
    assert all(len(share) for share in _ownership(APPEND, 2, 0.0))


@pytest.mark.parametrize(("n", "shards"), [(10, 3), (1000, 70), (5000, 130), (7, 7)])
def test_positions_follow_the_dealing_of_write(tmp_path, n, shards):
    """A writer says, for each sample number, which shard write puts it into (staging_pass
    picks a task's rows by it), across groups of MAX_OPEN shards; handed only those samples,
    each with its number, it writes the shards it writes when handed every sample."""
    owned = frozenset(range(0, shards, 3))
    said = SplitWriter(tmp_path, "train", n, shards, 0).positions(np.arange(n))
    assert said.min() >= 0 and said.max() < shards
    mine = [i for i in range(n) if said[i] in owned]

    def sample(i):
        return {"__key__": f"k{i:05d}", "cls": b"%d" % i}

    every, some = _folder(tmp_path, "every"), _folder(tmp_path, "some")
    written = []
    writer = SplitWriter(every, "train", n, shards, 0, owned=owned)
    for i in range(n):
        writer.write(lambda i=i: written.append(i) or sample(i))
    whole = writer.close()
    writer = SplitWriter(some, "train", n, shards, 0, owned=owned)
    for i in mine:
        writer.write(lambda i=i: sample(i), i)
    assert written == mine
    assert writer.close() == whole, "the same shards, byte for byte (their sha256)"
    assert len(whole) == len(owned)


def test_tasks_that_read_another_version_of_the_source_stop_the_staging():
    """A source replaced while the tasks ran (a file rewritten, images added) is one line
    asking to stage again, not a mix of two versions in one manifest; otherwise the merged
    pass holds every task's digests and statistics, and each split's shards in name order."""
    from pipelines.data.parallel_staging import _merged
    from pipelines.data.staging_pass import PassResult
    from pipelines.data.train_stats import TrainStats
    from pipelines.errors import PipelineError

    def passed(units, names):
        entries = {s: [{"name": f"{s}-{n}"} for n in names] for s in SPLITS}
        stats = {u: TrainStats(1, 255.0) for u in units if u[1] == "train"}
        return PassResult(entries, {u: bytes([len(names)]) for u in units}, stats)

    sink = SimpleNamespace(taken=[])
    first, second = [(0, "train", 0), (0, "val", 1)], [(0, "train", 1)]
    results = [(passed(first, [2, 0]), ["x"], "sha256:1"), (passed(second, [1]), ["y"], "sha256:1")]
    merged = _merged(results, sink, "sha256:1")
    assert sorted(merged.digests) == sorted(first + second)
    assert sorted(merged.stats) == [(0, "train", 0), (0, "train", 1)]
    assert [e["name"] for e in merged.entries["train"]] == ["train-0", "train-1", "train-2"]
    assert sink.taken == ["x", "y"]
    results[1] = (passed(second, [1]), [], "sha256:2")
    with pytest.raises(PipelineError, match="source changed while staging") as err:
        _merged(results, SimpleNamespace(taken=[]), "sha256:1")
    assert "\n" not in str(err.value)


def test_passes_that_own_a_share_each_read_every_sample_once_and_add_up_to_one_pass(tmp_path):
    """Three passes over one source, each owning a share of the shards (as three staging tasks
    do), read only their shards' rows: each sample once in all. Their digests, statistics and
    shards are one whole pass's, byte for byte."""
    import dataclasses

    from pipelines.data.parallel_staging import _ownership
    from pipelines.data.sources.catalog import open_sprites
    from pipelines.data.splitting import key_splits, split_counts
    from pipelines.data.staging_pass import content_digest, stream_pass, train_stats
    from tests.helpers.params import params_in

    d = params_in(tmp_path, "data.shard_size=90").data
    src = open_sprites(1500)  # reads picked rows alone (Source.read_rows)
    read = []
    counted = dataclasses.replace(
        src, read_rows=lambda rows: read.extend(rows.tolist()) or src.read_rows(rows)
    )
    codes = key_splits(src, d)
    counts = split_counts(codes)
    shards = {s: -(-counts[s] // 90) for s in SPLITS}
    plan = Plan((Generation(0, src.n, counts, shards, dict.fromkeys(SPLITS, 0), True),), codes)

    whole = stream_pass(src, _folder(tmp_path, "whole"), plan)
    parts = [
        stream_pass(counted, _folder(tmp_path, f"part{i}"), plan, owned=share)
        for i, share in enumerate(_ownership(plan, 3, 0.0))
    ]
    assert sorted(read) == list(range(src.n)), "every sample read once, by one pass"
    digests = {u: h for p in parts for u, h in p.digests.items()}
    stats = {u: st for p in parts for u, st in p.stats.items()}
    assert content_digest(src, d, plan, digests) == content_digest(src, d, plan, whole.digests)
    assert train_stats(src, plan, stats) == train_stats(src, plan, whole.stats)
    names = sorted(e["name"] for p in parts for s in SPLITS for e in p.entries[s])
    assert names == sorted(e["name"] for s in SPLITS for e in whole.entries[s])
    for name in names:
        one = (tmp_path / "whole" / name).read_bytes()
        assert any((tmp_path / f"part{i}" / name).is_file() and
                   (tmp_path / f"part{i}" / name).read_bytes() == one for i in range(3))  # fmt: skip


def _folder(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name
