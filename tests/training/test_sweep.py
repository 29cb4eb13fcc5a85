"""`vae-pipeline sweep`: trials on Ray Tune under one parent MLflow run, and the best through
evaluate and the gate; bad sweep flags refused in one line before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from pipelines.cli import main
from tests.helpers.params import FLOW, PARAMS_FILE, overrides_in, set_args


def _sweep(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main(["sweep", "--params", str(PARAMS_FILE), "--json", "--quiet", *argv])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--grid", "model.nope=1,2"], "--grid model.nope=1"),
        (["--grid", "model.latent_dim=2,0"], "--grid model.latent_dim=0"),
        (["--sample", "train.lr=0.1,-1"], "--sample train.lr=-1"),
        (["--grid", "cluster.num_workers=1,2"], "varies model.* and train.*"),
        (["--grid", "model.beta=1,2", "--time-budget", "soon"], "--time-budget"),
    ],
)
def test_a_bad_sweep_flag_fails_in_one_line_before_ray_starts(tmp_path, capsys, flags, named):
    code, doc, err = _sweep(capsys, *flags, *set_args(overrides_in(tmp_path)))
    assert code == 2 and named in doc["error"] and doc["exit_code"] == 2, doc
    assert err.count("error:") == 1 and not (tmp_path / "runs").exists()


def test_a_sweep_without_staged_shards_says_to_run_stage(tmp_path, capsys):
    code, doc, _ = _sweep(capsys, "--grid", "model.beta=1,2", *set_args(overrides_in(tmp_path)))
    assert code == 2 and "run 'vae-pipeline stage'" in doc["error"], doc


@pytest.mark.slow
def test_a_grid_sweep_runs_child_runs_under_one_parent_and_registers_the_best(
    local_ray, staged_digits, tmp_path, capsys
):
    overrides = overrides_in(tmp_path, *FLOW, "train.epochs=1", shards=staged_digits)
    code, doc, err = _sweep(
        capsys, "--grid", "model.latent_dim=2,3", "--trials", "2", *set_args(overrides)
    )
    assert code == 0, err
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(doc["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == doc["name"]
    assert parent.data.params["sweep.grid.model.latent_dim"] == "2,3"
    assert "model.latent_dim" not in parent.data.params  # a trial's, not the sweep's
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    val = {}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_neg_elbo")
        assert [m.step for m in history] == [0]  # one epoch, logged once
        val[child.info.run_id] = history[0].value
        latent = child.data.params["model.latent_dim"]
        assert child.data.tags["sweep.overrides"] == f"model.latent_dim={latent}"
    trials = {t["mlflow_run_id"]: t for t in doc["trials"]}
    assert set(trials) == set(val) and {t["status"] for t in doc["trials"]} == {"finished"}
    for run_id, t in trials.items():
        assert t["val_neg_elbo"] == pytest.approx(val[run_id])
    best = min(val, key=val.get)
    assert doc["best_mlflow_run_id"] == best and doc["best_val_neg_elbo"] == pytest.approx(
        val[best]
    )
    # The best went through export, evaluate and the gate like any retrain, in the outputs.
    outputs = tmp_path / "outputs"
    trained = json.loads((outputs / "train" / "train_result.json").read_text())
    assert trained["mlflow_run_id"] == best and trained["reused"]  # from its checkpoints
    metrics = json.loads((outputs / "evaluate" / "metrics.json").read_text())
    assert metrics["neg_elbo"] == pytest.approx(doc["metrics"]["neg_elbo"])
    assert client.get_run(best).data.metrics["test_neg_elbo"] == pytest.approx(metrics["neg_elbo"])
    version = client.get_model_version("digits-vae-encoder", doc["register"]["encoder_version"])
    assert version.run_id == best and doc["decision"] == "champion"
    assert Path(doc["metrics_file"]) == outputs / "evaluate" / "metrics.json"


def test_trials_cut_off_are_closed_killed_and_the_others_keep_their_status(tmp_path):
    """What the sweep does after Tune returns or is interrupted (a trial stopped by the time
    budget leaves its run RUNNING): on a real MLflow store, no Ray."""
    from pipelines import tracking
    from pipelines.orchestration.sweep import PARENT_TAG, _close_children

    store = tracking.Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "sweeps", "test")
    client = tracking.client(store)
    experiment = tracking.experiment_id(store)
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    other = client.create_run(experiment, run_name="another sweep's").info.run_id
    children = [
        client.create_run(experiment, tags={PARENT_TAG: parent}).info.run_id for _ in range(3)
    ]
    client.set_terminated(children[0], status="FINISHED")
    client.set_terminated(children[1], status="FAILED")
    _close_children(client, store, parent)
    status = {r: client.get_run(r).info.status for r in [*children, parent, other]}
    assert [status[c] for c in children] == ["FINISHED", "FAILED", "KILLED"]
    assert status[parent] == status[other] == "RUNNING"  # the parent is the caller's to end


def test_a_sweep_refuses_one_run_name_for_all_its_trials(tmp_path, capsys):
    argv = ["--grid", "model.beta=1,2", *set_args(overrides_in(tmp_path, "cluster.run_name=a"))]
    code, doc, _ = _sweep(capsys, *argv)
    assert code == 2 and "remove cluster.run_name" in doc["error"], doc


def test_two_trials_the_schema_reads_alike_are_refused_before_ray_starts(
    staged_digits, tmp_path, capsys
):
    overrides = overrides_in(tmp_path, "model.kind=beta_vae", shards=staged_digits)
    code, doc, _ = _sweep(capsys, "--grid", "model.beta=1,1.0", *set_args(overrides))
    assert code == 2 and "have the same settings" in doc["error"], doc
    assert not (tmp_path / "runs").exists()
