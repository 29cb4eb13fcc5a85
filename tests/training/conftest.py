"""Shared, real infrastructure for pipeline tests: one local Ray cluster per session and one
set of staged digits shards per session (Ray start-up and staging are the slow parts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.params import Params, load_params

REPO = Path(__file__).resolve().parents[2]


def make_params(workdir: Path, shards_dir: Path, *overrides: str) -> Params:
    """The repo's params.yaml with every output redirected into workdir (never into the repo)."""
    base = [
        f"data.shards_dir={shards_dir}",
        f"outputs_dir={workdir / 'outputs'}",
        f"cluster.storage_path={workdir / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        "model.hidden=[64]",
        "model.latent_dim=4",
        "train.epochs=3",
        "train.batch_size=64",
        "cluster.num_workers=2",
        "evaluate.iw_k=20",
    ]
    return load_params(REPO / "params.yaml", [*base, *overrides])


@pytest.fixture(scope="session")
def staged_digits(tmp_path_factory) -> Path:
    from pipelines.data.staging import stage_shards

    root = tmp_path_factory.mktemp("staged")
    params = load_params(REPO / "params.yaml", [f"data.shards_dir={root / 'shards'}"])
    stage_shards(params, progress=False)
    return root / "shards"
