"""A Ray worker killed mid-training: the run restarts from its latest checkpoint and finishes."""

from __future__ import annotations

import os
import signal
import threading
import time

import mlflow
import pytest

from pipelines.train import train_model
from tests.pipeline.conftest import make_params

pytestmark = pytest.mark.slow


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes of the Ray this test session started (its descendants only,
    so no other Ray on the machine is touched)."""
    import psutil

    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def test_killed_worker_resumes_from_latest_checkpoint_without_duplicate_epochs(
    ray_cluster, staged_digits, tmp_path
):
    epochs = 16
    params = make_params(
        tmp_path, staged_digits, "train.run_name=killed", f"train.epochs={epochs}",
        "model.hidden=[512, 256]", "train.early_stopping_patience=null", "train.max_failures=2",
    )  # fmt: skip
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train_model(params, progress=False)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("checkpoint_epoch_00002")) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = _train_worker_pids()
    assert pids, "no Ray Train worker found to kill"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.epochs_run == epochs
    client = mlflow.MlflowClient(result.tracking_uri)
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "val_neg_elbo")]
    assert steps == list(range(epochs)), "every epoch logged exactly once"
