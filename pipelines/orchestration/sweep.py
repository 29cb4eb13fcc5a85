"""The `sweep` command: a grid or random search over model.* and train.* settings, each trial a
`train` run on Ray Tune, and the best trial by validation -ELBO then evaluated and put through
the promotion gate like any retrain (the same train, evaluate and register functions).

MLflow: one parent run named for the sweep; each trial's training run is its child (tag
mlflow.parentRunId), holding the trial's params, per-epoch validation metrics and, for the best
(or every trial with --evaluate-all), the test metrics. Nothing is left RUNNING: a trial cut off
by the time budget or an interrupt ends KILLED, the parent KILLED or FAILED with the sweep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines import tracking, tracking_checks
from pipelines.cluster import check_resources, cluster_address, ensure_ray
from pipelines.data.shards.manifest import Manifest, read_manifest
from pipelines.data.versioning.lineage import data_version
from pipelines.errors import PipelineError
from pipelines.evaluation.evaluate import evaluate_model
from pipelines.orchestration.sweep_job import SweepJob, SweepResult, trial_folder
from pipelines.registry.register import register_model
from pipelines.storage import resolve_in
from pipelines.training.driver import run_closed_on_failure, train_model
from pipelines.training.job import TrainJob
from pipelines.training.preflight import check_before_start
from pipelines.training.sweep_plan import TrialOutcome, best_trial, concurrent_trials
from pipelines.training.tune_trials import TrialsJob, run_trials
from vae.errors import VAEError

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own key: its UI nests a child run under its parent


def sweep_name(data_hash: str, run_names: list[str]) -> str:
    """The same trials on the same data -> the same name, so a re-run sweep continues its
    parent run, and each trial reuses or resumes its own checkpoints."""
    digest = hashlib.sha256(json.dumps(run_names).encode()).hexdigest()
    return f"sweep-{data_hash[:8]}-{digest[:8]}"


def _storage(job: TrainJob) -> Path:
    path = job.cluster.storage_path
    if "://" in path:
        raise PipelineError(
            f"cluster.storage_path {path}: a sweep keeps its trials' checkpoints in a folder "
            "(local, or shared by the cluster's nodes such as NFS); object storage is not "
            "supported for sweeps yet. Set cluster.storage_path to a folder"
        )
    return resolve_in(job.root, path)


def _in_own_folder(job: TrainJob, folder: Path, tags: dict[str, str]) -> TrainJob:
    return replace(job, where=replace(job.where, outputs_dir=str(folder)),
                   extra_tags=tuple(tags.items()))  # fmt: skip


def _check_trials(job: SweepJob, manifest: Manifest, storage: Path, names: list[str]) -> None:
    """Everything each trial's train would check first, done for all before Ray starts: the
    model against the data, the batch against the workers, the folders each one writes; and
    that no two trials are one training run (values the schema reads alike: 1 and 1.0)."""
    for i, name in enumerate(names):
        if name in names[:i]:
            first = job.plans[names.index(name)]
            raise PipelineError(
                f"trials {' '.join(first)} and {' '.join(job.plans[i])} have the same settings "
                "(one training run); list each value once"
            )
    for trial, name, plan in zip(job.trials, names, job.plans, strict=True):
        try:
            trial.model.to_config(manifest.shape)
            check_before_start(trial, manifest, str(storage), storage / name)
        except VAEError as exc:
            raise PipelineError(f"trial {' '.join(plan)}: {exc}") from exc


def _concurrency(job: SweepJob) -> int:
    """What the cluster fits; one at a time on an SQLite store (one writer at a time: several
    trials logging at once fail with 'database is locked'; an MLflow server takes them all)."""
    import ray

    cluster = job.base.cluster
    if job.base.store.uri.startswith("sqlite:"):
        return 1
    res = ray.cluster_resources()
    return concurrent_trials(
        len(job.trials), float(res.get("CPU", 0)), float(res.get("GPU", 0)),
        cluster.max_workers, cluster.cpus_per_worker, cluster.use_gpu,
    )  # fmt: skip


def _parent_run(job: SweepJob, name: str, storage: Path, version: dict) -> str:
    """The sweep's MLflow run (resumed when the same sweep runs again): the shared params, the
    search, the data version and the commit; the swept keys' base values are left out."""
    swept = {c.key for c in (*job.spec.grid, *job.spec.sample)}
    logged = {k: v for k, v in job.base.logged_params.items() if k not in swept}
    for c in (*job.spec.grid, *job.spec.sample):
        logged[f"sweep.{c.flag.removeprefix('--')}.{c.key}"] = ",".join(c.values)
    commit = tracking.git_commit(job.base.root)
    tags = {
        "vae.sweep": name,
        "sweep.search": json.dumps(job.spec.describe()),
        "git_commit": commit,
        "data.manifest_sha256": version["manifest_sha256"],
        "data.dvc_md5": str(version["dvc_md5"]),
    }
    return tracking.start_or_resume_run(job.base.store, logged, name, storage / name, tags)


