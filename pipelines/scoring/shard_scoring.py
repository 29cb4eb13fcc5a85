"""Scoring a model on a split, a piece of a shard per task: what `evaluate` and the promotion gate run,
on the Ray cluster's workers (GPUs with cluster.use_gpu) or, with no cluster, in this process.

Ray tasks, one per piece of a shard, not Ray Data or Train workers: a piece is the unit whose sums
merge (no rows to shuffle between operators, no gang of ranks to keep in step), a task reads its
shard with the training loader's own checks, and a lost node's task is simply run again. A shard
is cut into pieces of at most PIECE_EXAMPLES whole batches, and a small split into at least
MIN_PIECES pieces, so that a split of a few large shards (64 MB of 64x64 images is 15,000
examples) or of a few small ones (Fashion-MNIST's 10,000 test images are two shards) still
keeps every worker busy: 3 pieces on 2 workers is 2 pieces' time against 3, a 1.5x ceiling.
The cut depends on the split's shards alone, never on the worker count.

Each example's z samples come from its own seed, hashed from its key and the stage's seed
(vae.keyed_noise), and the IW examples are chosen by a hash of the key: so the figures are the
same on 1, 2 or 40 workers, and two models scored with the same seed and sample count see the
same eps for every example (the gate's pairing). The driver only merges per-piece sums, in
shard and piece order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines.data.shards.loader import shard_batches
from pipelines.data.shards.manifest import Manifest
from pipelines.params import ClusterParams
from pipelines.scoring.held_out_pass import HeldOutPass, Noted
from vae import Autoencoder, EvalSums, score_batches
from vae.keyed_noise import seeds_from_keys

_IW_SALT = b"vae-pipeline/iw-subsample\0"
PIECE_EXAMPLES = 4096  # a task's share of a shard: balance against reading the shard again
# A split this small (under MIN_PIECES * PIECE_EXAMPLES) is cut into this many pieces: its
# shards are small, so reading one again per piece costs little beside the scoring.
MIN_PIECES = 8


def noise_seeds(keys: list[str], seed: int) -> torch.Tensor:
    """Each example's noise seed (int64 >= 0), from its key and the stage's seed."""
    return seeds_from_keys(keys, str(seed))


def in_iw_subsample(keys: list[str], fraction: float | None) -> torch.Tensor:
    """Whether each example is in the IW estimate's fixed subsample: a hash of its key below
    fraction (None: every example). It does not depend on the seed: every model and every run
    of the same data is judged on the same examples."""
    if fraction is None or fraction >= 1:
        return torch.ones(len(keys), dtype=torch.bool)
    cut = int(fraction * 2**64)
    return torch.tensor(
        [
            int.from_bytes(hashlib.sha256(_IW_SALT + k.encode()).digest()[:8], "big") < cut
            for k in keys
        ],
        dtype=torch.bool,
    )


@dataclass(frozen=True)
class ScoringJob:
    """What every shard task does, as plain values (absolute paths or URLs)."""

    shards_dir: str
    manifest: Manifest
    batch_size: int
    split: str
    seed: int
    mc_samples: int | None = None  # None: the model's own
    iw_k: int = 0
    iw_fraction: float | None = None
    per_example: bool = False  # keep each example's -ELBO (the gate's paired differences)
    all_means: bool = False  # keep every posterior mean (MIG), not only the latent plot's
    factors: bool = False
    piece_examples: int = PIECE_EXAMPLES


@dataclass(frozen=True)
class Piece:
    """Batches [first, stop) of one shard's batches in stored order."""

    shard: str
    first: int
    stop: int

    def __str__(self) -> str:
        return f"{self.shard}[{self.first}:{self.stop}]"


