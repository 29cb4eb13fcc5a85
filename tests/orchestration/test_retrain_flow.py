"""The retrain flow end to end in-process (Prefect test harness), in a temporary git + DVC repo."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import mlflow
import pytest
import yaml
from mlflow.exceptions import MlflowException

from pipelines.data.versioning.hashing import dvc_dir_md5
from pipelines.errors import ParamsError
from tests.helpers.files import tree_hashes
from tests.helpers.params import FLOW, overrides_in
from tests.helpers.repos import git_dvc_env, make_repo
from tests.registry_state import record_writes, registry_snapshot, writes_refused

pytestmark = pytest.mark.slow

ENCODER, DECODER = "digits-vae-encoder", "digits-vae-decoder"
REPORT_KEY = "retrain-digits-vae"


@pytest.fixture(scope="module")
def retrained_twice(prefect_harness, local_ray, tmp_path_factory):
    """Two retrains of one fresh repo started at the same moment, as a scheduled run and a
    manual one might be: (repo, overrides, the first to finish, the second)."""
    from pipelines.orchestration.flows import retrain_flow

    repo = make_repo(tmp_path_factory.mktemp("retrain"))
    overrides = overrides_in(repo, *FLOW, data=repo / "data")
    results, errors = [], []

    def run() -> None:
        try:
            results.append(retrain_flow(params_file=str(repo / "params.yaml"), overrides=overrides))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    first, second = sorted(results, key=lambda r: r["summary"]["waited_s"])
    return repo, overrides, first, second


@pytest.fixture(scope="module")
def retrained(retrained_twice):
    """The first of the two: a retrain of a fresh repo, as if it had run alone."""
    repo, overrides, first, _ = retrained_twice
    return repo, overrides, first


def _registry(repo) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def _dvc_md5(repo) -> str:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


def test_retrain_records_the_staged_shards_in_data_dvc_and_pushes_them(retrained):
    repo, _, result = retrained
    shards = repo / "data" / "shards"
    assert (shards / "manifest.json").is_file()
    assert _dvc_md5(repo) == dvc_dir_md5(shards) == result["data_dvc_md5"]
    record = json.loads((repo / "data" / "stage.json").read_text())  # what dvc.yaml's stages use
    assert record["dvc_md5"] == result["data_dvc_md5"]
    assert result["data_pushed"] == "yes"
    md5 = result["data_dvc_md5"].removesuffix(".dir")
    assert (repo / ".dvc-remote" / "files" / "md5" / md5[:2] / f"{md5[2:]}.dir").is_file()


def test_retrain_trains_evaluates_and_crowns_the_first_model_champion(retrained):
    repo, _, result = retrained
    assert result["decision"] == "champion"
    assert result["metrics"]["units"] == "nats per example"
    client = _registry(repo)
    champion = client.get_model_version_by_alias(ENCODER, "champion")
    assert result["new_encoder"] == f"models:/{ENCODER}/{champion.version}"
    assert champion.run_id == result["mlflow_run_id"]
    assert client.get_model_version_by_alias(DECODER, "champion").version == champion.version
    assert (repo / "outputs" / "evaluate" / "metrics.json").is_file()


def test_retrain_ends_with_where_to_look(retrained):
    repo, _, result = retrained
    assert list(result)[-4:] == ["mlflow_ui", "champion_encoder", "champion_decoder", "figures"]
    assert result["mlflow_ui"] == f"mlflow ui --backend-store-uri sqlite:///{repo / 'mlflow.db'}"
    assert result["champion_encoder"] == f"models:/{ENCODER}@champion"
    assert result["figures"] == str(repo / "outputs" / "evaluate")


def test_retrain_publishes_a_markdown_report_artifact(retrained_twice):
    from prefect.artifacts import Artifact

    *_, result = retrained_twice  # the report under this key is the latest run's
    artifact = Artifact.get(REPORT_KEY)
    assert artifact is not None and artifact.type == "markdown"
    assert artifact.data.startswith("# Retrain: completed")
    assert result["data_dvc_md5"] in artifact.data and result["mlflow_run_id"] in artifact.data
    assert result["new_encoder"] in artifact.data


def test_two_retrains_at_once_take_turns_and_leave_exactly_one_champion(retrained_twice):
    """Same params and data: the second waits for the first, reuses its finished training
    run (and says so), and registers nothing: the same weights are already the champion, so no
    identical challenger is added; DVC's lock is left holding nothing."""
    repo, _, first, second = retrained_twice
    assert second["summary"]["waited_s"] > first["summary"]["waited_s"] + 5, "one waited"
    assert second["summary"]["train"]["started_at_epoch"] == 2  # resumed, did not retrain
    assert second["summary"]["train"]["reused"].startswith("reused the finished run")
    assert (first["decision"], second["decision"]) == ("champion", "unchanged")
    assert second["new_encoder"] == first["new_encoder"]
    assert second["summary"]["embed"] == {"skipped": "the pair was registered before"}
    client = _registry(repo)
    for name in (ENCODER, DECODER):
        assert len(client.search_model_versions(f"name='{name}'")) == 1
    encoder = client.get_model_version_by_alias(ENCODER, "champion")
    decoder = client.get_model_version_by_alias(DECODER, "champion")
    assert first["new_encoder"] == f"models:/{ENCODER}/{encoder.version}"
    assert encoder.tags["vae.pair"] == f"models:/{DECODER}/{decoder.version}"

    assert _dvc_md5(repo) == dvc_dir_md5(repo / "data" / "shards")
    rwlock = repo / ".dvc" / "tmp" / "rwlock"
    if rwlock.exists():
        assert not any(json.loads(rwlock.read_text() or "{}").values()), "a DVC lock is held"
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "data.dvc"], cwd=repo, env=git_dvc_env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr


def test_bad_params_fail_the_flow_before_any_work(prefect_harness, tmp_path):
    from pipelines.orchestration.flows import retrain_flow

    repo = make_repo(tmp_path)
    with pytest.raises(ParamsError, match="train.epochs"):
        retrain_flow(
            params_file=str(repo / "params.yaml"),
            overrides=overrides_in(repo, *FLOW, "train.epochs=many", data=repo / "data"),
        )
    assert not (repo / "data" / "shards").exists()


def test_failed_registration_keeps_shards_data_dvc_checkpoints_and_champion(retrained):
    """Runs last in this module: it retrains (3 epochs, a new run) in the shared repo. The real
    registration fails half-way: the store refuses the decoder's alias write after both new
    versions exist. Everything before register stays, and the registry is as it was."""
    from prefect.artifacts import Artifact

    from pipelines.orchestration import flows
    from pipelines.params_file import load_params
    from pipelines.registry.models import load_registered, registry_of

    repo, overrides, first = retrained
    client = _registry(repo)
    champion_before = client.get_model_version_by_alias(ENCODER, "champion").version
    registry_before = registry_snapshot(f"sqlite:///{repo / 'mlflow.db'}")
    data_dvc_before = (repo / "data.dvc").read_text()
    record_before = (repo / "data" / "stage.json").read_text()
    shards_before = tree_hashes(repo / "data" / "shards")
    created = record_writes(repo / "mlflow.db", "model_versions", "NEW.name || '/' || NEW.version")

    refused = f"NEW.name = '{DECODER}'"
    with writes_refused(repo / "mlflow.db", "registered_model_aliases", refused, "store refused"):
        with pytest.raises(MlflowException, match="store refused"):
            flows.retrain_flow(
                params_file=str(repo / "params.yaml"), overrides=[*overrides, "train.epochs=3"]
            )

    new = str(int(champion_before) + 1)
    assert created()[:2] == [f"{ENCODER}/{new}", f"{DECODER}/{new}"], "it failed half-way"
    assert registry_snapshot(f"sqlite:///{repo / 'mlflow.db'}") == registry_before
    params = load_params(repo / "params.yaml", overrides)
    for role in ("encoder", "decoder"):  # the old pair is still the champion, and it loads
        assert load_registered(registry_of(params), role, "champion")[1].version == str(
            champion_before
        )
    assert (repo / "data.dvc").read_text() == data_dvc_before
    assert (repo / "data" / "stage.json").read_text() == record_before
    assert tree_hashes(repo / "data" / "shards") == shards_before
    trained = yaml.safe_load((repo / "outputs" / "train" / "train_result.json").read_text())
    assert (
        trained["epochs_run"] == 3 and trained["run_name"] != first["summary"]["train"]["run_name"]
    )
    assert any((repo / "runs" / trained["run_name"]).glob("checkpoint_*"))
    assert (repo / "runs" / first["summary"]["train"]["run_name"]).is_dir()
    report = Artifact.get(REPORT_KEY)
    assert report.data.startswith("# Retrain: failed")
    assert "**Failed at `register`**" in report.data and "store refused" in report.data
