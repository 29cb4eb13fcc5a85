"""Helpers for the flow tests: a throwaway git + DVC repo laid out like ours, and one Prefect API
(their small settings: the FLOW preset in tests/helpers/params.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.params import REPO


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
    """A git + DVC repo with our params.yaml, dvc.yaml, data.dvc and .dvc/config.

    The DVC remote is the config's default, <repo>/.dvc-remote."""
    repo = tmp / "repo"
    repo.mkdir(parents=True)
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
