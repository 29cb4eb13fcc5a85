"""What the cluster tests compare against: one 2-worker training on a Ray started in-process
(the embedded default), run once per session through the CLI in a subprocess (a process holds
one Ray connection, and pytest may hold one already)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.data.staging import StageJob
from tests.helpers.params import CLUSTER, REPO

# Ray, MLflow and a stack's auth: what would point a child process at another cluster.
STACK_PY = REPO / "infra" / "local" / "stack.py"
CLIENT_ENV_KEYS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV_KEYS}
    return env | extra


def train_cli(workdir: Path, shards: Path, env: dict[str, str], *overrides: str) -> dict:
    """`vae-pipeline train --json` in workdir with the CLUSTER preset (2 workers of 1 CPU
    each); the JSON result.

    Every relative path resolves in workdir (params.yaml is copied there), so runs in different
    folders get the same run name and can be compared."""
    workdir.mkdir()
    (workdir / "params.yaml").write_text((REPO / "params.yaml").read_text())
    sets = [
        f"data.shards_dir={shards}",
        "outputs_dir=outputs",
        "cluster.storage_path=runs",  # one filesystem: every node of a local cluster reaches it
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        *CLUSTER,
        *overrides,
    ]
    cli = str(Path(sys.executable).parent / "vae-pipeline")
    argv = [cli, "train", "--params", "params.yaml", "--quiet", "--json"]
    argv += [x for s in sets for x in ("--set", s)]
    out = subprocess.run(
        argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # Against a tracking server MLflow prints "View run ... at: http://..." as a run ends;
    # --quiet keeps it off the user's terminal (and --json off stdout).
    assert "View run" not in out.stdout + out.stderr, out.stderr[-3000:]
    return json.loads(out.stdout)


def history(result: dict) -> list[dict]:
    return json.loads((Path(result["model_dir"]).parent / "history.json").read_text())


@pytest.fixture(scope="session")
def infra_shards(tmp_path_factory) -> Path:
    from pipelines.data.staging import stage_shards
    from pipelines.params_file import load_params

    root = tmp_path_factory.mktemp("infra-data")
    stage_shards(
        StageJob.from_params(load_params(REPO / "params.yaml", [f"data.shards_dir={root}"])),
        progress=False,
    )
    return root


@pytest.fixture(scope="session")
def embedded_reference(infra_shards, tmp_path_factory) -> dict:
    """The embedded default's result: a local Ray started by the CLI process itself."""
    return train_cli(tmp_path_factory.mktemp("reference") / "run", infra_shards, clean_env())
