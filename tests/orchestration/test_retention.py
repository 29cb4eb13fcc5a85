"""Retention against a real MLflow registry (SQLite) and real run folders: old checkpoints and
old challengers go; the champion, its run's checkpoints, former champions, young things and
folders that are not ours stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
import pytest

from pipelines.orchestration.retention import RetentionJob, prune

DAY = 86_400


# The tests' preset: the newest two runs and one challenger besides the aliased ones stay.
RETENTION = ("retention.keep_runs=2", "retention.keep_challengers=1")


def _run_folder(root: Path, name: str, age_days: float, client=None) -> Path:
    """A training run's folder as the driver leaves it: checkpoints, and the id of an MLflow
    run started for exactly this name (what retention takes as proof the folder is ours)."""
    client = client or mlflow.MlflowClient(f"sqlite:///{root.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-pipeline") or None
    exp_id = experiment.experiment_id if experiment else client.create_experiment("vae-pipeline")
    run_id = client.create_run(exp_id, tags={"vae.run_name": name}).info.run_id
    run = root / name
    (run / "checkpoint_epoch_00000").mkdir(parents=True)
    (run / "mlflow_run_id").write_text(run_id)
    stamp = time.time() - age_days * DAY
    for p in (run / "checkpoint_epoch_00000", run / "mlflow_run_id", run):
        os.utime(p, (stamp, stamp))
    return run


def _versions(client, decisions: list[tuple[str, str]]) -> None:
    """One version pair per (run name, gate decision), oldest first."""
    for role in ("encoder", "decoder"):
        name = f"digits-vae-{role}"
        client.create_registered_model(name)
        for run_name, decision in decisions:
            tags = {"vae.run_name": run_name, "gate.decision": decision}
            client.create_model_version(name, f"/nowhere/{run_name}", tags=tags)


@pytest.fixture
def store(small_params):
    params = small_params(preset=RETENTION)
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    _versions(client, [("r1", "champion"), ("r2", "challenger"), ("r3", "challenger"),
                       ("r4", "champion"), ("r5", "challenger"), ("r6", "challenger")])  # fmt: skip
    for role in ("encoder", "decoder"):
        client.set_registered_model_alias(f"digits-vae-{role}", "champion", "4")
        client.set_registered_model_alias(f"digits-vae-{role}", "challenger", "6")
    return params, client


def test_old_checkpoints_and_challengers_go_the_champion_and_its_lineage_stay(
    store, tmp_path, small_params
):
    params, client = store
    runs = tmp_path / "runs"
    old = {n: _run_folder(runs, n, age) for n, age in [("r1", 9), ("r2", 8), ("r4", 7), ("r5", 6)]}
    young = _run_folder(runs, "r6", 0.1)
    foreign = runs / "holiday-photos"
    foreign.mkdir()
    stamp = time.time() - 30 * DAY
    os.utime(foreign, (stamp, stamp))

    result = prune(
        RetentionJob.from_params(small_params("retention.min_age_hours=0", preset=RETENTION))
    )

    # Runs: newest two (r6, r5) kept, the champion's (r4) kept, r1 and r2 deleted.
    assert sorted(Path(p).name for p in result.deleted_runs) == ["r1", "r2"]
    assert not old["r1"].exists() and not old["r2"].exists()
    assert old["r4"].is_dir() and old["r5"].is_dir() and young.is_dir() and foreign.is_dir()
    # Versions: challengers 2, 3, 5, 6 -> 6 has an alias, 5 is the newest other one kept; the
    # champions (4) and the former champion (1) stay. Every MLflow run is untouched.
    left = {
        role: sorted(int(v.version) for v in client.search_model_versions(f"name='digits-vae-{role}'"))
        for role in ("encoder", "decoder")
    }  # fmt: skip
    assert left == {"encoder": [1, 4, 5, 6], "decoder": [1, 4, 5, 6]}
    assert sorted(result.deleted_versions) == sorted(
        f"models:/digits-vae-{role}/{v}" for role in ("encoder", "decoder") for v in (2, 3)
    )


def test_nothing_younger_than_min_age_is_pruned_and_null_keeps_everything(
    store, tmp_path, small_params
):
    params, client = store
    runs = tmp_path / "runs"
    for n, age in [("r1", 0.5), ("r2", 0.4), ("r3", 0.3)]:
        _run_folder(runs, n, age)
    result = prune(
        RetentionJob.from_params(small_params("retention.min_age_hours=24", preset=RETENTION))
    )
    assert result.deleted_runs == [] and result.deleted_versions == []  # all made just now
    _run_folder(runs, "r0", 30)
    kept_all = prune(RetentionJob.from_params(small_params("retention.min_age_hours=0", "retention.keep_runs=null",
                                   "retention.keep_challengers=null", preset=RETENTION)))  # fmt: skip
    assert kept_all.deleted_runs == [] and kept_all.deleted_versions == []
    assert len(client.search_model_versions("name='digits-vae-encoder'")) == 6


def test_a_copy_of_a_run_folder_is_left_alone_and_reported(store, tmp_path, small_params):
    """Ownership, not looks: `teammate-experiment` is a byte copy of an old run folder (its
    checkpoints and mlflow_run_id), but no MLflow run of this pipeline was started under that
    name, so retention neither deletes it nor counts it, and says so."""
    import shutil

    runs = tmp_path / "runs"
    original = _run_folder(runs, "r1", 9)
    copy = runs / "teammate-experiment"
    shutil.copytree(original, copy)
    stamp = time.time() - 9 * DAY
    for p in (copy, copy / "mlflow_run_id", copy / "checkpoint_epoch_00000"):
        os.utime(p, (stamp, stamp))
    for name, age in [("r5", 6), ("r6", 0.1)]:
        _run_folder(runs, name, age)

    result = prune(
        RetentionJob.from_params(
            small_params("retention.min_age_hours=0", "retention.keep_runs=1", preset=RETENTION)
        )
    )

    assert copy.is_dir() and (copy / "mlflow_run_id").is_file()
    assert str(copy) not in result.deleted_runs
    assert any("teammate-experiment" in note and "left" in note for note in result.notes)
    # The pipeline's own old runs still go (keep_runs=1 keeps r6, the newest).
    assert sorted(Path(p).name for p in result.deleted_runs) == ["r1", "r5"]
