"""The evaluate stage scores disentanglement (MIG) where the data records its generative factors
(sprites): a real stage, train and evaluate. That it leaves MIG out where the data records none
(digits) is checked on test_train_evaluate's run, which evaluates digits anyway."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from pipelines.data.shards.loader import make_loader
from pipelines.data.sources import sprites
from pipelines.data.staging import StageJob, stage_shards
from pipelines.evaluation.evaluate import EvaluateJob, evaluate_model
from pipelines.paths import layout
from pipelines.training.driver import train_model
from pipelines.training.job import TrainJob
from tests.helpers.params import TRAINING, params_in
from vae import load_model, mutual_information_gap

pytestmark = pytest.mark.slow

# Short runs: MIG's plumbing is under test here, not what training makes of it.
FAST = ("train.epochs=1", "cluster.num_workers=1", "evaluate.iw_k=0")
SPRITES = ("data.source=sprites", "data.size=400", "data.test_fraction=0.3")  # 5 factors vary


@pytest.fixture(scope="module")
def staged_sprites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sprites")
    params = params_in(root, *TRAINING, *SPRITES, shards=root / "shards")
    stage_shards(StageJob.from_params(params), progress=False)
    return root / "shards"


def _train_and_evaluate(work, shards_dir, *overrides: str):
    params = params_in(work, *TRAINING, *FAST, *overrides, shards=shards_dir)
    trained = train_model(TrainJob.from_params(params), progress=False)
    result = evaluate_model(EvaluateJob.from_params(params), progress=False)
    return trained, result, json.loads(open(result.metrics_file).read())


def test_sprites_metrics_hold_mig_and_one_gap_per_factor_and_mlflow_has_test_mig(
    local_ray, staged_sprites, tmp_path, small_params
):
    trained, result, metrics = _train_and_evaluate(
        tmp_path, staged_sprites, *SPRITES, "cluster.run_name=sprites-mig"
    )
    assert 0.0 <= metrics["mig"] <= 1.0
    assert list(metrics["mig_per_factor"]) == list(sprites.FACTOR_NAMES)
    assert all(0.0 <= g <= 1.0 for g in metrics["mig_per_factor"].values())
    assert metrics["mig"] == pytest.approx(sum(metrics["mig_per_factor"].values()) / 5)
    assert result.metrics["mig"] == metrics["mig"]
    # The gaps are of the test samples' own factors: recomputed here from the posterior means
    # of the trained model and the factors of each key's grid index (not from the shards).
    model = load_model(layout(small_params(shards=staged_sprites)).train_dir / "model").eval()
    keys, means = [], []
    with torch.no_grad():
        for b in make_loader(staged_sprites, "test", 64, shuffle=False, equalize=False):
            keys += b["key"]
            means.append(model.embed(b["x"])[0].numpy())
    grid = np.array([int(k.rsplit("-", 1)[1]) for k in keys])
    expected = mutual_information_gap(
        np.concatenate(means).astype(np.float64), sprites.factors_of(grid)
    )
    assert metrics["mig"] == pytest.approx(expected.mig)
    run = mlflow.MlflowClient(trained.tracking_uri).get_run(trained.mlflow_run_id)
    assert run.data.metrics["test_mig"] == pytest.approx(metrics["mig"])
