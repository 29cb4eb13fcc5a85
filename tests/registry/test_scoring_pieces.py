"""How a split is cut into scoring tasks: pieces of whole batches that cover each shard once, in
order, and depend on the shards alone (never on the worker count), so that the merged figures
are the same however many workers score them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipelines.scoring.shard_scoring import MIN_PIECES, PIECE_EXAMPLES, Piece, ScoringJob, pieces


def _job(sizes: list[int], batch_size: int = 256, **kw) -> ScoringJob:
    entries = [SimpleNamespace(name=f"test-{i:06d}.tar.gz", samples=n) for i, n in enumerate(sizes)]
    manifest = SimpleNamespace(shards=lambda split: entries)
    return ScoringJob("/shards", manifest, batch_size, "test", 0, **kw)


@pytest.mark.parametrize("sizes", [[1], [5000, 4999], [15_600] * 3, [256, 257, 40_000]])
def test_pieces_cover_every_batch_of_every_shard_once_in_order(sizes):
    job = _job(sizes)
    got = pieces(job)
    for i, n in enumerate(sizes):
        mine = [p for p in got if p.shard == f"test-{i:06d}.tar.gz"]
        batches = -(-n // job.batch_size)
        assert mine[0].first == 0 and mine[-1].stop == batches
        assert all(a.stop == b.first for a, b in zip(mine, mine[1:], strict=False))
        lengths = [p.stop - p.first for p in mine]
        assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
        assert max(lengths) * job.batch_size <= PIECE_EXAMPLES + job.batch_size
    assert [p.shard for p in got] == sorted(p.shard for p in got)


def test_three_large_shards_make_enough_pieces_to_keep_two_workers_equally_busy():
    """The case that capped evaluate at 1.5x: 40,000 64x64 test images in three 64 MB shards."""
    got = pieces(_job([13_277, 13_277, 13_277]))
    assert len(got) == 12
    assert str(got[1]) == "test-000000.tar.gz[13:26]"


def test_a_small_split_is_cut_finely_enough_to_keep_several_workers_equally_busy():
    """One shard of 10,000 was 3 pieces: 2 pieces' time on 2 workers against 3 on 1."""
    got = pieces(_job([10_000]))
    assert len(got) == MIN_PIECES
    assert [p.stop - p.first for p in got] == [5] * MIN_PIECES
    assert len(pieces(_job([5_000, 5_000]))) == MIN_PIECES  # Fashion-MNIST's test split


def test_a_split_is_never_cut_below_one_batch_per_piece():
    assert pieces(_job([1000])) == [Piece("test-000000.tar.gz", i, i + 1) for i in range(4)]
    assert pieces(_job([100])) == [Piece("test-000000.tar.gz", 0, 1)]


def test_the_piece_size_is_the_jobs():
    assert len(pieces(_job([40_000], piece_examples=8192))) == MIN_PIECES
    assert len(pieces(_job([40_000], piece_examples=2048))) == 20