def _close_children(client, store: tracking.Store, parent: str) -> None:
    """Trials cut off (time budget, interrupt) leave their run RUNNING: end them KILLED."""
    with contextlib.suppress(Exception):  # best effort: the sweep's own error matters more
        runs = client.search_runs(
            [tracking.experiment_id(store)],
            f"tags.`{PARENT_TAG}` = '{parent}' and attributes.status = 'RUNNING'",
        )
        for run in runs:
            client.set_terminated(run.info.run_id, status="KILLED")


@dataclass(frozen=True)
class _Sweep:
    """One sweep's identity once its checks passed: its name, parent run and where it runs."""

    name: str
    parent: str  # the parent MLflow run's id
    storage: Path
    run_names: tuple[str, ...]  # each trial's training run name
    concurrent: int


def run_sweep(job: SweepJob, progress: bool = True) -> SweepResult:
    """Check every trial, run them on Ray Tune under one parent MLflow run, then the best one
    through export, evaluate and the gate."""
    base = job.base
    if base.cluster.run_name:
        raise PipelineError(
            f"cluster.run_name={base.cluster.run_name} names one training run, and a sweep runs "
            "one per trial (each named from its settings and the data); remove cluster.run_name"
        )
    shards = base.where.shards_dir
    manifest = read_manifest(shards)  # no shards: one line saying to run stage
    version = data_version(base.root, shards)
    storage = _storage(base)
    names = [t.run_name(version["manifest_sha256"]) for t in job.trials]
    name = sweep_name(version["manifest_sha256"], names)
    _check_trials(job, manifest, storage, names)
    tracking_checks.check_reachable(base.store)
    ensure_ray(base.cluster)
    check_resources(base.cluster)
    concurrent = _concurrency(job)
    parent = _parent_run(job, name, storage, version)
    sweep = _Sweep(name, parent, storage, tuple(names), concurrent)
    client = tracking.client(base.store)
    with run_closed_on_failure(client, parent):
        try:
            outcomes = _run_trials(job, sweep, progress)
        finally:
            _close_children(client, base.store, parent)
        result = _finish(job, sweep, outcomes, progress)
        client.set_terminated(parent, status="FINISHED")
    return result


def _run_trials(job: SweepJob, sweep: _Sweep, progress: bool) -> list[TrialOutcome]:
    """Each trial in its own outputs folder, tagged as the parent run's child, on Ray Tune."""
    outputs = job.base.where.train_dir.parent
    trials = tuple(
        _in_own_folder(t, trial_folder(outputs, sweep.name, i), {
            PARENT_TAG: sweep.parent, "vae.sweep": sweep.name, "sweep.trial": str(i),
            "sweep.overrides": " ".join(job.plans[i]),
        })
        for i, t in enumerate(job.trials)
    )  # fmt: skip
    return run_trials(
        TrialsJob(
            trials, job.plans, sweep.run_names, sweep.storage, sweep.name, sweep.concurrent,
            job.time_budget_s,
        ),
        progress,
    )  # fmt: skip


def _no_best(outcomes: list[TrialOutcome], cluster) -> PipelineError:
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        return PipelineError(
            f"no trial finished; trial {failed[0].index} failed: {failed[0].error}"
        )
    where = cluster_address(cluster) or "this machine's Ray"
    return PipelineError(
        "no trial finished within --time-budget; raise it, or lower train.epochs or --trials "
        f"(the trials ran on {where}; re-running the same sweep resumes them)"
    )


def _evaluate_others(job: SweepJob, sweep: _Sweep, outcomes, best, progress: bool) -> None:
    """--evaluate-all: every other finished trial evaluated in its own folder, its test
    metrics (and MIG where the data has factors) logged to its own child run."""
    outputs = job.base.where.train_dir.parent
    for o in outcomes:
        if o.status == "finished" and o is not best:
            folder = trial_folder(outputs, sweep.name, o.index)
            where = replace(job.evaluate.where, outputs_dir=str(folder))
            evaluate_model(replace(job.evaluate, where=where), progress=progress)


def _finish(job: SweepJob, sweep: _Sweep, outcomes, progress: bool) -> SweepResult:
    """The best trial exported into the outputs folder (from its checkpoints, nothing trains
    again), evaluated and registered behind the gate, as the retrain flow's tasks do."""
    best = best_trial(outcomes)
    if best is None:
        raise _no_best(outcomes, job.base.cluster)
    client = tracking.client(job.base.store)
    client.set_tag(sweep.parent, "sweep.best_run_id", str(best.mlflow_run_id))
    client.set_tag(sweep.parent, "sweep.best_overrides", " ".join(best.overrides))
    client.log_metric(sweep.parent, "best_val_neg_elbo", float(best.val_neg_elbo))
    if job.evaluate_all:
        _evaluate_others(job, sweep, outcomes, best, progress)
    trained = train_model(job.trials[best.index], progress=progress)
    evaluated = evaluate_model(job.evaluate, progress=progress)
    registered = register_model(job.register, progress=progress)
    return SweepResult(
        sweep.name, sweep.parent, str(sweep.storage), sweep.concurrent, job.time_budget_s,
        job.spec.describe(), outcomes, best, evaluated.to_dict(), registered.to_dict(),
        trained.to_dict(),
    )  # fmt: skip
