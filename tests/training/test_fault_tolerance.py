"""Faults during training: a killed Ray worker, a killed driver, a tracking server that goes
away. Each run finishes (or fails in one line) and loses no checkpoint, epoch or champion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from pipelines.errors import PipelineError
from pipelines.evaluation.evaluate import EvaluateJob
from pipelines.registry.register import RegisterJob
from pipelines.training.driver import train_model
from pipelines.training.job import TrainJob
from tests.helpers.mounts import in_mount_namespace
from tests.helpers.params import REPO, TRAINING, params_in, paths_inside, set_args
from tests.registry_state import registry_snapshot

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


def _wait_for(path_glob: Path, what: str, timeout: float = 360) -> None:
    deadline = time.monotonic() + timeout
    while not list(path_glob.parent.glob(path_glob.name)):
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f}s"
        time.sleep(0.1)


def _epoch_steps(tracking_uri: str, run_id: str) -> list[int]:
    client = mlflow.MlflowClient(tracking_uri)
    return sorted(m.step for m in client.get_metric_history(run_id, "val_neg_elbo"))


def test_killed_worker_then_killed_driver_resume_without_losing_or_repeating_epochs(
    local_ray, staged_digits, tmp_path
):
    """One `vae-pipeline train` run meets both faults. A Ray Train worker is SIGKILLed after
    the third checkpoint: Ray restarts the workers from the latest checkpoint. Then the whole
    driver process group is SIGKILLed after the sixth, like a lost machine: the same command
    again resumes and finishes the same MLflow run, every epoch logged exactly once."""
    epochs = 12
    sets = [
        *paths_inside(tmp_path, shards=staged_digits),
        "model.hidden=[512, 256]", "model.latent_dim=4", "cluster.num_workers=2",
        "cluster.run_name=faults", f"train.epochs={epochs}", "train.early_stopping_patience=null",
        "cluster.max_failures=2",
    ]  # fmt: skip
    argv = [str(Path(sys.executable).parent / "vae-pipeline"), "train", "--quiet", "--json"]
    argv += ["--params", str(REPO / "params.yaml"), *set_args(sets)]
    # The drivers join this session's Ray cluster (no Ray start-up per launch), so the
    # workers are descendants of this process and can be found and killed.
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    run_dir = tmp_path / "runs" / "faults"

    first = subprocess.Popen(
        argv, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(run_dir / "checkpoint_epoch_00002", "third checkpoint")
        workers = _train_worker_pids()
        assert workers, "no Ray Train worker found to kill"
        os.kill(workers[-1], signal.SIGKILL)
        _wait_for(run_dir / "checkpoint_epoch_00005", "sixth checkpoint after the restart")
        assert first.poll() is None, "the driver should have survived the worker's death"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    # Ray frees a dead driver's workers (and their CPUs, all this 2-CPU cluster has) a little
    # later; on a loaded machine that wait, not the resume, used to eat the second run's time.
    deadline = time.monotonic() + 120
    while _train_worker_pids() and time.monotonic() < deadline:
        time.sleep(0.5)

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=540)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout)
    # Ray resumes from the latest checkpoint it had registered, which can trail the newest
    # folder on disk by an epoch or two; anything past the worker's restart point will do.
    assert result["started_at_epoch"] >= 3, "resumed from a checkpoint, not from scratch"
    assert result["epochs_run"] == epochs
    assert result["mlflow_run_id"] == run_id, "the same MLflow run continues"
    assert _epoch_steps(result["tracking_uri"], run_id) == list(range(epochs))


def test_real_mlflow_server_stopped_mid_training_loses_nothing_and_keeps_the_champion(
    local_ray, staged_digits, tmp_path, monkeypatch
):
    """Train against a real `mlflow server` (found through MLFLOW_TRACKING_URI) that is stopped
    at the third epoch: training carries on to the last and says to restart it and re-run; the
    champion stays, and the re-run logs every epoch MLflow missed, test metric and figure."""
    from pipelines.evaluation.evaluate import evaluate_model
    from pipelines.registry.register import register_model
    from tests.registry.conftest import fit_model, write_stage_outputs
    from tests.servers import free_port, start_mlflow_server, stop_process_group

    # The driver's MLflow calls give up on a dead server in seconds (the workers' do anyway).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    port = free_port()
    server, uri = start_mlflow_server(tmp_path / "server", port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        small = ["mlflow.tracking_uri=null", "evaluate.iw_k=0", "register.mc_samples=1"]
        champ = params_in(tmp_path / "champ", *TRAINING, *small, shards=staged_digits)
        write_stage_outputs(champ, fit_model(champ, epochs=2), "champion")
        register_model(RegisterJob.from_params(champ), progress=False)
        registry_before = registry_snapshot(uri)

        # Enough epochs after the third that some are still to come once the server is down:
        # 12 were once all logged before a graceful stop had closed the server, so it is
        # killed (SIGKILL within 0.1 s of the checkpoint), and the model is large enough that
        # the 9 epochs left take seconds.
        epochs = 12
        params = params_in(
            tmp_path / "new", *TRAINING, *small, "cluster.run_name=server-down",
            f"train.epochs={epochs}", "model.hidden=[512, 256]",
            "train.early_stopping_patience=null", shards=staged_digits,
        )  # fmt: skip
        thread, outcome = _train_in_background(params)
        try:
            checkpoint = tmp_path / "new" / "runs" / "server-down" / "checkpoint_epoch_00002"
            _wait_for(checkpoint, "third checkpoint")
        finally:
            stop_process_group(server, timeout=0)  # SIGTERM, then SIGKILL at once
            thread.join(timeout=300)

        # Training went on without MLflow to its last epoch and exported the best model; only
        # closing the run failed, in one line that says the server is gone and to re-run.
        _assert_trained_on_and_said_to_rerun(outcome, tmp_path / "new", uri, epochs)
        with pytest.raises(PipelineError, match="unreachable"):
            evaluate_model(EvaluateJob.from_params(params), progress=False)
        with pytest.raises(PipelineError):
            register_model(RegisterJob.from_params(params), progress=False)

        server, _ = start_mlflow_server(tmp_path / "server", port)
        assert registry_snapshot(uri) == registry_before, "no half-registered model, same champion"
        run_id = (tmp_path / "new" / "runs" / "server-down" / "mlflow_run_id").read_text().strip()
        missed = _epoch_steps(uri, run_id)
        assert len(missed) < epochs, f"MLflow saw epochs {missed}: none trained after it died"
        resumed = train_model(
            TrainJob.from_params(params), progress=False
        )  # logs what MLflow missed
        assert resumed.tracking_uri == uri and resumed.epochs_run == epochs
        assert resumed.mlflow_run_id == run_id
        assert _epoch_steps(uri, resumed.mlflow_run_id) == list(range(epochs))

        _assert_evaluated_in(
            uri,
            resumed.mlflow_run_id,
            evaluate_model(EvaluateJob.from_params(params), progress=False),
        )
    finally:
        stop_process_group(server)


def _assert_trained_on_and_said_to_rerun(outcome: dict, workdir: Path, uri: str, epochs: int):
    """Every epoch trained and exported although MLflow died at the third; the error is the
    one line the CLI prints last: MLflow stopped answering, start it and re-run train."""
    from vae import load_model

    error = outcome.get("error")
    assert isinstance(error, PipelineError), f"expected the one-line MLflow error, got {outcome}"
    message = str(error)
    assert "\n" not in message, message
    assert f"MLflow at {uri} stopped answering" in message, message
    assert "start it and re-run the same train command" in message, message
    out = workdir / "outputs" / "train"
    assert f"best model is in {out / 'model'}" in message, message
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(epochs)), "trained on to the last epoch"
    load_model(out / "model")


def _train_in_background(params) -> tuple[threading.Thread, dict]:
    """train_model in a thread; its result or exception lands in the returned dict."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train_model(TrainJob.from_params(params), progress=False)
        except BaseException as exc:  # noqa: BLE001 - the test checks it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _assert_evaluated_in(uri: str, run_id: str, ev) -> None:
    """The run finished, with the evaluate stage's test metric and figures logged to it."""
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_neg_elbo"] == pytest.approx(ev.metrics["neg_elbo"])
    assert run.data.params["cluster.num_workers"] == "2"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/samples.png", "figures/latent.png"} <= arts


