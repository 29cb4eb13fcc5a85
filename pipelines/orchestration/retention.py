"""Retention: what the retrain flow prunes after each run (params.yaml `retention:`).

Scheduled retraining grows two things without bound: a checkpoint folder per training run
under cluster.storage_path, and a registered version pair per run, most of them challengers.
This prunes the oldest of each, and never:
- the champion (or any version with an alias) or a former champion (the rollback path);
- the checkpoints of the champion's training run;
- any MLflow run (metrics, params, dataset inputs): the lineage of every version stays;
- a folder that is not a training run of this pipeline, or anything younger than
  retention.min_age_hours.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines import tracking, tracking_checks
from pipelines.params import Params, RetentionParams
from pipelines.registry.models import model_name
from pipelines.storage import is_remote, location, remote_errors
from pipelines.training.preflight import is_training_run_dir

ROLES = ("encoder", "decoder")


@dataclass
class PruneResult:
    deleted_runs: list[str] = field(default_factory=list)  # checkpoint folders removed
    deleted_versions: list[str] = field(default_factory=list)  # models:/<name>/<version>
    kept_runs: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _age_s(path: Path, now: float) -> float:
    """Seconds since anything in the folder last changed (its newest direct entry)."""
    stamps = [path.stat().st_mtime] + [e.stat().st_mtime for e in path.iterdir()]
    return now - max(stamps)


def _aliased(client, name: str) -> set[str]:
    """Versions with any alias (search results do not carry aliases; the model does)."""
    from mlflow.exceptions import MlflowException

    try:
        return {str(v) for v in (client.get_registered_model(name).aliases or {}).values()}
    except MlflowException:  # no such model yet
        return set()


def _champion_run_names(registered: str, client) -> set[str]:
    names = set()
    for role in ROLES:
        name = model_name(registered, role)
        for version in _aliased(client, name):
            names.add((client.get_model_version(name, version).tags or {}).get("vae.run_name"))
    return names - {None, ""}


def _owned(client, run_dir: Path) -> bool:
    """A checkpoint folder this pipeline made: the MLflow run its mlflow_run_id names exists in
    this tracking store and was started for a training run of exactly this folder's name. A
    copy or rename of a run folder (a teammate's experiment) names another run, or none."""
    id_file = run_dir / "mlflow_run_id"
    try:
        run = client.get_run(id_file.read_text().strip())
    except Exception:  # noqa: BLE001 - no file, no such run, a reset store: not provably ours
        return False
    return (run.data.tags or {}).get("vae.run_name") == run_dir.name


def prune_checkpoints(
    rp: RetentionParams, root, protected: set[str], result: PruneResult, client=None
) -> None:
    """root: the checkpoint folders' storage (cluster.storage_path)."""
    keep = rp.keep_runs
    if keep is None or is_remote(root):
        if keep is not None:
            result.notes.append(f"checkpoints in {root} are not pruned (object storage: use a "
                                "bucket lifecycle rule)")  # fmt: skip
        return
    if not root.is_dir():
        return
    runs = []
    for d in sorted(root.iterdir()):
        if not (d.is_dir() and is_training_run_dir(d)):
            continue
        if client is not None and not _owned(client, d):
            result.notes.append(
                f"left {d} alone: no MLflow run of this pipeline was started for a folder of "
                "that name (a copy or someone else's run)"
            )
            continue
        runs.append(d)
    now = time.time()
    runs.sort(key=lambda d: _age_s(d, now))  # newest first
    min_age = rp.min_age_hours * 3600
    for i, run in enumerate(runs):
        if i < keep or run.name in protected or _age_s(run, now) < min_age:
            result.kept_runs += 1
            continue
        shutil.rmtree(run)
        result.deleted_runs.append(str(run))


def prune_challengers(rp: RetentionParams, registered: str, client, result: PruneResult) -> None:
    keep = rp.keep_challengers
    if keep is None:
        return
    oldest_ok = (time.time() - rp.min_age_hours * 3600) * 1000
    for role in ROLES:
        name = model_name(registered, role)
        aliased = _aliased(client, name)
        versions = client.search_model_versions(f"name='{name}'")
        challengers = sorted(
            (
                v for v in versions
                if str(v.version) not in aliased
                and (v.tags or {}).get("gate.decision") == "challenger"
            ),
            key=lambda v: int(v.version),
            reverse=True,
        )  # fmt: skip
        for version in challengers[keep:]:
            if version.creation_timestamp > oldest_ok:
                continue
            client.delete_model_version(name, version.version)
            result.deleted_versions.append(f"models:/{name}/{version.version}")


@dataclass(frozen=True)
class RetentionJob:
    """What pruning reads, unpacked from params once: its section, the registered name, the
    checkpoint storage (cluster.storage_path, as written and resolved) and the tracking store."""

    retention: RetentionParams
    name: str
    storage_path: str
    root: Path
    store: tracking.Store

    @classmethod
    def from_params(cls, params: Params) -> RetentionJob:
        return cls(
            params.retention, params.registry.name, params.cluster.storage_path, params.root,
            tracking.store_of(params),
        )  # fmt: skip


def prune(job: RetentionJob) -> PruneResult:
    """Apply the retention section: old checkpoint folders, then old challenger versions."""
    result = PruneResult()
    tracking_checks.check_reachable(job.store)
    client = tracking.client(job.store)
    protected = _champion_run_names(job.name, client)
    storage = location(job.storage_path, job.root)
    with remote_errors(job.storage_path):
        prune_checkpoints(job.retention, storage, protected, result, client)
    prune_challengers(job.retention, job.name, client, result)
    return result
