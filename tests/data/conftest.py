"""Shared data for the data tests: arrays saved as a source, and shards staged once per module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.data.staging import StageJob
from pipelines.params import Params
from tests.helpers.params import params_in


def save_array(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    if path.suffix == ".npz":
        np.savez(path, **({"x": x} if y is None else {"x": x, "y": y}))
    else:
        np.save(path, x)
    return path


def uneven_params(
    tmp: Path, n: int = 190, shard_size: int = 40, *extra: str, rows: int | None = None
) -> Params:
    """Everything in train, at most 40 samples per shard, from an array of n samples (of which
    the first `rows` are saved, default all)."""
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, 4, 4), dtype=np.float32)
    y = rng.integers(0, 3, n)
    path = save_array(tmp / "uneven.npz", x[:rows], y[:rows])
    return params_in(
        tmp,
        "data.source=array",
        f"data.path={path}",
        f"data.shard_size={shard_size}",
        "data.val_fraction=0",
        "data.test_fraction=0",
        "data.min_shards_per_split=1",
        "cluster.num_workers=1",
        *extra,
    )


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """Read-only: 5 train shards of unequal size (copy before corrupting anything)."""
    from pipelines.data.staging import stage_shards

    tmp = tmp_path_factory.mktemp("uneven")
    # 160 samples cut into 4 shards of 40, then 30 appended: a fifth shard of 30.
    stage_shards(StageJob.from_params(uneven_params(tmp, rows=160)), progress=False)
    result = stage_shards(StageJob.from_params(uneven_params(tmp)), progress=False)
    assert result.appended
    return result.shards_dir


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    """Read-only: the default digits staged with the repo's params.yaml."""
    from pipelines.data.staging import stage_shards

    tmp = tmp_path_factory.mktemp("digits")
    return stage_shards(StageJob.from_params(params_in(tmp)), progress=False).shards_dir
