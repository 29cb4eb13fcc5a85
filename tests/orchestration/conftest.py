"""Helpers for the flow tests: a throwaway git + DVC repo laid out like ours, an in-process
Prefect API, a real `prefect server` and the environment its clients run in (the tests' small
settings: the FLOW preset in tests/helpers/params.py)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.params import REPO
from tests.servers import free_port, stop_process_group, wait_http

BIN = Path(sys.executable).parent


def git_dvc_env() -> dict[str, str]:
    """Environment for git and DVC in tests: no analytics, no system git config."""
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def sh(cwd: Path, env: dict, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def make_repo(tmp: Path) -> Path:
    """A git + DVC repo with our params.yaml, dvc.yaml, data.dvc and .dvc/config, its DVC site
    cache in tmp. The DVC remote is the config's default, <repo>/.dvc-remote.

    A copy of one made once per process: git init, dvc init and dvc config took 7 s a repo on
    2 busy cores, and a copy is the same files (git and DVC keep no absolute path in them but
    the site cache's, rewritten here)."""
    template = _template_repo()
    repo = tmp / "repo"
    repo.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(template, repo, symlinks=True)
    config = repo / ".dvc" / "config"
    site_cache = str(template.parent / "dvc-site-cache")
    assert site_cache in config.read_text()
    config.write_text(config.read_text().replace(site_cache, str(tmp / "dvc-site-cache")))
    return repo


@functools.cache
def _template_repo() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="vae-test-repo-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    repo = tmp / "repo"
    repo.mkdir()
    env = git_dvc_env()
    sh(repo, env, "git", "init", "-q")
    sh(repo, env, "git", "config", "user.email", "test@example.com")
    sh(repo, env, "git", "config", "user.name", "test")
    sh(repo, env, "dvc", "init", "-q")
    for name in ("params.yaml", "dvc.yaml", "data.dvc", ".dvc/config"):
        shutil.copy(REPO / name, repo / name)
    sh(repo, env, "dvc", "config", "core.site_cache_dir", str(tmp / "dvc-site-cache"))
    return repo


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
