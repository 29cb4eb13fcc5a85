"""Rank 0's MLflow logging, in-process on a real SQLite store (no Ray): epochs and system
metrics go into the run the driver created, and the run is left for the driver to end."""

from __future__ import annotations

import time

import mlflow
import pytest

from pipelines.training.worker import WorkerJob, _RankZeroLogger


@pytest.fixture
def driver_run(tmp_path, monkeypatch) -> tuple[mlflow.MlflowClient, str]:
    """A RUNNING run, as the driver leaves it for the workers; MLflow's process-wide settings
    that the logger changes are put back afterwards."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    for name, value in (
        ("MLFLOW_TRACKING_URI", uri),
        ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2"),
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
    ):
        monkeypatch.setenv(name, value)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("rank0", (tmp_path / "artifacts").as_uri())
    return client, client.create_run(experiment).info.run_id


def _job(client: mlflow.MlflowClient, run_id: str) -> WorkerJob:
    return WorkerJob(
        model={}, train={}, shards_dir="", batch_size=1, batch_parts=1, loader_workers=0, precision="fp32",
        tracking_uri=client.tracking_uri, mlflow_run_id=run_id, progress=False,
    )  # fmt: skip


def test_rank_zero_logs_system_metrics_into_the_drivers_run_and_leaves_it_running(driver_run):
    client, run_id = driver_run
    epoch = {"epoch": 0, "train_loss": 3.0, "val_neg_elbo": 2.0, "kl_weight": 1.0}
    logger = _RankZeroLogger(_job(client, run_id), [epoch])
    assert logger.monitor is not None
    assert mlflow.active_run() is None, "the worker's fluent state is not touched"
    deadline = time.monotonic() + 30
    while not any(k.startswith("system/") for k in client.get_run(run_id).data.metrics):
        assert time.monotonic() < deadline, "no system metric reached the run in 30 s"
        time.sleep(0.2)
    logger.close()
    run = client.get_run(run_id)
    assert logger.monitor is None, "rank 0 stopped its sampler"
    assert run.info.status == "RUNNING", "the driver ends the run, after the export"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run_id, "val_neg_elbo")] == [0]


def test_rank_zero_trains_on_without_system_metrics_when_the_run_is_gone(driver_run):
    client, run_id = driver_run
    client.delete_run(run_id)  # no metrics go into a deleted run
    logger = _RankZeroLogger(_job(client, run_id), [])
    assert logger.monitor is None and mlflow.active_run() is None
    logger.close()


@pytest.mark.parametrize("status", ["KILLED", "FAILED"])
def test_rank_zero_torn_down_after_the_driver_ended_the_run_leaves_its_status(driver_run, status):
    """An interrupt: the driver marks the run first, then Ray tears the workers down and rank 0
    closes its logger; the run must not read RUNNING again (CI once saw exactly that)."""
    client, run_id = driver_run
    logger = _RankZeroLogger(_job(client, run_id), [])
    assert logger.monitor is not None
    client.set_terminated(run_id, status=status)
    logger.log_epoch({"epoch": 0, "train_loss": 3.0, "val_neg_elbo": 2.0, "kl_weight": 1.0}, 5)
    logger.close()
    assert client.get_run(run_id).info.status == status
