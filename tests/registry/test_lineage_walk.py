"""Lineage the MLflow way: from the registered champion back to the data, code, params and test
scores it came from, through the MLflow client alone, after the real train (Ray), evaluate and
register stages in a git repo whose data.dvc tracks the shards."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from pipelines import tracking
from pipelines.evaluation.evaluate import EvaluateJob, evaluate_model
from pipelines.registry.models import model_name
from pipelines.registry.register import RegisterJob, register_model
from pipelines.training.driver import train_model
from pipelines.training.job import TrainJob
from tests.helpers.params import REGISTRY, REPO, params_in
from tests.registry.conftest import LATENT

pytestmark = pytest.mark.slow


def _git(work: Path, *args: str) -> str:
    identity = ["-c", "user.name=lineage", "-c", "user.email=lineage@example.com"]
    return subprocess.run(
        ["git", *identity, "-c", "commit.gpgsign=false", *args],
        cwd=work, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


@pytest.fixture(scope="module")
def champion(tmp_path_factory, staged_shards, local_ray):
    """One pair trained on one Ray worker, evaluated and registered as the first champion, from
    a committed repo holding params.yaml and the repo's data.dvc (the shards stage the same
    bytes every time, so the md5 DVC recorded there is theirs)."""
    work = tmp_path_factory.mktemp("lineage")
    shutil.copytree(staged_shards, work / "data" / "shards")
    shutil.copy(REPO / "data.dvc", work / "data.dvc")
    params = params_in(work, *REGISTRY, "cluster.num_workers=1", "cluster.run_name=lineage",
                       "train.epochs=2", data=work / "data", own_root=True)  # fmt: skip
    _git(work, "init", "-q")
    _git(work, "add", "params.yaml", "data.dvc")
    _git(work, "commit", "-q", "-m", "lineage")
    trained = train_model(TrainJob.from_params(params), progress=False)
    evaluated = evaluate_model(EvaluateJob.from_params(params), progress=False)
    registered = register_model(RegisterJob.from_params(params), progress=False)
    assert registered.decision == "champion"
    return params, trained, evaluated.metrics, _git(work, "rev-parse", "HEAD")


def _logged_model_id(version) -> str:
    """The logged model a version was registered from: its source is models:/<model id> (the
    SQL registry keeps no ModelVersion.model_id; it answers None)."""
    assert version.source.startswith("models:/m-"), version.source
    return version.source.removeprefix("models:/")


def _context(dataset_input) -> str:
    return {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"]


def test_champion_walks_back_to_data_code_params_and_test_scores_through_mlflow(champion):
    params, trained, evaluated, commit = champion
    client = mlflow.MlflowClient(tracking.store_of(params).uri)

    # models:/<name>-encoder@champion -> its version -> the logged model -> the training run
    version = client.get_model_version_by_alias(
        model_name(params.registry.name, "encoder"), "champion"
    )
    logged = client.get_logged_model(_logged_model_id(version))
    assert logged.source_run_id == version.run_id == trained.mlflow_run_id
    run = client.get_run(logged.source_run_id)
    assert logged.model_id in {m.model_id for m in run.outputs.model_outputs}

    # -> the data: one input per split, digested by the md5 DVC records for the shards
    dvc_md5 = yaml.safe_load((params.root / "data.dvc").read_text())["outs"][0]["md5"]
    inputs = {_context(i): i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    shards = params.root / "data" / "shards"
    for context, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        dataset = inputs[context]
        assert dataset.name == f"digits-shards-{split}"
        assert dataset.digest == dvc_md5 == trained.data_version["dvc_md5"]
        assert mlflow.data.get_source(dataset).uri == str(shards)
        profile = json.loads(dataset.profile)
        assert profile["split"] == split and profile["dvc_file"] == "data.dvc"

    # -> the code and the params it ran with
    assert run.data.tags["mlflow.source.git.commit"] == commit == run.data.tags["git_commit"]
    assert run.data.params["model.latent_dim"] == str(LATENT)
    assert run.data.params["train.epochs"] == "2"

    # -> the test scores, on the logged model itself and linked to the test split's dataset.
    # (MLflow also copies the run's step-0 metrics onto a model it logs, with no dataset.)
    linked = {m.key: m for m in logged.metrics if m.dataset_name == "digits-shards-test"}
    assert set(linked) == set(tracking.evaluation_metrics(evaluated))
    assert {m.dataset_digest for m in linked.values()} == {dvc_md5}
    assert linked["test_neg_elbo"].value == pytest.approx(evaluated["neg_elbo"])
    assert linked["test_active_units"].value == evaluated["active_units"]
    # ... while the tags the promotion gate and the retrain flow read stay as they were
    assert float(version.tags["test.neg_elbo"]) == pytest.approx(evaluated["neg_elbo"])
    assert version.tags["data.dvc_md5"] == dvc_md5


def test_decoder_carries_the_same_test_scores_and_the_run_is_finished(champion):
    params, trained, evaluated, _ = champion
    client = mlflow.MlflowClient(tracking.store_of(params).uri)
    decoder = client.get_model_version_by_alias(
        model_name(params.registry.name, "decoder"), "champion"
    )
    logged = client.get_logged_model(_logged_model_id(decoder))
    scores = {m.key: m.value for m in logged.metrics if m.dataset_name == "digits-shards-test"}
    assert scores["test_neg_elbo"] == pytest.approx(evaluated["neg_elbo"])
    assert client.get_run(trained.mlflow_run_id).info.status == "FINISHED"
