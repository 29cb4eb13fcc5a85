"""The digits staged once per session for the training tests (the session's Ray cluster,
`local_ray`, is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.data.staging import StageJob
from tests.helpers.params import params_in


@pytest.fixture(scope="session")
def staged_digits(tmp_path_factory) -> Path:
    from pipelines.data.staging import stage_shards

    root = tmp_path_factory.mktemp("staged")
    stage_shards(StageJob.from_params(params_in(root, shards=root / "shards")), progress=False)
    return root / "shards"