def pieces(job: ScoringJob) -> list[Piece]:
    """The split's scoring tasks, in shard order: each shard's batches cut into pieces of at
    most about job.piece_examples examples (whole batches, within one batch of each other), and
    smaller where that would leave the split fewer than MIN_PIECES pieces."""
    entries = job.manifest.shards(job.split)
    total = sum(e.samples for e in entries)
    size = max(job.batch_size, min(job.piece_examples, -(-total // MIN_PIECES)))
    out = []
    for entry in entries:
        batches = -(-entry.samples // job.batch_size)
        count = max(1, min(batches, -(-entry.samples // size)))
        out += [
            Piece(entry.name, i * batches // count, (i + 1) * batches // count)
            for i in range(count)
        ]
    return out


@dataclass
class ShardScores:
    """One piece's sums and what the figures, MIG and the gate need of it."""

    shard: str  # the piece, as shard[first:stop]
    sums: EvalSums
    noted: Noted = field(default_factory=Noted)


def score_shard(
    job: ScoringJob, model: Autoencoder, piece: Piece, device: str = "cpu"
) -> ShardScores:
    model = model.to(device)
    url = f"{job.shards_dir}/{piece.shard}"
    entry = next(e for e in job.manifest.shards(job.split) if e.name == piece.shard)

    def batches() -> Iterator[dict]:
        window = (piece.first, piece.stop)  # the whole shard is read and checked
        for batch in shard_batches(url, entry, job.manifest, job.batch_size, job.factors, window):
            batch["noise_seeds"] = noise_seeds(batch["key"], job.seed)
            batch["iw"] = in_iw_subsample(batch["key"], job.iw_fraction)
            yield batch

    held_out = HeldOutPass(model, batches(), job.all_means)
    sums = score_batches(
        model, held_out, job.iw_k, mc_samples=job.mc_samples, seed=job.seed,
        per_example=job.per_example,
    )  # fmt: skip
    return ShardScores(str(piece), sums, held_out.noted())


def score_split(
    model: Autoencoder,
    job: ScoringJob,
    on_ray: bool,
    workers: int = 1,
    cpus: float = 1,
    gpu: bool = False,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[ShardScores]:
    """Every piece's scores, in shard and piece order: as Ray tasks (at most `workers` at once,
    each with `cpus` CPUs and a GPU if asked) or here, one piece after another."""
    todo = pieces(job)
    bar = tqdm(total=len(todo), desc=desc, unit="piece", disable=not progress)
    with bar:
        if not on_ray:
            out = []
            for piece in todo:
                out.append(score_shard(job, model, piece))
                bar.update()
            return out
        return _on_ray(model.cpu(), job, todo, workers, cpus, gpu, bar.update)


def _on_ray(
    model: Autoencoder,
    job: ScoringJob,
    todo: list[Piece],
    workers: int,
    cpus: float,
    gpu: bool,
    done: Callable[[], None],
) -> list[ShardScores]:
    import ray

    from pipelines.cluster import cancel_unfinished, task_error_line
    from pipelines.storage import is_remote, store_env

    options: dict = {"num_cpus": cpus, "num_gpus": 1 if gpu else 0}
    if is_remote(job.shards_dir):  # the store's keys, as training's workers get them
        options["runtime_env"] = {"env_vars": store_env()}
    task = ray.remote(_score_shard_task).options(**options)
    model_ref, job_ref = ray.put(model), ray.put(job)
    results: dict[Piece, ShardScores] = {}
    pending: dict = {}
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < max(1, workers):
                piece = queue.pop(0)
                pending[task.remote(job_ref, model_ref, piece, gpu)] = piece
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                results[pending[ref]] = ray.get(ref)
                del pending[ref]  # after the get: a failed one is still pending below
                done()
    except BaseException as exc:
        # Only unfinished tasks: cancelling a finished one trips a check in Ray's core worker
        # ("Tried to complete task that was not pending") that aborts this process.
        cancel_unfinished(list(pending))
        err = task_error_line(exc)
        if err is None:
            raise
        raise err from exc
    return [results[p] for p in todo]


def _score_shard_task(job: ScoringJob, model: Autoencoder, piece: Piece, gpu: bool) -> ShardScores:
    # Ray sets OMP_NUM_THREADS to the task's CPUs; torch reads it at import, a reused worker
    # process may hold another count, so set it for every task: same threads, same sums.
    import os

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return score_shard(job, model, piece, "cuda" if gpu else "cpu")


def on_cluster(
    cluster: ClusterParams, model: Autoencoder, job: ScoringJob, desc: str, progress: bool = True
) -> list[ShardScores]:
    """score_split where the cluster settings say: on Ray when a cluster is given (cluster.address or
    $RAY_ADDRESS) or this process already runs one (the retrain flow after training), at most
    cluster.num_workers (its max, when elastic) tasks at once; else here, where no Ray start
    (seconds) is worth it. The figures are the same either way."""
    import ray

    from pipelines.cluster import (
        check_resources,
        cluster_address,
        ensure_ray,
        signals_kept_through_ray,
    )

    c = cluster
    on_ray = bool(cluster_address(cluster)) or ray.is_initialized()
    if on_ray:
        ensure_ray(cluster)  # joins the cluster given, never one another run left behind
        check_resources(cluster)  # workers it could never place: one line
    with signals_kept_through_ray():
        return score_split(
            model, job, on_ray, c.max_workers, c.cpus_per_worker, c.use_gpu, desc, progress
        )


def merge(parts: list[ShardScores], latent_dim: int) -> tuple[EvalSums, list[Noted]]:
    """The whole split's sums, merged in piece order (so the float64 sums do not depend on the
    order tasks finished), and each piece's noted extras."""
    sums = EvalSums(latent_dim, per_example=all(p.sums.per_example is not None for p in parts))
    for part in parts:
        sums.merge(part.sums)
    return sums, [p.noted for p in parts]


def per_example_neg_elbo(parts: list[ShardScores]) -> np.ndarray:
    return np.concatenate([p.sums.per_example_neg_elbo().numpy() for p in parts])