# Runs inside a private mount namespace: `cluster.storage_path` is a small tmpfs that the script
# fills up, and keeps full, once three checkpoints are on it, so Ray's copy of a later checkpoint (or of its own
# bookkeeping) meets a real ENOSPC. Prints one JSON line for the test to check.
_STORAGE_FULL = r"""
import json, subprocess, sys, time
from pathlib import Path

storage, argv = Path(sys.argv[1]), json.loads(sys.argv[2])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(storage)], check=True)
run_dir = storage / "disk-full"
first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
deadline = time.monotonic() + 240
while not (run_dir / "checkpoint_epoch_00002").exists() and first.poll() is None:
    assert time.monotonic() < deadline, "no third checkpoint"
    time.sleep(0.05)
# Keep it full: Ray deletes checkpoints beyond num_to_keep, and the filler takes that space too.
fill_errno = None
with open(storage / "filler", "wb") as f:
    while first.poll() is None:
        try:
            f.write(b"\0" * (1 << 16))
            f.flush()
        except OSError as exc:
            fill_errno = exc.errno
            time.sleep(0.01)
out, err = first.communicate(timeout=300)
checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_epoch_*"))
# All but the newest, which may be the one the full disk cut short.
loads = subprocess.run(
    [sys.executable, "-c", sys.argv[3], str(run_dir), *checkpoints[:-1]],
    capture_output=True, text=True,
)
(storage / "filler").unlink()
second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
print(json.dumps({
    "fill_errno": fill_errno, "first_rc": first.returncode, "first_err": err,
    "checkpoints_after_failure": checkpoints,
    "loads": loads.stdout.strip() + loads.stderr[-2000:],
    "second_rc": second.returncode, "second_out": second.stdout, "second_err": second.stderr[-3000:],
}))
"""

