"""The `train` stage: Ray Train DDP workers over the staged shards, tracked in MLflow.

The driver creates (or resumes) the MLflow run, launches the workers, and exports the best
checkpoint's model to `<outputs>/train/model` for the evaluate and register stages.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.errors import PipelineError
from pipelines.params import Params
from pipelines.shards import read_manifest, verify_shards
from pipelines.train_worker import (
    MODEL_DIR,
    STATE_FILE,
    WorkerJob,
    load_state,
    log_epochs,
    train_loop_per_worker,
)
from pipelines.versioning import data_version
from vae import load_model
from vae.errors import VAEError


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
    num_workers: int
    data_version: dict[str, str | None]
    likelihood: str
    skipped_shards: int = 0  # corrupt shards skipped over all epochs (data.on_corrupt: skip)
    worker_nodes: list[str] = field(default_factory=list)  # Ray node id of each rank, by rank
    # The epoch the last start of the workers began at: 0 for a fresh run, later when they
    # resumed from a checkpoint (a re-launched run, or Ray restarting failed workers).
    started_at_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_dir(params: Params) -> Path:
    return params.resolve(params.outputs_dir) / "train"


def default_run_name(params: Params, data_hash: str) -> str:
    """Same params + same data => same name => a re-run resumes instead of starting over."""
    relevant = params.model_dump(mode="json", include={"model", "train"})
    relevant["train"].pop("ray_address", None)
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
    return f"vae-{data_hash[:8]}-{digest[:8]}"


def ensure_ray(params: Params) -> None:
    import ray

    if ray.is_initialized():
        return
    address = params.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    need = int(params.train.num_workers * params.train.cpus_per_worker + 0.999)
    # "local": a Ray of our own. Without it ray.init joins whatever cluster the last `ray start`
    # on this machine left running (Ray's ray_current_cluster file), someone else's included.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)


def _storage(params: Params) -> str:
    path = params.train.storage_path
    return path if "://" in path else str(params.resolve(path))


def _worker_error(exc: Exception) -> Exception | None:
    """The user-fixable error behind a Ray training failure, if there is one: ours, or a full
    disk (an OSError with ENOSPC)."""
    failures = getattr(exc, "worker_failures", None) or {}
    for err in [*failures.values(), getattr(exc, "controller_failure", None), exc.__cause__]:
        while err is not None:
            if isinstance(err, VAEError):
                return err
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                return err
            err = getattr(err, "cause", None) or err.__cause__
    return None


def train_model(params: Params, progress: bool = True) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    shards_dir = params.resolve(params.data.shards_dir)
    manifest = read_manifest(shards_dir)
    version = data_version(params.root, shards_dir)
    shape = tuple(manifest["sample"]["shape"])
    model_cfg = params.model.to_config(shape)  # validates before anything starts
    train_cfg = params.train.to_config()
    if params.data.on_corrupt == "raise":
        verify_shards(shards_dir, ("train", "val"))
    run_name = params.train.run_name or default_run_name(params, version["manifest_sha256"])
    storage = _storage(params)
    run_dir = Path(storage) / run_name if "://" not in storage else train_dir(params) / run_name

    tracking.check_reachable(params)
    uri = tracking.tracking_uri(params)
    tags = {
        "git_commit": tracking.git_commit(params.root),
        "data.manifest_sha256": version["manifest_sha256"],
        "data.dvc_md5": str(version["dvc_md5"]),
        "data.source": str(manifest["source"]["name"]),
        "ray.num_workers": str(params.train.num_workers),
        "ray.use_gpu": str(params.train.use_gpu),
        "likelihood": model_cfg.likelihood,
        "vae.run_name": run_name,
    }
    run_id = tracking.start_or_resume_run(params, run_name, run_dir, tags)

    job = WorkerJob(
        model=model_cfg.to_dict(),
        train=asdict(train_cfg),
        shards_dir=str(shards_dir),
        batch_size=params.train.batch_size,
        loader_workers=params.train.loader_workers,
        precision=params.train.precision,
        tracking_uri=uri,
        mlflow_run_id=run_id,
        on_corrupt=params.data.on_corrupt,
        shuffle_buffer=params.data.shuffle_buffer,
        progress=progress,
    )
    client = tracking.client(params)
    finished = _finished(run_dir, job, params, version)
    if finished is not None:
        # This exact job already ran to its end: Ray would resume, find no epoch left and
        # return the same checkpoints, after 20-30 s of starting workers. Export them directly.
        exported = _write_outputs(
            params, Path(finished["best"]), Path(finished["latest"]), run_name, run_id, uri,
            version, model_cfg.likelihood, finished["early_stopped"], finished["worker_nodes"],
            started_at_epoch=None,
        )  # fmt: skip
        _finish_run(client, exported)
        return exported
    ensure_ray(params)
    # Ray Train drains each worker's report queue once per controller poll (2 s by default),
    # which made every epoch on small data cost 2 s; poll faster unless the user chose a value.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(job),
        scaling_config=ray.train.ScalingConfig(
            num_workers=params.train.num_workers,
            use_gpu=params.train.use_gpu,
            resources_per_worker={"CPU": params.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=params.train.max_failures),
            # Keeps the best-scoring checkpoint; Ray always keeps the latest too.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="score", checkpoint_score_order="min"
            ),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        _mark_failed(client, run_id)
        cause = _worker_error(exc)
        if isinstance(cause, OSError):
            raise PipelineError(
                f"training failed: {os.strerror(cause.errno).lower()} while writing under {storage} or a "
                f"temp folder; free space and re-run: the run '{run_name}' resumes from its "
                "latest complete checkpoint"
            ) from exc
        if cause is not None:
            raise PipelineError(f"training failed: {cause}") from exc
        raise PipelineError(
            f"training failed in Ray ({type(exc).__name__}); see the worker log above, fix it "
            f"and re-run: the run '{run_name}' resumes from its latest checkpoint"
        ) from exc
    fatal = (result.return_value or {}).get("fatal_error")
    if fatal:
        _mark_failed(client, run_id)
        raise PipelineError(f"training stopped: {fatal}")
    exported = _export(params, result, run_name, run_id, uri, version, model_cfg.likelihood)
    if "://" not in storage:
        _record_finished(run_dir, job, params, version, exported, result.checkpoint.path)
    _finish_run(client, exported)
    return exported


_FINISHED = "finished.json"


def _job_key(job: WorkerJob, params: Params, version: dict) -> str:
    """What decides a run's checkpoints: model, training, data and worker count (not where
    it logs, nor whether it shows progress)."""
    what = asdict(job) | {
        "num_workers": params.train.num_workers,
        "data": version["manifest_sha256"],
    }
    for volatile in ("tracking_uri", "mlflow_run_id", "progress"):
        what.pop(volatile)
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _record_finished(run_dir, job, params, version, res: TrainResult, latest: str) -> None:
    record = {
        "job": _job_key(job, params, version),
        "best": res.checkpoint,
        "latest": latest,
        "early_stopped": res.early_stopped,
        "worker_nodes": res.worker_nodes,
    }
    tmp = run_dir / f".{_FINISHED}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, run_dir / _FINISHED)


def _finished(run_dir: Path, job, params, version) -> dict | None:
    """The record of this exact job's completed run, if its checkpoints are still there."""
    try:
        record = json.loads((run_dir / _FINISHED).read_text())
    except (OSError, ValueError):
        return None
    if record.get("job") != _job_key(job, params, version):
        return None
    for key in ("best", "latest"):
        if not (Path(str(record.get(key))) / STATE_FILE).is_file():
            return None
    return record


