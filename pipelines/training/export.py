"""What a finished training leaves: the best checkpoint's model in outputs/train/model, its
history for DVC plots, and train_result.json, the same record --json prints."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines import atomic
from pipelines.atomic import atomic_path, atomic_write_text
from pipelines.errors import PipelineError
from pipelines.guards import (
    mark_own_folder,
)
from pipelines.params import ClusterParams
from pipelines.training.worker import (
    MODEL_DIR,
    STATE_FILE,
    load_state,
)
from vae import load_model


@dataclass
class TrainResult:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    model_dir: str
    checkpoint: str
    best_epoch: int
    best_val_neg_elbo: float
    epochs_run: int
    early_stopped: bool
    num_workers: int  # the ranks of the workers' last start (elastic: what was live then)
    data_version: dict[str, str | None]
    likelihood: str
    skipped_shards: int = 0  # corrupt shards skipped over all epochs (data.on_corrupt: skip)
    objective: str = "elbo"  # what the model was trained on: elbo, iwae (k=...), free bits
    # Set when this call trained nothing: the same params and data had finished this run.
    reused: str | None = None
    worker_nodes: list[str] = field(default_factory=list)  # Ray node id of each rank, by rank
    # The epoch the last start of the workers began at: 0 for a fresh run, later when they
    # resumed from a checkpoint (a re-launched run, or Ray restarting failed workers).
    started_at_epoch: int = 0
    data_source: str | None = None  # the staged source's name (manifest.json), e.g. digits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunIdentity:
    """Which run a training result belongs to, and what it trained on."""

    run_name: str
    run_id: str
    uri: str
    version: dict
    likelihood: str
    objective: str
    data_source: str | None = None


@dataclass(frozen=True)
class Checkpoints:
    """Where a run's checkpoints are and how it ended."""

    best_dir: Path
    latest_dir: Path
    early_stopped: bool
    worker_nodes: list[str]
    started_at_epoch: int | None  # None: nothing ran (the run had already finished)
    best_path: str | None = None  # the best checkpoint's storage path, if not best_dir


def export(out: Path, cluster: ClusterParams, result, run: RunIdentity) -> TrainResult:
    """The Ray result's best and latest checkpoints -> outputs (see write_outputs)."""
    try:
        best = result.get_best_checkpoint(metric="score", mode="min")
    except RuntimeError:  # Ray: "No checkpoint exists in the trial directory!"
        best = None
    if best is None:
        raise PipelineError(f"run '{run.run_name}' reported no checkpoint; nothing to export")
    returned = result.return_value or {}
    with best.as_directory() as best_dir, result.checkpoint.as_directory() as latest_dir:
        ckpts = Checkpoints(
            Path(best_dir), Path(latest_dir), bool(result.metrics.get("early_stopped", False)),
            list(returned.get("node_ids") or []), int(returned.get("start_epoch") or 0),
            best_path=best.path,
        )  # fmt: skip
        return write_outputs(out, cluster, run, ckpts)


def write_outputs(
    out: Path,
    cluster: ClusterParams,
    run: RunIdentity,
    ckpts: Checkpoints,
    reused: str | None = None,
) -> TrainResult:
    """Best checkpoint's model -> outputs/train/model; history -> JSON + CSV for DVC plots;
    the result -> train_result.json, the same record --json prints (a reuse says so in both)."""
    best_dir, latest_dir = ckpts.best_dir, ckpts.latest_dir
    mark_own_folder(out)
    best_metrics = json.loads((best_dir / "metrics.json").read_text())
    load_model(best_dir / MODEL_DIR)  # refuse to export a model that does not load
    history = load_state(latest_dir / STATE_FILE)["history"]
    _replace_dir(best_dir / MODEL_DIR, out / "model")
    _write_history(out, history)
    res = TrainResult(
        run_name=run.run_name,
        mlflow_run_id=run.run_id,
        tracking_uri=run.uri,
        model_dir=str(out / "model"),
        checkpoint=ckpts.best_path or str(best_dir),
        best_epoch=int(best_metrics["epoch"]),
        best_val_neg_elbo=float(best_metrics["val_neg_elbo"]),
        epochs_run=len(history),
        early_stopped=ckpts.early_stopped,
        num_workers=len(ckpts.worker_nodes) or cluster.max_workers,
        data_version=run.version,
        likelihood=run.likelihood,
        objective=run.objective,
        skipped_shards=sum(int(h.get("skipped_shards", 0)) for h in history),
        reused=reused,
        worker_nodes=ckpts.worker_nodes,
        started_at_epoch=(
            len(history) if ckpts.started_at_epoch is None else ckpts.started_at_epoch
        ),
        data_source=run.data_source,
    )
    atomic_write_text(out / "train_result.json", json.dumps(res.to_dict(), indent=2))
    return res


def _replace_dir(src: Path, dest: Path) -> None:
    """dest <- a copy of src, swapped in whole. Whatever fails or interrupts it, no temporary
    folder stays behind and dest is the old or the new folder, never a mix."""
    try:
        atomic.replace_dir(src, dest)
    except OSError as exc:
        raise PipelineError(
            f"cannot export the trained model to {dest} ({_os_reason(exc)}); free space or fix "
            "permissions there and re-run train: it exports from its checkpoints again, and "
            "the previous model there is unchanged"
        ) from exc


def _os_reason(exc: OSError) -> str:
    """What went wrong, in words; shutil.copytree gathers per-file errors into one list."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        found = re.search(r"\[Errno (\d+)\]", str(exc.args[0][0][-1]) if exc.args[0] else "")
        if found:
            return os.strerror(int(found[1])).lower()
    return (exc.strerror or type(exc).__name__).lower()


def _write_history(out: Path, history: list[dict]) -> None:
    atomic_write_text(out / "history.json", json.dumps(history, indent=2))
    with atomic_path(out / "learning_curve.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_loss", "val_neg_elbo"])
        for rec in history:
            writer.writerow([rec["epoch"], rec["train_loss"], rec["val_neg_elbo"]])
