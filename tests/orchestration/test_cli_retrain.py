"""`vae-pipeline retrain` and `serve` as a user runs them: embedded default, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.params import REPO
from tests.orchestration.conftest import BIN, prefect_env


@pytest.mark.slow
def test_serve_without_a_prefect_server_is_a_one_line_error(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run(
        [str(BIN / "vae-pipeline"), "serve", "--quiet"],
        env=prefect_env(tmp_path / "prefect-home"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: serve needs a running Prefect server")
    assert "prefect server start --host 127.0.0.1" in err[0] and "PREFECT_API_URL" in err[0]


@pytest.mark.slow
def test_retrain_and_serve_outside_a_project_say_so_in_one_line(tmp_path):
    for command in ("retrain", "serve"):
        proc = subprocess.run(
            [str(BIN / "vae-pipeline"), command, "--quiet"],
            env=prefect_env(tmp_path / "prefect-home"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and f"no params.yaml in {tmp_path} or its parents" in err[0], err
        # Nothing written but, at most, Prefect's home (retrain now fails before importing Prefect).
        assert {p.name for p in tmp_path.iterdir()} <= {"prefect-home"}


@pytest.mark.slow
def test_retrain_command_runs_on_the_embedded_default_and_prints_where_to_look(embedded_retrain):
    """Prefect's temporary local server, local Ray, SQLite MLflow, the repo's DVC config (the
    run: tests/orchestration/conftest.py)."""
    proc = embedded_retrain.proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]
    result = json.loads(lines[0])
    assert result["decision"] == "champion"
    assert result["data_pushed"] == "no (push disabled)"
    assert not embedded_retrain.pushed
    assert result["mlflow_ui"].startswith("mlflow ui --backend-store-uri sqlite:///")
    assert result["champion_encoder"] == "models:/digits-vae-encoder@champion"
    assert Path(result["figures"], "samples.png").is_file()
    # the quiet default: our lines only, no library INFO chatter, no tracebacks (README: a
    # retrain prints 15 lines on stderr; --quiet drops the progress bars from those)
    err = proc.stderr.splitlines()
    assert len(err) <= 15, proc.stderr
    assert "core_worker" not in proc.stderr  # Ray's E line for every actor pool stays in its log
    chatter = [line for line in err if "| INFO" in line and "| Flow run '" not in line]
    assert not chatter, proc.stderr  # only the flow's own lines, no task/server/MLflow INFO
    assert not [line for line in err if "Traceback" in line or "ERROR" in line], proc.stderr
