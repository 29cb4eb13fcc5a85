"""Numbers for new shards: an append never takes a number in use, and numbers wrap to the lowest
free run before they would need a seventh digit (which readers refuse)."""

from __future__ import annotations

from pipelines.data.shards.format import (
    SPLITS,
)
from pipelines.errors import PipelineError

SHARD_NUMBERS = 10**6  # six digits (SHARD_PATTERN)


def first_free(names, counts: dict[str, int]) -> dict[str, int]:
    """Per split, where `counts` new shards can be numbered without taking a name in names:
    after the highest number there, or, when that would run past six digits (a prefix rebuilt
    every night for years), the lowest run of free numbers long enough."""
    used: dict[str, set[int]] = {s: set() for s in SPLITS}
    for name in names:
        split, number = name.split(".", 1)[0].split("-")
        used[split].add(int(number))
    first = {}
    for split, numbers in used.items():
        start = max(numbers, default=-1) + 1
        if start + counts[split] > SHARD_NUMBERS:
            start = _free_run(sorted(numbers), counts[split], split)
        first[split] = start
    return first


def _free_run(used: list[int], count: int, split: str) -> int:
    start = 0
    for number in [*used, SHARD_NUMBERS]:
        if number - start >= count:
            return start
        start = number + 1
    raise PipelineError(
        f"no {count} free {split} shard numbers are left in data.shards_dir; stage into a "
        "new folder or prefix"
    )
