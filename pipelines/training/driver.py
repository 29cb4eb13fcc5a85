"""The `train` stage: Ray Train DDP workers over the staged shards, tracked in MLflow.

The driver creates (or resumes) the MLflow run, launches the workers, and exports the best
checkpoint's model to `<outputs>/train/model` for the evaluate and register stages.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pipelines import tracking, tracking_checks
from pipelines.atomic import atomic_write_text
from pipelines.cluster import (
    check_resources,
    cluster_address,
    ensure_ray,
    serves_state_api,
    signals_kept_through_ray,
)
from pipelines.data.shards.manifest import Manifest, read_manifest
from pipelines.data.shards.reader import verify_shards
from pipelines.data.versioning.lineage import data_version, dvc_record
from pipelines.errors import PipelineError
from pipelines.params import ClusterParams
from pipelines.storage import is_remote, resolve_in, store_env
from pipelines.training.export import Checkpoints, RunIdentity, TrainResult, export, write_outputs
from pipelines.training.job import TrainJob
from pipelines.training.preflight import check_before_start
from pipelines.training.progress import epoch_bar
from pipelines.training.worker import (
    STATE_FILE,
    WorkerJob,
    log_epochs,
    train_loop_per_worker,
)
from vae.errors import VAEError


def _storage(cluster: ClusterParams, root: Path) -> str:
    path = cluster.storage_path
    return path if "://" in path else str(resolve_in(root, path))


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


MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"  # mlflow.utils.mlflow_tags, without importing it


def _run_tags(
    root: Path, cluster: ClusterParams, version: dict, manifest: Manifest, model_cfg, run_name: str
):
    """What the MLflow run records of where it came from: code, data, scaling, likelihood and
    training objective."""
    commit = tracking.git_commit(root)
    # MLflow's own key, which its UI shows with the run; git_commit keeps the -dirty mark.
    head = {} if commit == "unknown" else {MLFLOW_GIT_COMMIT: commit.removesuffix("-dirty")}
    return (
        head
        | {
            "git_commit": commit,
            "data.manifest_sha256": version["manifest_sha256"],
            "data.dvc_md5": str(version["dvc_md5"]),
            "data.source": manifest.source.name,
            "ray.num_workers": cluster.workers_text(),
            "ray.use_gpu": str(cluster.use_gpu),
            "likelihood": model_cfg.likelihood,
            "objective": model_cfg.objective_name,
            "vae.run_name": run_name,
        }
        | _experiment_tag()
    )


def _experiment_tag() -> dict[str, str]:
    """Under `dvc exp run`, the DVC experiment's name (DVC sets DVC_EXP_NAME for each stage
    command): the MLflow run and the experiment find each other by it."""
    name = tracking.dvc_experiment()
    return {"dvc.experiment": name} if name else {}


def train_model(job: TrainJob, progress: bool = True) -> TrainResult:
    """The train stage: check everything, then Ray Train DDP (or the finished run's
    checkpoints), export the best model, close the MLflow run."""
    store, cluster = job.store, job.cluster
    shards_dir, out = job.where.shards_dir, job.where.train_dir
    manifest = read_manifest(shards_dir)
    version = data_version(job.root, shards_dir)
    model_cfg = job.model.to_config(manifest.shape)  # validates before anything starts
    train_cfg = job.train.to_config()
    if job.data.on_corrupt == "raise":
        verify_shards(shards_dir, ("train", "val"))
    run_name = job.run_name(version["manifest_sha256"])
    storage = _storage(cluster, job.root)
    run_dir = Path(storage) / run_name if "://" not in storage else out / run_name

    check_before_start(job, manifest, storage, run_dir)
    tracking_checks.check_reachable(store)
    uri = store.uri
    tags = _run_tags(job.root, cluster, version, manifest, model_cfg, run_name)
    tags |= dict(job.extra_tags)  # a sweep's trial: its parent run, its overrides
    worker = _worker_job(job, model_cfg, train_cfg, shards_dir, uri)
    finished = _finished(run_dir, worker, version)
    if finished is None:
        check_resources(cluster)
    run_id = tracking.start_or_resume_run(store, job.logged_params, run_name, run_dir, tags)
    worker = replace(worker, mlflow_run_id=run_id)
    client = tracking.client(store)
    for key, value in job.extra_tags:  # a resumed (or reused) run joins the sweep too
        client.set_tag(run_id, key, value)
    extra = dvc_record(job.root, shards_dir)
    inputs = tracking.shard_inputs(manifest, version, str(shards_dir), extra)
    tracking.log_data_inputs(client, run_id, inputs)  # again on resume: MLflow keeps one each
    run = RunIdentity(
        run_name, run_id, uri, version, model_cfg.likelihood, model_cfg.objective_name,
        manifest.source.name,
    )  # fmt: skip
    with run_closed_on_failure(client, run_id):
        if finished is not None:
            # This exact job already ran to its end: Ray would resume, find no epoch left and
            # return the same checkpoints, after 20-30 s of starting workers. Export them.
            done = Checkpoints(
                Path(finished["best"]), Path(finished["latest"]), finished["early_stopped"],
                finished["worker_nodes"], started_at_epoch=None,
            )  # fmt: skip
            note = _reuse_note(cluster, run_name)
            exported = write_outputs(out, cluster, run, done, reused=note)
        else:
            ensure_ray(cluster)  # its one line about logs: before the bar, not inside it
            with epoch_bar(client, run_id, train_cfg.epochs, progress):
                result = _fit(cluster, worker, run_name, storage, job.report_to_tune)
            exported = export(out, cluster, result, run)
            if "://" not in storage:
                _record_finished(run_dir, worker, version, exported, result.checkpoint.path)
        _finish_run(client, exported)
    return exported


def _worker_job(job: TrainJob, model_cfg, train_cfg, shards_dir, uri: str) -> WorkerJob:
    cluster, data = job.cluster, job.data
    return WorkerJob(
        model=model_cfg.to_dict(),
        train=asdict(train_cfg),
        shards_dir=str(shards_dir),
        batch_size=job.train.batch_size,
        batch_parts=job.batch_parts,
        loader_workers=cluster.loader_workers,
        precision=cluster.precision,
        tracking_uri=uri,
        mlflow_run_id="",  # set once the run exists, after every check
        on_corrupt=data.on_corrupt,
        shuffle_buffer=data.shuffle_buffer,
        progress=False,  # the driver's bar (progress.py) replaces rank 0's per-epoch lines
    )


def _reuse_note(cluster: ClusterParams, run_name: str) -> str:
    """Why nothing trained, said once: a silent reuse looks like a very fast training."""
    address = cluster_address(cluster) or "a local Ray"
    return (
        f"reused the finished run {run_name} (same params and data): nothing trained, no Ray "
        f"started (it would have used {address}); to train again set cluster.run_name or "
        "change a model/train setting"
    )


@contextlib.contextmanager
def run_closed_on_failure(client, run_id: str):
    """Whatever stops the training after its MLflow run exists leaves the run KILLED (Ctrl-C,
    or SIGTERM as pipelines.errors.Interrupted) or FAILED, never RUNNING; the error goes on
    to the CLI, which prints it as one line."""
    try:
        yield
    except KeyboardInterrupt:
        _end_run(client, run_id, "KILLED")
        raise
    except BaseException:
        _end_run(client, run_id, "FAILED")
        raise


def _trainer_class(base: type) -> type:
    """TorchTrainer with Ctrl-C as a KeyboardInterrupt. Ray Train's own SIGINT handler aborts
    the run and then exits the process with SystemExit (code 1, no word), or lets fit() return
    the aborted run as if it had finished. Ours aborts the run the same way, then raises, so
    the MLflow run ends KILLED and the CLI prints its one line and exits 130. Without a
    dashboard on the cluster it leaves out Ray Train's placement-group cleaner, which then
    only delays the end (pipelines.cluster.serves_state_api); without a Ray Dataset (the
    workers read shards themselves) the datasets callback, whose DatasetManager actor held
    every start about 1.3 s on 2 cores."""
    import ray

    cleaner_works = serves_state_api()

    class Trainer(base):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            left_out = set() if cleaner_works else {"PlacementGroupCleanerCallback"}
            if not self.datasets:  # its DatasetManager actor would serve no Ray Dataset
                left_out.add("DatasetsCallback")
            return [c for c in callbacks if type(c).__name__ not in left_out]

        def _register_sigint_handler(self, controller) -> None:
            if threading.current_thread() is not threading.main_thread():
                return

            def on_sigint(signum: int, frame: Any) -> None:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: now
                with contextlib.suppress(Exception):
                    ray.get(controller.abort.remote(), timeout=30)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

    return Trainer


def _fit(cluster: ClusterParams, job: WorkerJob, run_name: str, storage: str, tune: bool = False):
    """Ray Train over the job; its failures as one-line PipelineErrors. tune: the run is a
    sweep's trial, and Ray Tune gets each report (TuneReportCallback, Train v2's way)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    ensure_ray(cluster)
    # Ray Train drains each worker's report queue once per controller poll (2 s by default),
    # which made every epoch on small data cost 2 s; poll faster unless the user chose a value.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    trainer = _trainer_class(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config=asdict(job),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cluster.num_workers,  # (min, max): elastic
            use_gpu=cluster.use_gpu,
            resources_per_worker={"CPU": cluster.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
            # Keeps the best-scoring checkpoint; Ray always keeps the latest too (with 2 it kept
            # the second best as well: three folders, not the two docs/training.md promises).
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="score", checkpoint_score_order="min"
            ),
            # Workers read shards on object storage with the driver's endpoint and credentials
            # (Ray keeps runtime envs in memory; they are never written with the checkpoints).
            worker_runtime_env={"env_vars": store_env()} if is_remote(job.shards_dir) else None,
            callbacks=_tune_callbacks() if tune else None,
        ),
    )
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        with signals_kept_through_ray():
            result = trainer.fit()
    except Exception as exc:
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
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_sigint)
    fatal = (result.return_value or {}).get("fatal_error")
    if fatal:
        raise PipelineError(f"training stopped: {fatal}")
    return result


