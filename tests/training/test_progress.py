"""The driver's train bar follows the MLflow run rank 0 logs to (a real SQLite store)."""

from __future__ import annotations

import io

import mlflow
from tqdm import tqdm

from pipelines.training.progress import _Follower, epoch_bar


def _run(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(client.create_experiment("e"))
    return client, run.info.run_id


def test_the_bar_shows_epochs_done_latest_val_neg_elbo_and_samples_per_second(tmp_path):
    client, run_id = _run(tmp_path)
    out = io.StringIO()
    bar = tqdm(total=5, file=out)
    follower = _Follower(client, run_id, bar)
    follower.update()
    assert bar.n == 0  # nothing logged yet: the bar says why it waits
    assert bar.postfix == "starting the Ray workers"
    for step, (val, rate) in enumerate([(120.5, 100.0), (110.25, 150.0), (105.125, 200.0)]):
        client.log_metric(run_id, "val_neg_elbo", val, step=step)
        client.log_metric(run_id, "train_samples_per_s", rate, step=step)
    client.log_metric(run_id, "skipped_shards", 1, step=1)
    follower.update()
    assert bar.n == 3
    # train_samples_per_s is logged for all ranks together: shown as it is, never times ranks.
    assert bar.postfix == "val -ELBO=105.125, samples/s=200, corrupt shards skipped=1"


def test_disabled_or_unreachable_the_block_still_runs(tmp_path):
    ran = []
    with epoch_bar(None, "x", 3, enabled=False):
        ran.append(1)

    class Broken:
        def get_metric_history(self, *args):
            raise ConnectionError("tracking server away")

    with epoch_bar(Broken(), "x", 3, enabled=True):
        ran.append(2)
    assert ran == [1, 2]
