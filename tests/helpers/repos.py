"""Throwaway git + DVC repos laid out like ours, for the tests that run git and DVC for real."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
    """A git + DVC repo with our params.yaml, dvc.yaml, data.dvc and .dvc/ config (and the plots
    page it names), its DVC site
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
    for name in ("params.yaml", "dvc.yaml", "data.dvc", ".dvc/config", ".dvc/plots-offline.html"):
        shutil.copy(REPO / name, repo / name)
    sh(repo, env, "dvc", "config", "core.site_cache_dir", str(tmp / "dvc-site-cache"))
    return repo
