"""Scheduling for real: a `prefect server` on 127.0.0.1, `vae-pipeline serve`, a run via the API.

The served run retrains the repo `vae-pipeline retrain` left (tests/orchestration/conftest.py),
as a nightly run does when nothing changed: its training is the finished one, reused, and the
flow still stages, versions and pushes the data, evaluates, reads the champion, registers and
reports. Training inside a deployment's flow-run process is test_deployment_worker's."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import requests

from tests.helpers.params import FLOW, overrides_in, set_args
from tests.orchestration.conftest import BIN, prefect_env, start
from tests.servers import stop_process_group

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"no {what} after {timeout}s; serve log:\n{log.read_text()[-4000:]}")


def test_served_deployment_runs_the_retrain_flow_to_completion(
    prefect_server, embedded_retrain, tmp_path
):
    api, home = prefect_server
    repo = embedded_retrain.repo
    assert embedded_retrain.proc.returncode == 0, embedded_retrain.proc.stderr[-4000:]
    overrides = set_args(overrides_in(repo, *FLOW, data=repo / "data"))
    log = tmp_path / "serve.log"
    serve = start(
        [str(BIN / "vae-pipeline"), "serve", "--params", str(repo / "params.yaml"), *overrides],
        prefect_env(home, api),
        repo,
        log,
    )
    try:
        deployment = wait_for(
            "deployment",
            lambda: _get(f"{api}/deployments/name/retrain/retrain-nightly"),
            120,
            serve,
            log,
        )
        (schedule,) = deployment["schedules"]
        assert schedule["schedule"]["cron"] == "0 3 * * *"
        assert schedule["schedule"]["timezone"] == "UTC" and schedule["active"]
        assert deployment["parameters"]["params_file"] == str(repo / "params.yaml")

        run_id = trigger_run(api, deployment["id"])
        state = wait_for(
            "finished flow run",
            lambda: _terminal_state(api, run_id),
            300,
            serve,
            log,
        )
        assert state == "COMPLETED", log.read_text()[-6000:]
    finally:
        stop_process_group(serve)

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("digits-vae-encoder", "champion").version) == "1"
    assert (repo / "data.dvc").is_file() and any((repo / ".dvc-remote").rglob("*.dir"))
    artifacts = requests.post(
        f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    ).json()
    (report,) = [a for a in artifacts if a["key"] == "retrain-digits-vae"]
    assert report["data"].startswith("# Retrain: completed")
    assert "**unchanged**" in report["data"], "the same model as the CLI's run: nothing new"


def trigger_run(api: str, deployment_id: str) -> str:
    """A flow run of the deployment now; its id."""
    for _ in range(10):  # a busy 2-core server can answer 503 for a moment
        run = requests.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={})
        if run.status_code != 503:
            break
        time.sleep(2)
    run.raise_for_status()
    return run.json()["id"]


def _get(url: str) -> dict | None:
    resp = requests.get(url, timeout=10)
    return resp.json() if resp.ok else None


def _terminal_state(api: str, run_id: str) -> str | None:
    state = (_get(f"{api}/flow_runs/{run_id}") or {}).get("state") or {}
    return state.get("type") if state.get("type") in TERMINAL else None
