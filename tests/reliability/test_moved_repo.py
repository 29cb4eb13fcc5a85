"""A moved or copied repo with the embedded default store is refused in one line (issue 32).

MLflow writes absolute artifact paths into mlflow.db, so a copied repo's database points at the
original folder, and MLflow's public API cannot change them: the pipeline says so and what to
do, and never rewrites MLflow's tables. The store here is real MLflow on SQLite, made through
the pipeline's own tracking functions: a run that logged an artifact, a logged model with files
and a registered version of it. No training, so the module takes a few seconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines import tracking, tracking_checks
from pipelines.cli import main
from pipelines.errors import PipelineError
from pipelines.params import Params
from pipelines.params_file import load_params
from pipelines.registry.models import model_name
from tests.helpers.files import tree_hashes
from tests.helpers.params import REPO


@dataclass(frozen=True)
class Store:
    root: Path  # the original repo: params.yaml, mlflow.db, mlartifacts/
    run_id: str
    model: str  # the registered decoder's name
    version: str


@pytest.fixture(autouse=True)
def embedded_default(monkeypatch) -> None:
    """The embedded default store is the one used when no tracking URI is set anywhere."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("original") / "repo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield _make_store(load_params(root / "params.yaml"))


def _make_store(params: Params) -> Store:
    assert tracking.store_of(params).artifact_location == (params.root / "mlartifacts").as_uri()
    client = tracking.client(tracking.store_of(params))
    exp = tracking.experiment_id(tracking.store_of(params))
    run_id = client.create_run(exp, run_name="moved").info.run_id
    note = params.root / "note.txt"
    note.write_text("logged in the original")
    client.log_artifact(run_id, str(note), "notes")
    model = client.create_logged_model(exp, source_run_id=run_id, name="decoder")
    weights = params.root / "weights"
    weights.mkdir()
    (weights / "weights.pt").write_text("decoder weights")
    client.log_model_artifacts(model.model_id, str(weights))
    name = model_name(params.registry.name, "decoder")
    client.create_registered_model(name)
    # Registered from the model's folder (not models:/, which MLflow resolves through its
    # global tracking URI), so the version's source is a path too.
    location = client.get_logged_model(model.model_id).artifact_location
    mv = client.create_model_version(name, location, run_id=run_id, model_id=model.model_id)
    client.set_terminated(run_id)
    return Store(params.root, run_id, name, str(mv.version))


def test_copied_repo_is_refused_in_one_line_and_neither_store_changes(
    original: Store, tmp_path: Path
):
    copy = tmp_path / "copy"
    shutil.copytree(original.root, copy)
    before, copied = tree_hashes(original.root), tree_hashes(copy)
    params = load_params(copy / "params.yaml")
    with pytest.raises(PipelineError) as caught:
        tracking_checks.check_reachable(tracking.store_of(params))
    line = str(caught.value)
    assert "\n" not in line and str(copy / "mlflow.db") in line
    assert f"records its artifacts in {original.root / 'mlartifacts'}" in line
    assert "moved or copied" in line and "mlflow.tracking_uri" in line
    assert tree_hashes(original.root) == before  # the original's db and artifacts, byte for byte
    assert tree_hashes(copy) == copied  # and the copy's: nothing rewritten


def test_moved_repo_command_exits_2_with_the_refusal_as_its_one_json_document(
    original: Store, tmp_path: Path, capsys
):
    moved = tmp_path / "moved"
    shutil.copytree(original.root, moved)
    code = main(["generate", "--json", "--params", str(moved / "params.yaml")])
    out = capsys.readouterr().out
    assert code == 2
    error = json.loads(out)["error"]
    assert "moved or copied" in error and str(original.root / "mlartifacts") in error


def test_the_original_repo_passes_the_check(original: Store, capsys):
    tracking_checks.check_reachable(tracking.store_of(load_params(original.root / "params.yaml")))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("named_by", ["params", "environment"])
def test_a_store_the_user_named_keeps_the_paths_it_records(
    original: Store, tmp_path: Path, capsys, monkeypatch, named_by: str
):
    copy = tmp_path / "copy"
    shutil.copytree(original.root, copy)
    uri = f"sqlite:///{copy / 'mlflow.db'}"
    overrides = [f"mlflow.tracking_uri={uri}"] if named_by == "params" else []
    if named_by == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    db = (copy / "mlflow.db").read_bytes()
    tracking_checks.check_reachable(
        tracking.store_of(load_params(copy / "params.yaml", overrides))
    )  # no refusal
    assert capsys.readouterr().err == ""
    assert (copy / "mlflow.db").read_bytes() == db


def test_a_repo_without_a_store_yet_gets_no_database_or_lock_from_the_check(tmp_path: Path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    tracking_checks.check_reachable(tracking.store_of(load_params(tmp_path / "params.yaml")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