def _mark_failed(client, run_id: str) -> None:
    """Best effort: the training error is what the user needs, not a second one from MLflow."""
    with contextlib.suppress(Exception):
        client.set_terminated(run_id, status="FAILED")


def _finish_run(client, res: TrainResult) -> None:
    """Log the epochs MLflow lacks (rank 0 trains on when the server goes away), tag where the
    ranks ran, attach the learning curve and close the run."""
    out = Path(res.model_dir).parent
    history = json.loads((out / "history.json").read_text())
    try:
        logged = {m.step for m in client.get_metric_history(res.mlflow_run_id, "val_neg_elbo")}
        log_epochs(client, res.mlflow_run_id, [h for h in history if h["epoch"] not in logged])
        client.set_tag(res.mlflow_run_id, "ray.worker_nodes", ",".join(res.worker_nodes))
        client.log_artifact(res.mlflow_run_id, str(out / "learning_curve.csv"))
        client.set_terminated(res.mlflow_run_id, status="FINISHED")
    except Exception as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"training finished and its best model is in {res.model_dir}, but MLflow at "
            f"{res.tracking_uri} stopped answering ({why[:200]}); start it and re-run the same "
            f"train command: run '{res.run_name}' resumes at its end and logs what MLflow lacks"
        ) from exc


