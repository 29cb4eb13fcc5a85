"""The model is a function of the params and the data, not of the worker count: train.batch_size
is the global batch, cut into train.batch_parts parts that a worker computes whole, so the same
params on 1 and on 2 Ray Train workers train the same model, to the bit."""

from __future__ import annotations

import json

import pytest

from pipelines.errors import PipelineError
from pipelines.evaluation.evaluate import EvaluateJob, evaluate_model
from pipelines.training.driver import train_model
from pipelines.training.job import TrainJob
from tests.helpers.params import TRAINING, params_in

pytestmark = pytest.mark.slow

EPOCHS = 6


def _train(work, shards, workers: int, *extra: str) -> tuple[float, list[dict], bytes]:
    """(test -ELBO, the epochs' history, the exported weights' bytes)."""
    work.mkdir()
    params = params_in(
        work, *TRAINING, f"cluster.num_workers={workers}", f"train.epochs={EPOCHS}",
        "train.batch_size=32", "train.early_stopping_patience=100", *extra, shards=shards,
    )  # fmt: skip
    train_model(TrainJob.from_params(params), progress=False)
    out = params.resolve(params.outputs_dir) / "train"
    history = json.loads((out / "history.json").read_text())
    metrics = evaluate_model(EvaluateJob.from_params(params), progress=False).metrics
    return metrics["neg_elbo"], history, (out / "model" / "model.safetensors").read_bytes()


def test_one_and_two_workers_train_the_same_model_to_the_bit(local_ray, staged_digits, tmp_path):
    one, h1, w1 = _train(tmp_path / "one", staged_digits, 1)  # train.batch_parts: 2
    two, h2, w2 = _train(tmp_path / "two", staged_digits, 2)
    assert w1 == w2, "the exported weights differ between 1 and 2 workers"
    assert one == two
    # Every epoch's validation -ELBO, which picks the best epoch and stops early, agrees too.
    assert [e["val_neg_elbo"] for e in h1] == [e["val_neg_elbo"] for e in h2]
    assert len(h1) == EPOCHS

    # So the worker count is not part of the run: 2 workers given the finished 1-worker run's
    # params reuse it (nothing trained) rather than train the same model again.
    params = params_in(
        tmp_path / "one", *TRAINING, "cluster.num_workers=2", f"train.epochs={EPOCHS}",
        "train.batch_size=32", "train.early_stopping_patience=100", shards=staged_digits,
    )  # fmt: skip
    again = train_model(TrainJob.from_params(params), progress=False)
    assert again.reused and again.reused.startswith("reused the finished run")
    exported = params.resolve(params.outputs_dir) / "train" / "model" / "model.safetensors"
    assert exported.read_bytes() == w1


def test_a_global_batch_that_does_not_cut_into_equal_parts_is_one_line(staged_digits, small_params):
    params = small_params("cluster.num_workers=2", "train.batch_size=33", shards=staged_digits)
    with pytest.raises(PipelineError) as err:
        train_model(TrainJob.from_params(params), progress=False)
    msg = str(err.value)
    assert "train.batch_size=33" in msg and "multiple of 2" in msg and "\n" not in msg