def _tune_callbacks() -> list:
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


_FINISHED = "finished.json"


def _job_key(job: WorkerJob, version: dict) -> str:
    """What decides a run's checkpoints: model, training (its batch parts among them) and
    data; not the worker count, which only shares the parts out (nor where it logs, nor
    whether it shows progress)."""
    what = asdict(job) | {"data": version["manifest_sha256"]}
    for volatile in ("tracking_uri", "mlflow_run_id", "progress"):
        what.pop(volatile)
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _record_finished(run_dir, job, version, res: TrainResult, latest: str) -> None:
    record = {
        "job": _job_key(job, version),
        "best": res.checkpoint,
        "latest": latest,
        "early_stopped": res.early_stopped,
        "worker_nodes": res.worker_nodes,
    }
    atomic_write_text(run_dir / _FINISHED, json.dumps(record, indent=2))


def _finished(run_dir: Path, job, version) -> dict | None:
    """The record of this exact job's completed run, if its checkpoints are still there."""
    try:
        record = json.loads((run_dir / _FINISHED).read_text())
    except (OSError, ValueError):
        return None
    if record.get("job") != _job_key(job, version):
        return None
    for key in ("best", "latest"):
        if not (Path(str(record.get(key))) / STATE_FILE).is_file():
            return None
    return record


def _end_run(client, run_id: str, status: str) -> None:
    """Best effort: the training error is what the user needs, not a second one from MLflow."""
    with contextlib.suppress(Exception):
        client.set_terminated(run_id, status=status)


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