def _export(params, result, run_name, run_id, uri, version, likelihood) -> TrainResult:
    """The Ray result's best and latest checkpoints -> outputs (see _write_outputs)."""
    try:
        best = result.get_best_checkpoint(metric="score", mode="min")
    except RuntimeError:  # Ray: "No checkpoint exists in the trial directory!"
        best = None
    if best is None:
        raise PipelineError(f"run '{run_name}' reported no checkpoint; nothing to export")
    returned = result.return_value or {}
    with best.as_directory() as best_dir, result.checkpoint.as_directory() as latest_dir:
        return _write_outputs(
            params, Path(best_dir), Path(latest_dir), run_name, run_id, uri, version,
            likelihood, bool(result.metrics.get("early_stopped", False)),
            list(returned.get("node_ids") or []), int(returned.get("start_epoch") or 0),
            best_path=best.path,
        )  # fmt: skip


def _write_outputs(
    params, best_dir: Path, latest_dir: Path, run_name, run_id, uri, version, likelihood,
    early_stopped: bool, worker_nodes: list[str], started_at_epoch: int | None,
    best_path: str | None = None,
) -> TrainResult:  # fmt: skip
    """Best checkpoint's model -> outputs/train/model; history -> JSON + CSV for DVC plots.
    started_at_epoch None: nothing ran (the run had already finished)."""
    out = train_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    best_metrics = json.loads((best_dir / "metrics.json").read_text())
    load_model(best_dir / MODEL_DIR)  # refuse to export a model that does not load
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best_dir / MODEL_DIR, tmp)
    history = load_state(latest_dir / STATE_FILE)["history"]
    old = out / ".model.old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / "model").exists():
        os.replace(out / "model", old)
    os.replace(tmp, out / "model")
    shutil.rmtree(old, ignore_errors=True)
    _write_history(out, history)
    res = TrainResult(
        run_name=run_name,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        model_dir=str(out / "model"),
        checkpoint=best_path or str(best_dir),
        best_epoch=int(best_metrics["epoch"]),
        best_val_neg_elbo=float(best_metrics["val_neg_elbo"]),
        epochs_run=len(history),
        early_stopped=early_stopped,
        num_workers=params.train.num_workers,
        data_version=version,
        likelihood=likelihood,
        skipped_shards=sum(int(h.get("skipped_shards", 0)) for h in history),
        worker_nodes=worker_nodes,
        started_at_epoch=len(history) if started_at_epoch is None else started_at_epoch,
    )
    (out / "train_result.json").write_text(json.dumps(res.to_dict(), indent=2))
    return res


def _write_history(out: Path, history: list[dict]) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=2))
    with open(out / "learning_curve.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_loss", "val_neg_elbo"])
        for rec in history:
            writer.writerow([rec["epoch"], rec["train_loss"], rec["val_neg_elbo"]])
