"""Shared, real infrastructure for pipeline tests: one local Ray cluster per session and one
set of staged digits shards per session (Ray start-up and staging are the slow parts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.data.staging import StageJob
from pipelines.params import Params
from pipelines.params_file import load_params
from tests.helpers.params import REPO, TRAINING, params_in


def make_params(workdir: Path, shards_dir: Path, *overrides: str) -> Params:
    """The repo's params.yaml with every output inside workdir (never in the repo), the staged
    shards at shards_dir and the TRAINING preset."""
    return params_in(workdir, *TRAINING, *overrides, shards=shards_dir)


@pytest.fixture(scope="session")
def staged_digits(tmp_path_factory) -> Path:
    from pipelines.data.staging import stage_shards

    root = tmp_path_factory.mktemp("staged")
    params = load_params(REPO / "params.yaml", [f"data.shards_dir={root / 'shards'}"])
    stage_shards(StageJob.from_params(params), progress=False)
    return root / "shards"