# Loads each checkpoint named in argv[2:] the way a resume and the export do.
_LOAD_CHECKPOINTS = r"""
import sys
from pathlib import Path
from pipelines.training.worker import MODEL_DIR, STATE_FILE, load_state
from vae import load_model

for name in sys.argv[2:]:
    d = Path(sys.argv[1]) / name
    assert load_state(d / STATE_FILE)["epoch"] == int(name.rsplit("_", 1)[1])
    load_model(d / MODEL_DIR)
print("ok", len(sys.argv) - 2)
"""


def test_full_storage_during_checkpoint_copy_keeps_earlier_checkpoints_and_resumes(
    staged_digits, tmp_path
):
    """A real full disk under `cluster.storage_path` while Ray copies a checkpoint there: the
    run fails in one line that says to free space, every earlier checkpoint still loads, and
    once space is freed the same command resumes from one of them and finishes."""
    epochs = 12
    storage = tmp_path / "storage"
    storage.mkdir()
    sets = [
        *paths_inside(tmp_path, shards=staged_digits),
        f"cluster.storage_path={storage}",
        "model.hidden=[512, 256]", "cluster.num_workers=1", "cluster.run_name=disk-full",
        f"train.epochs={epochs}", "train.early_stopping_patience=null", "cluster.max_failures=0",
    ]  # fmt: skip
    argv = [str(Path(sys.executable).parent / "vae-pipeline"), "train", "--quiet", "--json"]
    argv += ["--params", str(REPO / "params.yaml"), *set_args(sets)]
    res = in_mount_namespace(
        _STORAGE_FULL, str(storage), json.dumps(argv), _LOAD_CHECKPOINTS, timeout=600
    )
    assert res["fill_errno"] == 28, "the storage really was full"

    assert res["first_rc"] == 2, res["first_err"][-3000:]
    # Ray's own log lines from its actors may print around ours; ours is the one "error:" line.
    errors = [line for line in res["first_err"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res["first_err"][-3000:]
    assert "no space left on device" in errors[0] and "free space and re-run" in errors[0]
    assert len(res["checkpoints_after_failure"]) >= 2
    assert res["loads"] == f"ok {len(res['checkpoints_after_failure']) - 1}"

    assert res["second_rc"] == 0, res["second_err"]
    result = json.loads(res["second_out"])
    assert result["started_at_epoch"] >= 1, "resumed from a checkpoint, not from scratch"
    assert result["epochs_run"] == epochs
