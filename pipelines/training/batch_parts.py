"""How a global batch is cut into parts and the parts spread over DDP ranks, and where each
example's noise comes from: what makes the model a function of train.batch_parts and the data,
never of the worker count.

The global batch (train.batch_size) is cut into batch_parts equal parts. Part p of every step is
read by a loader of its own, as rank p of a batch_parts-wide world would read it (its shards,
its shuffle); a rank computes a contiguous block of parts, one backward pass each, and DDP adds
the ranks' gradients once a step. Each example's z samples come from a seed hashed from its key
and the epoch. So a part's gradient is the same on whichever rank computes it. With two parts
(the default), 1 and 2 workers agree to the bit: a + b is the same sum on one rank or across two,
and the loss weights differ by a power of two. With more parts every worker count still sees the
same parts and noise, but the sums run in another order (a rank adds its parts in turn, the
all-reduce in its own): the same model up to float rounding, which training amplifies.
"""

from __future__ import annotations

import torch

from pipelines.errors import PipelineError
from vae.keyed_noise import seeds_from_keys


def part_size(global_batch: int, parts: int) -> int:
    """Each part's examples: train.batch_size is cut into train.batch_parts equal parts."""
    if parts < 1 or global_batch % parts:
        raise PipelineError(
            f"train.batch_size={global_batch} is cut into train.batch_parts={parts} equal parts; "
            f"set train.batch_size to a multiple of {parts}"
        )
    return global_batch // parts


def rank_parts(parts: int, world: int, rank: int) -> range:
    """The parts of every global batch that this rank computes: contiguous blocks, as even as
    possible. A world that divides the parts gives every rank the same work; any world up to
    the parts gives the same model."""
    if not 1 <= world <= parts:
        raise PipelineError(
            f"cluster.num_workers={world} is more than train.batch_parts={parts}, and each "
            f"worker computes whole parts of the batch; set train.batch_parts to {world} or a "
            "multiple of it (another split of the batch: another model than before) or use "
            "fewer workers"
        )
    return range(rank * parts // world, (rank + 1) * parts // world)


def part_weight(parts: int, world: int) -> float:
    """The factor on a part's mean loss: DDP averages the ranks' gradients (divides their sum
    by the world), and the batch's mean loss is the mean of its equal parts', so a part counts
    world / parts. Powers of two apart on 1 and 2 workers: the gradients agree to the bit."""
    return world / parts


def train_noise_seeds(keys: list[str], seed: int, epoch: int) -> torch.Tensor:
    """Each training example's noise seed for one epoch: its own z samples, wherever the
    example is computed; a new draw every epoch, the same on a resumed epoch."""
    return seeds_from_keys(keys, f"train\0{seed}\0{epoch}")


def val_noise_seeds(keys: list[str], seed: int) -> torch.Tensor:
    """Validation's noise seeds: the same every epoch, so epochs are compared on the same z."""
    return seeds_from_keys(keys, f"val\0{seed}")
