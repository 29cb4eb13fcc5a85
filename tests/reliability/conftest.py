"""A complete workspace to damage: staged shards with their data.dvc, a trained and evaluated
model, a checkpoint folder and a registered champion pair in a real MLflow store."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.data.staging import StageJob
from pipelines.params import Params
from pipelines.params_file import load_params
from pipelines.registry.register import RegisterJob
from tests.helpers.files import tree_hashes
from tests.helpers.params import REPO, WORKSPACE
from tests.registry.conftest import fit_model, write_stage_outputs
from tests.registry_state import registry_snapshot


@dataclass
class Workspace:
    root: Path

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def shards(self) -> Path:
        return self.root / "data" / "shards"

    def params(self, *overrides: str) -> Params:
        return load_params(self.params_file, list(overrides))

    def files(self) -> dict[str, str]:
        """Every file under the workspace -> its SHA-256 (the MLflow SQLite file included)."""
        return tree_hashes(self.root, skip=lambda p: p.name.endswith(".lock"))  # empty markers

    def registry(self) -> dict[str, object]:
        return registry_snapshot(f"sqlite:///{self.root / 'mlflow.db'}")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    """Staged digits + data.dvc, outputs of train and evaluate, a Ray-style checkpoint folder
    and the champion pair, all under one folder whose params.yaml holds the small settings."""
    from pipelines.data.staging import stage_shards
    from pipelines.registry.register import register_model

    root = tmp_path_factory.mktemp("workspace")
    text = (REPO / "params.yaml").read_text()
    (root / "params.yaml").write_text(text)
    shutil.copy(REPO / "data.dvc", root / "data.dvc")
    # Bake the small settings into params.yaml: every case then runs with the file alone. Its
    # paths, but for the MLflow store's, stay relative and resolve in root.
    store = f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"
    params = load_params(root / "params.yaml", [store, *WORKSPACE])
    import yaml

    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    params = load_params(root / "params.yaml")
    stage_shards(StageJob.from_params(params), progress=False)
    trained = fit_model(params, epochs=2)
    write_stage_outputs(params, trained, "workspace")
    ckpt = root / "runs" / "workspace" / "checkpoint_epoch_00001"
    shutil.copytree(root / "outputs" / "train" / "model", ckpt / "model")
    register_model(RegisterJob.from_params(params), progress=False)
    return Workspace(root)
