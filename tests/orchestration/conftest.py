"""Prefect for the flow tests: an in-process API, a real `prefect server` and the environment
its clients run in (their repos: tests/helpers/repos.py; their settings: the FLOW preset in
tests/helpers/params.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.params import FLOW, overrides_in, set_args
from tests.helpers.repos import make_repo
from tests.servers import free_port, stop_process_group, wait_http

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for every in-process flow test (harnesses must not nest)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """A private Prefect home (profiles, database) and no UI build; the API only if given."""
    # No inherited Prefect server, Ray cluster or tracking server: everything here is private.
    drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in drop}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DVC_NO_ANALYTICS="1",
        RAY_DEDUP_LOGS="0",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start(cmd: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own handle
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture(scope="package")
def prefect_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`prefect server start` on a free port; yields its API URL and Prefect home. One for the
    served deployment and the deployment worker tests (tests/conftest.py runs them in one
    group): its start took 70 s of a loaded suite, and each test names its own deployments
    and reads its own flow runs by id."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    home = tmp / "prefect-home"
    port = free_port()
    log = tmp / "prefect-server.log"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start(cmd, prefect_env(home), tmp, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 150, proc, log)
        yield f"http://127.0.0.1:{port}/api", home
    finally:
        stop_process_group(proc)


@dataclass(frozen=True)
class EmbeddedRetrain:
    repo: Path
    proc: subprocess.CompletedProcess
    pushed: bool  # whether the repo had a DVC remote folder right after the command


@pytest.fixture(scope="package")
def embedded_retrain(tmp_path_factory) -> EmbeddedRetrain:
    """`vae-pipeline retrain --json --quiet --no-push` in a fresh repo, as a user first runs it:
    Prefect's temporary local server, a local Ray, SQLite MLflow, the repo's DVC config. The
    command's own test reads its output; the served deployment's test then retrains the same
    repo through `serve` (tests/conftest.py runs these modules in one group), as a nightly
    run does when nothing changed: it reuses this finished training rather than training the
    same model again (about 40 s of CPU on 2 cores), and still stages, versions, pushes,
    evaluates and registers."""
    tmp = tmp_path_factory.mktemp("embedded-retrain")
    repo = make_repo(tmp)
    sets = set_args(overrides_in(repo, *FLOW, data=repo / "data"))
    proc = subprocess.run(
        [str(BIN / "vae-pipeline"), "retrain", "--json", "--quiet", "--no-push", *sets],
        env=prefect_env(tmp / "prefect-home"),
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=400,
    )
    return EmbeddedRetrain(repo, proc, (repo / ".dvc-remote").exists())
