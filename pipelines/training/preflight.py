"""Checks before training starts Ray or an MLflow run, each failing in one line: the shards per
worker, the run folder, and outputs that belong to another dataset or to no one."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.data.shards.assignment import assign_shards
from pipelines.data.shards.manifest import Manifest
from pipelines.errors import PipelineError
from pipelines.guards import (
    check_not_workspace,
    check_own_folder,
    check_replaceable_dir,
    check_writable,
)
from pipelines.training.batch_parts import part_size, rank_parts
from pipelines.training.job import TrainJob
from vae.io import CONFIG, WEIGHTS


def check_before_start(job: TrainJob, manifest: Manifest, storage: str, run_dir: Path) -> None:
    """What train can check before it starts Ray or an MLflow run: workers against shards,
    and the folders it writes."""
    cluster, root = job.cluster, job.root
    part_size(job.train.batch_size, job.batch_parts)  # equal parts, or one line
    rank_parts(job.batch_parts, cluster.max_workers, 0)  # a part for every worker
    check_shards_per_part(job.batch_parts, cluster.loader_workers, manifest)
    out = job.where.train_dir
    _check_same_dataset(out, manifest.source.name, job.register_name)
    check_not_workspace(out, root, "outputs_dir")
    check_writable(out, "outputs_dir")
    # The exported model replaces <outputs>/train/model whole: only a model we wrote.
    check_replaceable_dir(
        out / "model",
        root,
        "outputs_dir",
        lambda p: p.name in (CONFIG, WEIGHTS, "metadata.json"),
    )
    # history.json, learning_curve.csv, train_result.json: overwritten only in a folder of ours.
    check_own_folder(out, "outputs_dir", _our_train_result)
    if "://" in storage:
        return
    check_not_workspace(Path(storage), root, "cluster.storage_path")
    check_writable(Path(storage), "cluster.storage_path")
    check_not_workspace(run_dir, root, "cluster.run_name")
    _check_run_dir(run_dir)


def _our_train_result(out: Path) -> bool:
    """Train's output from before the owner mark: a train_result.json of ours."""
    try:
        result = json.loads((out / "train_result.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and {"run_name", "mlflow_run_id"} <= set(result)


def _check_same_dataset(out: Path, source: str, name: str) -> None:
    """A model of another dataset in outputs_dir is that dataset's, with its figures and
    registered models beside it: train refuses to replace it (staging another source into the
    same shards folder is how it would happen) and says how to keep both."""
    try:
        theirs = json.loads((out / "train_result.json").read_text()).get("data_source")
    except (OSError, ValueError, AttributeError):
        return
    if theirs and theirs != source:
        raise PipelineError(
            f"outputs_dir: {out} holds the {theirs} model ({name}); the staged data is {source}. "
            f"Give each dataset its own outputs and registered models: --set "
            f"outputs_dir=outputs/{source} --set register.name={source}-vae (or a params file "
            "per dataset), or move that folder away"
        )


def is_training_run_dir(path: Path) -> bool:
    """A folder of this pipeline's training run: the MLflow run id the driver writes first, or
    Ray's checkpoint_* folders."""
    return (path / "mlflow_run_id").is_file() or any(
        e.name.startswith("checkpoint_") and e.is_dir() for e in path.iterdir()
    )


def _check_run_dir(run_dir: Path) -> None:
    """A run folder that exists must be one of ours (checkpoints, or the MLflow run id that
    start_or_resume_run writes first): Ray writes into it and prunes checkpoints there."""
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if not run_dir.is_dir():
        raise PipelineError(
            f"cluster.storage_path: the run folder {run_dir} exists and is not a folder; remove "
            "it or choose another cluster.run_name"
        )
    entries = sorted(run_dir.iterdir())
    if entries and not is_training_run_dir(run_dir):
        raise PipelineError(
            f"cluster.storage_path: the run folder {run_dir} holds {entries[0].name} but no "
            "checkpoint_* folder or mlflow_run_id, so it is not a training run of this pipeline; "
            "remove or empty it, or choose another cluster.run_name or cluster.storage_path"
        )


def check_shards_per_part(parts: int, loader_workers: int, manifest: Manifest) -> None:
    """Each part's loader workers need a shard each, in the train and the val split: checked
    here from the manifest, with the loaders' own plan, instead of inside every worker."""
    need = max(1, loader_workers)
    for split in ("train", "val"):
        entries = manifest.shards(split)
        plan = assign_shards([e.samples for e in entries], parts)
        fewest = min(len(p) for p in plan)
        if fewest < need:
            raise PipelineError(
                f"train.batch_parts={parts} x cluster.loader_workers={loader_workers} needs at "
                f"least {need} {split} shard(s) per part, but split {split} has {len(entries)} "
                f"shard(s), so a part would get {fewest}; re-stage with "
                f"data.min_shards_per_split >= {parts * need} or lower train.batch_parts / "
                "cluster.loader_workers"
            )
