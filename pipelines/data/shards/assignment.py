"""Which shards each DDP rank reads, and how many batches an epoch has.

Every rank computes the same plan from the manifest alone (no communication), so the plan must
be a deterministic function of the shards' sample counts and the world size.
"""

from __future__ import annotations

from collections.abc import Sequence


def assign_shards(sample_counts: list[int], world_size: int) -> list[list[int]]:
    """Shard indices per rank: largest shard first to the rank holding the fewest samples.

    Deterministic (ties go to the rank with fewer shards, then the lower rank), so every rank
    computes the same plan from the manifest.
    """
    loads, plan = [0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(range(len(sample_counts)), key=lambda i: (-sample_counts[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], len(plan[r]), r))
        plan[r].append(i)
        loads[r] += sample_counts[i]
    return [sorted(p) for p in plan]


def batches_per_epoch(counts: Sequence[int], batch_size: int, world_size: int) -> int:
    """Batches every rank yields per epoch: the most any rank needs for one pass over its
    samples. counts: the samples of each of the split's shards, in manifest order."""
    plan = assign_shards(counts, world_size)
    return max((-(-sum(counts[i] for i in p) // batch_size) for p in plan), default=0)
