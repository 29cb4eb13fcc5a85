"""A moved or copied repo keeps working with the embedded default store (issue 19).

MLflow writes absolute artifact paths into mlflow.db, so a copied repo's database points at the
original folder. The store here is real MLflow on SQLite, made through the pipeline's own
tracking functions: a run that logged an artifact, a logged model with files and a registered
version of it. No training, so the module takes a few seconds.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.cli import main
from pipelines.params import Params, load_params
from pipelines.registry.models import model_name

REPO = Path(__file__).resolve().parents[2]


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
    assert tracking.artifact_location(params) == (params.root / "mlartifacts").as_uri()
    client = tracking.client(params)
    exp = tracking.experiment_id(params)
    run_id = client.create_run(exp, run_name="moved").info.run_id
    note = params.root / "note.txt"
    note.write_text("logged in the original")
    client.log_artifact(run_id, str(note), "notes")
    model = client.create_logged_model(exp, source_run_id=run_id, name="decoder")
    weights = params.root / "weights"
    weights.mkdir()
    (weights / "weights.pt").write_text("decoder weights")
    client.log_model_artifacts(model.model_id, str(weights))
    name = model_name(params, "decoder")
    client.create_registered_model(name)
    # Registered from the model's folder (not models:/, which MLflow resolves through its
    # global tracking URI), so the version's source is a path too.
    location = client.get_logged_model(model.model_id).artifact_location
    mv = client.create_model_version(name, location, run_id=run_id, model_id=model.model_id)
    client.set_terminated(run_id)
    return Store(params.root, run_id, name, str(mv.version))


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cells_naming(db: Path, text: str) -> list[tuple[str, str]]:
    """(table, value) of every text cell in the database that contains text."""
    found = []
    with sqlite3.connect(db) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in conn.execute(f"SELECT * FROM {table}"):
                found += [(table, v) for v in row if isinstance(v, str) and text in v]
    return found


def _moved_line(old: Path, new: Path) -> str:
    return f"mlflow.db was moved from {old}; its artifact paths now point at {new / 'mlartifacts'}"


def test_copied_repo_reads_and_logs_artifacts_in_its_own_folder_and_never_the_original(
    original: Store, tmp_path: Path, capsys
):
    copy = tmp_path / "copy"
    shutil.copytree(original.root, copy)
    before = _tree(original.root)
    away = original.root.with_name("repo-away")
    original.root.rename(away)  # anything still reading the original folder now fails
    try:
        params = load_params(copy / "params.yaml")
        tracking.check_reachable(params)
        assert capsys.readouterr().err.splitlines() == [_moved_line(original.root, copy)]
        tracking.check_reachable(params)
        assert capsys.readouterr().err == ""  # moved once, said once

        client = tracking.client(params)
        got = Path(client.download_artifacts(original.run_id, "notes/note.txt", str(tmp_path)))
        assert got.read_text() == "logged in the original"
        where = client.get_model_version_download_uri(original.model, original.version)
        assert where.startswith((copy / "mlartifacts").as_uri() + "/")
        weights = tmp_path / "weights.pt"
        weights.write_text("new")
        client.log_artifact(original.run_id, str(weights), "later")
        assert (copy / "mlartifacts" / original.run_id / "artifacts/later/weights.pt").is_file()
        assert _cells_naming(copy / "mlflow.db", str(original.root / "mlartifacts")) == []
        assert tracking.experiment_id(params) == client.get_run(original.run_id).info.experiment_id
    finally:
        away.rename(original.root)
    assert _tree(original.root) == before  # the original's db and artifacts, byte for byte


def test_moved_repo_follows_on_the_next_command_and_again_after_a_second_move(
    original: Store, tmp_path: Path, capsys
):
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(original.root, first)
    tracking.check_reachable(load_params(first / "params.yaml"))
    assert capsys.readouterr().err.splitlines() == [_moved_line(original.root, first)]
    first.rename(second)

    # A command that reaches the store and then finds no champion: the move is followed first.
    code = main(["generate", "--params", str(second / "params.yaml")])
    err = capsys.readouterr().err
    assert code != 0 and "no 'champion' alias" in err
    assert err.count("mlflow.db was moved") == 1 and _moved_line(first, second) in err
    client = tracking.client(load_params(second / "params.yaml"))
    artifacts = client.get_run(original.run_id).info.artifact_uri
    assert artifacts == (second / "mlartifacts" / original.run_id / "artifacts").as_uri()


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
    tracking.check_reachable(load_params(copy / "params.yaml", overrides))
    assert capsys.readouterr().err == ""
    assert (copy / "mlflow.db").read_bytes() == db


def test_a_repo_without_a_store_yet_gets_no_database_or_lock_from_the_check(tmp_path: Path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    tracking.check_reachable(load_params(tmp_path / "params.yaml"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
